"""Mistakes a person makes at the terminal with attack, immunize, eval and models, and the API called the way
a script author would: each case is one bug found by using the tool, kept so it stays fixed."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("verb", ["attack", "immunize", "protect", "purify"])
@pytest.mark.parametrize("effort", ["inf", "1e400"])
def test_infinite_effort_is_a_usage_error_before_any_work(cli, image_dir, tmp_path, verb, effort):
    # Used to pass the "> 0" check and die minutes later with "OverflowError: cannot convert float infinity".
    r = cli(verb, "--tiny", "--effort", effort, image_dir, tmp_path / "out")
    assert r.exit_code == 2, r.stderr
    assert "--effort" in r.stderr and "finite" in r.stderr
    assert "OverflowError" not in r.stderr


def test_infinite_effort_in_cloak_toml_is_refused(cli, image_dir, tmp_path):
    cfg = tmp_path / "cloak.toml"
    cfg.write_text("[attack]\neffort = inf\n")
    r = cli("attack", "--tiny", "--config", cfg, image_dir, tmp_path / "out")
    assert r.exit_code == 2, r.stderr
    assert "attack.effort" in r.stderr and "finite" in r.stderr


# --- cloak models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cols", [40, 80, 200])
def test_models_list_on_a_terminal_keeps_every_id_whole_and_says_non_commercial_once(cols):
    from test_terminal import _plain, run_in_pty

    from cloak.models.catalog import CATALOG

    code, screen = run_in_pty(["models", "list"], cols=cols)
    text = _plain(screen)
    assert code == 0, text
    # At 80 columns the table used to print "sd21-sh…" and "guided-…": ids nobody can copy.
    words = set(re.findall(r"[\w.-]+", text))
    assert {spec.id for spec in CATALOG.values()} <= words, text
    line = next(line for line in text.splitlines() if "S-Lab" in line)
    assert line.count("NON-COMMERCIAL") == 1, line  # was "S-Lab License 1.0 (NON-COMMERCIAL) (NON-COMMERCIAL)"


def test_models_pull_names_a_non_commercial_licence_before_downloading(cli, monkeypatch):
    import cloak.models.cache as cache

    def no_network(*a, **k):
        from cloak.errors import ModelUnavailableError

        raise ModelUnavailableError("no network: test")

    monkeypatch.setattr(cache, "pull", no_network)
    r = cli("models", "pull", "codeformer")
    assert r.exit_code == 4
    assert "warning: codeformer is under S-Lab License 1.0 (NON-COMMERCIAL): not for commercial use" in r.stderr
    r = cli("models", "pull", "sd21-base")
    assert "commercial" not in r.stderr.lower()  # only where the licence says so


def test_models_verify_with_nothing_cached_says_so(cli):
    r = cli("models", "verify")
    assert r.exit_code == 0 and r.stdout == ""
    assert "nothing to verify" in r.stderr  # was silent: read as "everything verified"
