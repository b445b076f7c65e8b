"""Budgets mean what the user meant (issue 14 item 5): every budget carries its unit, useless or visible
budgets are refused, and an output equal to its input is a failed item."""

from __future__ import annotations

import json

import pytest

from cloak.adversarial.budget import Budget, check_budget, parse_budget
from cloak.errors import UsageError

ADVDM = ["--method", "advdm", "--tiny", "--steps", "1", "--json"]


def test_parse_budget_spellings():
    assert parse_budget("8/255") == Budget(8.0, "255")
    assert parse_budget("8 / 255") == Budget(8.0, "255")
    assert parse_budget("8lv") == Budget(8.0, "255") == parse_budget("8levels") == parse_budget("8 levels")
    assert parse_budget("0.03", "01") == Budget(0.03, "01")
    assert parse_budget(0.05, "m11").m11 == pytest.approx(0.05)
    assert parse_budget("8/255", "255") == Budget(8.0, "255")  # the same unit twice is not a conflict
    for bad in ("8", 8, "-1/255", "eight", "8/256", "8%"):
        with pytest.raises(UsageError):
            parse_budget(bad)
    with pytest.raises(UsageError, match="give one unit"):
        parse_budget("8/255", "m11")
    with pytest.raises(UsageError, match="unknown unit"):
        parse_budget("8", "percent")


def test_check_budget_bounds():
    check_budget(2 / 255, "eps")  # 1 level: the smallest that changes a PNG
    check_budget(64 / 255, "eps")  # 32 levels: allowed without force
    with pytest.raises(UsageError, match="under one 8-bit level"):
        check_budget(0.05 * 2 / 255, "eps")
    with pytest.raises(UsageError, match="--force-budget"):
        check_budget(66 / 255, "eps")
    check_budget(1.0, "eps", force=True)


def test_bare_eps_is_a_usage_error_showing_the_spellings(cli, image_dir, tmp_path):
    r = cli("protect", *ADVDM, "--eps", "8", image_dir, tmp_path / "out")
    assert r.exit_code == 2
    assert "8/255" in r.stderr and "8lv" in r.stderr and "--eps-unit" in r.stderr
    assert not (tmp_path / "out").exists()


