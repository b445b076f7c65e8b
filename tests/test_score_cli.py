"""`cloak score` as a command: gates (parser, exit 6, cloak.toml), --per-subdir aggregation, --sheet, options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cloak.errors import UsageError
from cloak.score.gates import parse_gate


def _img(path: Path, value: int, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


# --- the gate language ---------------------------------------------------------------------------------------

TABLE = {"ism": {"mean": 0.4, "std": 0.05, "n": 3}, "fdfr": {"mean": 0.6, "std": 0.1, "n": 3}}


@pytest.mark.parametrize("text,failed", [
    ("ism>0.35", True), ("ism<=0.35", False), ("fdfr<0.5", False), ("ism.std<0.1", True), ("ism.n==3", True),
    ("0.5<fdfr", True), ("ism>fdfr", False), ("ism>0.5 or fdfr>0.5", True), ("ism>0.3 and fdfr>0.7", False),
    ("ism>0.5 and fdfr>0.5 or ism<0.5", True), ("ism != 0.4", False), ("  ism  >  3.5e-1  ", True),
    ("ism>-1", True),
])
def test_gate_evaluation(text, failed):
    assert parse_gate(text, ["ism", "fdfr"]).evaluate(TABLE)[0] is failed


def test_gate_on_undefined_value_fails_unless_undefined_pass():
    for undefined in ({"mean": None, "std": None, "n": 0}, {"mean": float("nan"), "std": None, "n": 1}):
        failed, why = parse_gate("ism>0.3", ["ism"]).evaluate({"ism": undefined})
        assert failed is True and "undefined" in why and "--undefined pass" in why
        assert parse_gate("ism>0.3", ["ism"]).evaluate({"ism": undefined}, "pass")[0] is False


@pytest.mark.parametrize("text,message", [
    ("", "empty"), ("ism>", "expected"), ("ism 0.3", "expected"), ("ism > 0.35 and", "expected"),
    ("0.1<ism<0.3", "one comparison"), ("ism.max>1", "statistic"), ("isn>0.3", "did you mean 'ism'"),
    ("psnr>30", "not being computed"), ("1<2", "needs a metric"), ("ism>0.35x", "'and' or 'or'"),
    ("ism>>0.3", "comparison"), ("(ism>0.3)", "unexpected character"), ("__import__('os')>0", "unexpected"),
    ("ism>0.3; rm -rf /", "unexpected"),
])
def test_malformed_gates_are_usage_errors(text, message):
    with pytest.raises(UsageError) as exc:
        parse_gate(text, ["ism", "fdfr"])
    assert message in str(exc.value) and exc.value.exit_code == 2


def test_malformed_gate_exits_2_before_any_work(cli, tmp_path):
    _img(tmp_path / "g" / "a.png", 10)
    r = cli("score", tmp_path / "g", "--metric", "brisque", "--fail-if", "brisque >> 3")
    assert r.exit_code == 2 and "--fail-if" in r.stderr and r.stdout == ""


def test_gates_exit_6_naming_each_failed_gate(cli, tmp_path):
    _img(tmp_path / "g" / "a.png", 100)
    _img(tmp_path / "r" / "a.png", 110)
    r = cli("score", tmp_path / "g", "--ref", tmp_path / "r", "--metric", "psnr,linf",
            "--fail-if", "psnr<40", "--fail-if", "linf>5", "--fail-if", "linf>50")
    assert r.exit_code == 6
    assert "gate failed: psnr<40" in r.stderr and "gate failed: linf>5" in r.stderr
    assert "gate failed: linf>50" not in r.stderr
    assert r.stdout.splitlines()[0].startswith("psnr\t28.13")  # data still printed


def test_gates_from_cloak_toml(cli, tmp_path):
    _img(tmp_path / "g" / "a.png", 100)
    _img(tmp_path / "r" / "a.png", 110)
    (tmp_path / "cloak.toml").write_text('[score]\nmetrics = ["psnr"]\nfail_if = ["psnr<40"]\n')
    r = cli("score", tmp_path / "g", "--ref", tmp_path / "r", "--json")
    assert r.exit_code == 6 and "gate failed: psnr<40" in r.stderr
    rep = json.loads(r.stdout)
    assert rep["params"]["fail_if"] == {"value": ["psnr<40"], "source": "config"}
    # a flag adds to the configured gates (it used to replace them silently)
    r = cli("score", tmp_path / "g", "--ref", tmp_path / "r", "--fail-if", "psnr<20", "--json")
    assert r.exit_code == 6 and "gate failed: psnr<40" in r.stderr
    assert json.loads(r.stdout)["params"]["fail_if"] == {"value": ["psnr<40", "psnr<20"], "source": "config+flag"}


def test_metric_option_plumbing(cli, tmp_path):
    _img(tmp_path / "g" / "a.png", 100, 64)
    r = cli("score", tmp_path / "g", "--metric", "niqe", "-o", "niqe.block=16", "--tiny", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["options"]["niqe.block"] == {"value": 16, "source": "-o"}
    r = cli("score", tmp_path / "g", "--metric", "niqe", "-o", "niqe.blok=16", "--tiny")
    assert r.exit_code == 2 and "did you mean 'block'" in r.stderr
    r = cli("score", tmp_path / "g", "--metric", "niqe", "-o", "ism.backend=dlib")
    assert r.exit_code == 2 and "METRIC.KEY=VALUE" in r.stderr
    r = cli("score", tmp_path / "g", "--metric", "fdfr", "-o", "fdfr.backend=mtcnn")
    assert r.exit_code == 2


# --- several identities ----------------------------------------------------------------------------------------

def _subjects(root: Path) -> tuple[Path, Path]:
    gen, ref = root / "gen", root / "ref"
    # alice: attack-style nesting alice/gen/<prompt>/N.png, two prompts; errors 10 and 20 levels
    _img(gen / "alice" / "gen" / "p1" / "0.png", 110)
    _img(gen / "alice" / "gen" / "p2" / "0.png", 120)
    _img(ref / "alice" / "0.png", 100)
    # bob: flat, three images with error 40 (full-reference metrics pair by file name)
    for i in range(3):
        _img(gen / "bob" / f"{i}.png", 140)
        _img(ref / "bob" / f"{i}.png", 100)
    # carol has no reference: skipped with a warning
    _img(gen / "carol" / "0.png", 50)
    return gen, ref


def test_per_subdir_aggregates_subject_means(cli, tmp_path):
    gen, ref = _subjects(tmp_path)
    r = cli("score", gen, "--ref", ref, "--per-subdir", "--metric", "linf", "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    subjects = rep["summary"]["subjects"]
    assert set(subjects) == {"alice", "bob"} and "carol" in " ".join(rep["warnings"])
    assert subjects["alice"]["metrics"]["linf"]["mean"] == 15.0  # (10 + 20) / 2
    assert subjects["bob"]["metrics"]["linf"]["mean"] == 40.0
    assert subjects["alice"]["prompts"] == {"p1": {"linf": 10.0}, "p2": {"linf": 20.0}}
    row = rep["summary"]["metrics"]["linf"]
    # mean over subjects of subject means (27.5), not over the 5 images pooled (30)
    assert row["mean"] == 27.5 and row["n"] == 2 and row["n_images"] == 5 and row["std"] == 12.5
    assert {i["subject"] for i in rep["items"]} == {"alice", "bob"}


def test_per_subdir_gates_use_the_aggregate(cli, tmp_path):
    gen, ref = _subjects(tmp_path)
    r = cli("score", gen, "--ref", ref, "--per-subdir", "--metric", "linf", "--fail-if", "linf>27")
    assert r.exit_code == 6 and "linf=27.5" in r.stderr
    assert "alice" in r.stderr and "bob" in r.stderr  # the per-subject table


def test_per_subdir_needs_matching_subjects(cli, tmp_path):
    _img(tmp_path / "gen" / "x" / "0.png", 1)
    _img(tmp_path / "ref" / "y" / "0.png", 1)
    r = cli("score", tmp_path / "gen", "--ref", tmp_path / "ref", "--per-subdir", "--metric", "linf")
    assert r.exit_code == 3 and "no subject folder" in r.stderr


def test_contact_sheet(cli, tmp_path):
    gen, ref = _subjects(tmp_path)
    sheet = tmp_path / "out" / "sheet.png"
    r = cli("score", gen, "--ref", ref, "--per-subdir", "--metric", "psnr,linf", "--sheet", sheet)
    assert r.exit_code == 0, r.stderr
    img = Image.open(sheet)
    assert img.format == "PNG" and img.width >= 6 * 160 and img.height > 2 * (160 + 160)
    arr = np.asarray(img.convert("RGB"))
    # bob's generated thumbnails (grey 140) are on the sheet
    assert (np.abs(arr.astype(int) - 140).sum(axis=2) == 0).sum() > 3 * 150 * 150


def test_sheet_layout_lists_scores_under_images(tmp_path):
    """The text under each generated image: its name and one line per metric (checked by rendering)."""
    from cloak.score.base import ScoreImage
    from cloak.score.runner import Subject
    from cloak.score.sheet import contact_sheet

    rgb = np.full((40, 40, 3), 200, np.uint8)
    s = Subject("s", tmp_path, tmp_path, images=[ScoreImage("a", "", rgb)], ref=[ScoreImage("r", "", rgb)],
                values={"m1": [0.5], "m2": [None]}, table={"m1": {"mean": 0.5}, "m2": {"mean": None}})
    one = contact_sheet(tmp_path / "one.png", [s], ["m1"], {"m1": {"mean": 0.5}})
    two = contact_sheet(tmp_path / "two.png", [s], ["m1", "m2"], {"m1": {"mean": 0.5}, "m2": {"mean": None}})
    assert Image.open(two).height > Image.open(one).height  # a line more per metric


def test_metric_options_accept_hyphenated_names_and_lists():
    from cloak.methods import build_options, parse_option_pairs
    from cloak.score.runner import metric_option_layers
    from cloak.score.serfiq import SerFiqOptions

    # -o turns '-' into '_' in keys; the metric part is mapped back to its registered name
    pairs = parse_option_pairs(["clipiqa-c.class_name=dog", "serfiq.thresholds=0.5,0.6,0.7"])
    layers = metric_option_layers(pairs, ["clipiqa-c", "serfiq"])
    assert layers == {"clipiqa-c": {"class_name": "dog"}, "serfiq": {"thresholds": "0.5,0.6,0.7"}}
    opts, _ = build_options(SerFiqOptions, [("-o", layers["serfiq"])], "serfiq")
    assert opts.thresholds == (0.5, 0.6, 0.7)
