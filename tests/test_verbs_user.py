"""Mistakes a person makes at the terminal with attack, immunize, eval and models, and the API called the way
a script author would: each case is one bug found by using the tool, kept so it stays fixed."""

from __future__ import annotations

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