def test_eps_unit_alone_is_a_usage_error(cli, image_dir, tmp_path):
    r = cli("protect", *ADVDM, "--eps-unit", "255", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "--eps" in r.stderr


@pytest.mark.parametrize("spelling", [["--eps", "4/255"], ["--eps", "4lv"], ["--eps", "4", "--eps-unit", "255"],
                                      ["--eps", "0.0156862745", "--eps-unit", "01"]])
def test_eps_spellings_give_the_same_budget(cli, image_dir, tmp_path, spelling):
    r = cli("protect", "--method", "aspl", "--tiny", "-o", "class_images=0", "-o", "iterations=1",
            "-o", "surrogate_steps=1", "-o", "pgd_steps=2", "--json", *spelling, image_dir, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["summary"]["budget"]["eps_m11"] == pytest.approx(8 / 255)
    assert max(i["linf_255"] for i in rep["items"]) <= 4


def test_budget_rounding_to_zero_levels_is_refused(cli, image_dir, tmp_path):
    r = cli("protect", *ADVDM, "--eps", "0.05", "--eps-unit", "255", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "under one 8-bit level" in r.stderr
    assert not (tmp_path / "out").exists()


def test_visible_budget_needs_force_budget(cli, image_dir, tmp_path):
    r = cli("protect", *ADVDM, "--eps", "8", "--eps-unit", "m11", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "--force-budget" in r.stderr
    r = cli("protect", *ADVDM, "--eps", "40/255", "--force-budget", image_dir, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["summary"]["budget"]["eps_m11"] == pytest.approx(80 / 255)


def test_method_option_budget_needs_a_unit(cli, image_dir, tmp_path):
    # advdm's default unit is 255, aspl's m11: a bare -o eps=0.05 would mean different things.
    r = cli("protect", *ADVDM, "-o", "eps=0.05", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "no unit" in r.stderr and "eps=8/255" in r.stderr
    r = cli("protect", *ADVDM, "-o", "alpha=1", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "alpha" in r.stderr
    r = cli("protect", *ADVDM, "-o", "eps=4/255", image_dir, tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["options"]["eps"]["value"] == pytest.approx(4)
    r = cli("protect", *ADVDM, "-o", "unit=m11", "-o", "eps=0.04", "-o", "alpha=0.01", image_dir, tmp_path / "b")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["summary"]["budget"]["eps_m11"] == pytest.approx(0.04)


def test_a_later_unit_does_not_reinterpret_the_flag_budget(cli, image_dir, tmp_path):
    # -o unit=m11 beats --eps-unit, but --eps 4/255 keeps meaning 4 levels (converted, not reread).
    r = cli("protect", *ADVDM, "--eps", "4/255", "-o", "unit=m11", image_dir, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["options"]["unit"]["value"] == "m11"
    assert rep["options"]["eps"]["value"] == pytest.approx(8 / 255)
    assert rep["options"]["alpha"]["value"] == pytest.approx(2 / 255)  # advdm's 1/255 step, in m11


def test_config_budgets_carry_units(cli, image_dir, tmp_path):
    (tmp_path / "cloak.toml").write_text('[protect]\neps = "4/255"\n')
    r = cli("protect", *ADVDM, image_dir, tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["summary"]["budget"]["eps_m11"] == pytest.approx(8 / 255)
    assert rep["params"]["eps"] == {"value": "4/255", "source": "config"}
    (tmp_path / "cloak.toml").write_text("[protect]\neps = 4\n")
    r = cli("protect", *ADVDM, image_dir, tmp_path / "b")
    assert r.exit_code == 2 and "8/255" in r.stderr


def test_output_identical_to_input_is_a_failed_item(cli, image_dir, tmp_path):
    r = cli("protect", "--method", "advdm", "--tiny", "--steps", "0", "-o", "random_start=false", "--json",
            image_dir, tmp_path / "out")
    assert r.exit_code == 5, r.stderr
    rep = json.loads(r.stdout)
    assert {i["status"] for i in rep["items"]} == {"failed"}
    assert all("identical to its input" in i["error"] for i in rep["items"])
    assert rep["summary"]["ok"] == 0
    assert not list((tmp_path / "out").glob("*.png"))  # nothing that looks like a protected photo


def test_help_and_methods_show_default_budgets_in_three_units(cli):
    from cloak.adversarial.budget import default_budgets
    from cloak.protect import PROTECT

    help_text = " ".join(cli("protect", "--help").stdout.split())
    listing = cli("methods", "protect").stdout
    for name in PROTECT.names():
        budgets = default_budgets(PROTECT.get(name).Options)
        assert budgets, name
        for option, budget in budgets.items():
            three = budget.all_units()
            assert "/255" in three and "(01)" in three and "(m11)" in three
            assert three in help_text, (name, three)  # the static table in --help matches the Options
            assert f"{option} {three}" in cli("methods", "show", name).stdout
            line = next(x for x in listing.splitlines() if x.startswith(f"protect\t{name}\t"))
            assert f"{option} {three}" in line
    shown = json.loads(cli("methods", "show", "advdm", "--json").stdout)["budgets"]["eps"]
    assert (shown["value"], shown["unit"], shown["m11"], shown["01"]) == (16, "255", pytest.approx(32 / 255),
                                                                          pytest.approx(16 / 255))


def test_a_unit_alone_converts_the_defaults_instead_of_rereading_them():
    from cloak.methods import build_options
    from cloak.protect import PROTECT

    opts, record = build_options(PROTECT.get("aspl").Options, [("-o", {"unit": "255"})], "aspl")
    assert (opts.unit, opts.eps, opts.alpha) == ("255", pytest.approx(6.375), pytest.approx(0.6375))
    assert opts.eps_m11 == pytest.approx(0.05) and record["eps"]["source"] == "default"
    opts, _ = build_options(PROTECT.get("aspl").Options, [("-o", {"unit": "255", "eps": "4"})], "aspl")
    assert (opts.eps, opts.alpha) == (4, pytest.approx(0.6375))
