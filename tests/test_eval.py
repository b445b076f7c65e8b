"""``cloak eval``: a 2-identity × 2-protect × 2-purify × 1-attack × 2-metric plan on tiny-sd, end to end.

One local run (module fixture) feeds the checks: table shapes and one SD load; the same numbers as the
verbs run by hand on one cell; a second run all cached with byte-identical cells; a changed option,
interrupted (SIGINT) after its first cell, then resumed: only the changed cells redone, nothing lost.
The Ray executor recomputes one identity's cells on a local 2-CPU cluster (deselect with -m 'not ray').
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_cli, write_images

ROOT = Path(__file__).resolve().parent.parent
CELL = ("photoguard_steps=1", "jpeg_quality=75", "dreambooth", "alice")

PLAN = """\
[data]
identities = "ids/*"
[grid]
protect = ["none", "photoguard:steps=1"]
purify = ["none", "jpeg:quality=75"]
attack = ["dreambooth"]
score = ["fdfr", "brisque"]
[common]
tiny = true
[attack]
steps = 1
num_images = 1
sample_steps = 1
prompts = ["a photo of sks person"]
class_images = 0
"""


def make_identities(root: Path) -> None:
    for i, name in enumerate(["alice", "bob"]):
        write_images(root / "ids" / name / "protect", n=1, size=(64, 64), seed=10 * i)
        write_images(root / "ids" / name / "ref", n=1, size=(64, 64), seed=10 * i + 1)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def csv_values(out: Path) -> dict[tuple, str]:
    with open(out / "results.csv", newline="") as handle:
        return {(r["protect"], r["purify"], r["attack"], r["identity"], r["metric"]): r["value"]
                for r in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The plan run once, locally, in this process; every SD load counted."""
    from cloak.eval import run_eval
    from cloak.models.handle import Models

    root = tmp_path_factory.mktemp("eval")
    make_identities(root)
    (root / "plan.toml").write_text(PLAN)
    loads = []
    original = Models._load_sd
    Models._load_sd = lambda self, *a: loads.append(a[0]) or original(self, *a)
    lines: list[str] = []
    records: list[dict] = []
    old_cache = os.environ.get("CLOAK_CACHE_DIR")
    os.environ["CLOAK_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "eval-cache")
    try:
        run = run_eval(root / "plan.toml", root / "out", log=lines.append, on_cell=records.append)
    finally:
        Models._load_sd = original
    yield {"root": root, "out": root / "out", "run": run, "loads": loads, "lines": lines, "records": records,
           "cache": os.environ["CLOAK_CACHE_DIR"]}
    if old_cache is None:
        os.environ.pop("CLOAK_CACHE_DIR", None)
    else:
        os.environ["CLOAK_CACHE_DIR"] = old_cache


@pytest.fixture
def env(base, monkeypatch):
    monkeypatch.setenv("CLOAK_CACHE_DIR", base["cache"])
    return base


def test_table_shapes_progress_and_one_sd_load(env):
    out, run = env["out"], env["run"]
    assert len(run.cells) == 8 and all(c["status"] == "ok" for c in run.cells)
    assert env["loads"] == ["tiny-sd"]  # photoguard and dreambooth on every cell: one load for the plan
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 2 * 2 * 1 * 2 and all(r["value"] for r in rows)
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == "cloak.eval/1" and doc["counts"] == {"ok": 8, "failed": 0, "pending": 0}
    assert len(doc["table"]) == 2 * 2 * 2 and all(r["n"] == 2 for r in doc["table"])
    assert doc["metrics"]["fdfr"]["backend"] == "retinaface-arcface"
    md = (out / "results.md").read_text()
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_rows) == 1 + 4  # header + protect × purify
    assert "FDFR ↑ (retinaface-arcface)" in table_rows[0] and "BRISQUE" in table_rows[0]
    assert md.count("**") >= 4  # a best value marked in each of the two columns
    assert run.table.strip() in md
    assert (out / "results.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "sheets").iterdir()) == ["alice.png", "bob.png"]
    # One progress line per finished cell, with the plan's ETA; one --jsonl record per cell.
    assert len(env["lines"]) == 8 and "ETA" in env["lines"][0] and env["lines"][-1].endswith("done")
    assert [r["cell"] for r in env["records"]] == [c["cell"] for c in run.cells]
    # Upstream steps are shared: 2 protect + 4 purify + 8 attack + 8 score folders.
    markers = list((out / "cells").rglob("*.step.json"))
    assert sorted(Counter(json.loads(p.read_text())["verb"] for p in markers).items()) == \
        [("attack", 8), ("protect", 2), ("purify", 4), ("score", 8)]


def test_numbers_equal_the_verbs_by_hand(env, tmp_path):
    """The cell photoguard → jpeg → dreambooth on alice, typed as a user would, gives the same files and scores."""
    import cloak

    ids, cell = env["root"] / "ids" / "alice", env["out"] / "cells" / CELL[0]
    cloak.protect(ids / "protect", tmp_path / "p", method="photoguard", tiny=True, seed=0,
                  options={"steps": "1"})
    cloak.purify(tmp_path / "p", tmp_path / "q", method="jpeg", tiny=True, seed=0,
                 options={"quality": "75"})
    cloak.attack(tmp_path / "q", tmp_path / "a", method="dreambooth", tiny=True, seed=0, steps=1,
                 num_images=1, sample_steps=1, prompts=["a photo of sks person"], options={"class_images": "0"})
    report = cloak.score(tmp_path / "a" / "gen", ref=ids / "ref", metrics=["fdfr", "brisque"], tiny=True, seed=0)
    for mine, theirs in ((tmp_path / "p", cell / "alice" / "protect"),
                         (tmp_path / "q", cell / CELL[1] / "alice" / "purify"),
                         (tmp_path / "a" / "gen", cell / CELL[1] / CELL[2] / "alice" / "attack" / "gen")):
        a, b = tree_bytes(mine), tree_bytes(theirs)
        pngs = [k for k in a if k.endswith(".png")]
        assert pngs and {k: a[k] for k in pngs} == {k: b[k] for k in pngs}
    values = csv_values(env["out"])
    for metric in ("fdfr", "brisque"):
        by_hand = report["summary"]["metrics"][metric]["mean"]
        assert float(values[("photoguard:steps=1", "jpeg:quality=75", "dreambooth", "alice", metric)]) == by_hand


def test_second_run_all_cached_and_byte_identical(env, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(env["out"], out)
    before = tree_bytes(out / "cells")
    r = run_cli("eval", "--dry-run", env["root"] / "plan.toml", out)
    assert "22 cached, 0 to resume, 0 to run" in r.stdout
    r = run_cli("eval", "--jsonl", env["root"] / "plan.toml", out)
    assert r.exit_code == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 8 and all(rec["cached"] for rec in records)
    assert tree_bytes(out / "cells") == before
    assert csv_values(out) == csv_values(env["out"])


def test_dry_run_lists_the_steps_and_runs_nothing(tmp_path):
    make_identities(tmp_path)
    (tmp_path / "plan.toml").write_text(PLAN)
    r = run_cli("eval", "--dry-run", tmp_path / "plan.toml", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert "= 8 cells" in r.stdout and "22 distinct steps" in r.stdout
    assert "0 cached, 0 to resume, 22 to run" in r.stdout and "model passes" in r.stdout
    assert not (tmp_path / "out").exists()


def test_changed_option_interrupted_then_resumed(env, tmp_path):
    """quality 75 → 60: only the 4 jpeg cells are redone (protect steps kept); a SIGINT after the first of
    them finishes loses nothing: the rerun keeps that cell and completes the rest."""
    root = tmp_path
    shutil.copytree(env["root"] / "ids", root / "ids")
    shutil.copytree(env["out"], root / "out")
    (root / "plan.toml").write_text(PLAN.replace("jpeg:quality=75", "jpeg:quality=60"))
    before = tree_bytes(root / "out" / "cells")
    cmd = [sys.executable, "-m", "cloak", "eval", "--jsonl", str(root / "plan.toml"), str(root / "out")]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "CLOAK_CACHE_DIR": env["cache"]}
    proc = subprocess.Popen(cmd, cwd=root, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = []
    for line in proc.stdout:
        rec = json.loads(line)
        first.append(rec)
        if not rec["cached"]:  # the first recomputed cell is on disk: interrupt
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=600)
    assert proc.returncode == 130, rest[1]
    first += [json.loads(line) for line in rest[0].splitlines() if line.strip()]  # any cell done before the signal
    interrupted_cell = next(rec["cell"] for rec in first if not rec["cached"])
    assert "quality=60" in interrupted_cell

    r = run_cli("eval", "--jsonl", root / "plan.toml", root / "out")
    assert r.exit_code == 0, r.stderr
    records = {rec["cell"]: rec for rec in map(json.loads, r.stdout.splitlines())}
    assert len(records) == 8 and all(rec["status"] == "ok" for rec in records.values())
    redone = sorted(c for c, rec in records.items() if not rec["cached"])
    assert interrupted_cell not in redone  # finished before the SIGINT: kept
    assert all("quality=60" in c for c in redone) and len(redone) == 4 - sum(
        1 for rec in first if not rec["cached"])
    after = tree_bytes(root / "out" / "cells")
    # Every file outside the jpeg folders is byte for byte what the first run wrote (protect steps shared).
    kept = {k: v for k, v in before.items() if "jpeg_quality" not in k}
    assert {k: after[k] for k in kept} == kept
    assert any("jpeg_quality=60" in k for k in after)
    old, new = csv_values(env["out"]), csv_values(root / "out")
    for key, value in new.items():
        if key[1] == "none":
            assert old[key] == value


BAD_PLANS = {
    "unknown method": ('protect = ["aspl", "nosuch"]', ["unknown protect method 'nosuch'"]),
    "bad option": ('purify = ["jpeg:qualty=75"]', ["unknown option 'qualty'", "did you mean 'quality'"]),
    "bad option value": ('purify = ["jpeg:quality=abc"]', ["jpeg: invalid option value"]),
    "unknown metric": ('score = ["fdfr", "ismm"]', ["unknown metric 'ismm'", "did you mean 'ism'"]),
    "missing identity": ('identities = "nobody/*"', ["matches no folder"]),
    "bad seeds": ('seeds = [-1]', ["grid.seeds"]),
}


def _bad_plan(tmp_path: Path, change: str) -> Path:
    make_identities(tmp_path)
    key = change.split("=")[0].strip()
    lines = [change if line.startswith(key + " ") else line for line in PLAN.splitlines()]
    if change not in lines:
        lines.insert(lines.index("[grid]") + 1, change)
    (tmp_path / "plan.toml").write_text("\n".join(lines) + "\n")
    return tmp_path / "plan.toml"


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_bad_plan_is_exit_2_before_any_work(tmp_path, case):
    change, expected = BAD_PLANS[case]
    plan = _bad_plan(tmp_path, change)
    r = run_cli("eval", plan, tmp_path / "out")
    assert r.exit_code == 2, r.stderr
    for text in expected:
        assert text in r.stderr
    assert not (tmp_path / "out").exists()


def test_bad_plan_lists_every_problem_at_once(tmp_path):
    make_identities(tmp_path)
    (tmp_path / "ids" / "carol").mkdir()  # no protect/ folder
    text = PLAN.replace('["none", "photoguard:steps=1"]', '["none", "nosuch", {eps = 8}]') \
        .replace('score = ["fdfr", "brisque"]', 'score = ["fdfr", "nope"]').replace("[common]", "[common]\nmodle = 1")
    (tmp_path / "plan.toml").write_text(text + "[extra]\n")
    r = run_cli("eval", tmp_path / "plan.toml", tmp_path / "out")
    assert r.exit_code == 2
    for text in ("unknown section [extra]", "common.modle", "identity carol: no protect/", "'nosuch'",
                 "needs method", "'nope'", "6 problem(s)"):
        assert text in r.stderr, text
    assert not (tmp_path / "out").exists()


def test_ray_missing_is_exit_2_naming_the_extra(tmp_path, monkeypatch):
    make_identities(tmp_path)
    (tmp_path / "plan.toml").write_text(PLAN)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    r = run_cli("eval", "--executor", "ray", tmp_path / "plan.toml", tmp_path / "out")
    assert r.exit_code == 2 and "cloak[cluster]" in r.stderr
    assert not (tmp_path / "out").exists()


def test_failing_cell_is_recorded_and_exit_5(tmp_path):
    write_images(tmp_path / "ids" / "good" / "protect", n=1, size=(64, 64))
    (tmp_path / "ids" / "broken" / "protect").mkdir(parents=True)
    (tmp_path / "ids" / "broken" / "protect" / "x.png").write_bytes(b"not a png")
    text = PLAN.replace('["none", "photoguard:steps=1"]', '["photoguard:steps=1"]') \
        .replace('["none", "jpeg:quality=75"]', '["none"]').replace('["fdfr", "brisque"]', '["brisque"]')
    (tmp_path / "plan.toml").write_text(text)
    r = run_cli("eval", tmp_path / "plan.toml", tmp_path / "out")
    assert r.exit_code == 5, r.stderr
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    cells = {c["identity"]: c for c in doc["cells"]}
    assert cells["good"]["status"] == "ok" and cells["broken"]["status"] == "failed"
    assert cells["broken"]["error"].startswith("protect:")
    assert cells["broken"]["steps"]["attack"]["status"] == "blocked"
    assert "1 of 2 cells failed" in r.stderr


@pytest.mark.ray
def test_ray_executor_same_results(env, tmp_path):
    """bob's 4 cells recomputed as Ray tasks (2 actors on a local 2-CPU cluster), alice's cached: the table
    equals the local one."""
    ray = pytest.importorskip("ray")
    from cloak.eval import run_eval

    out = tmp_path / "out"
    shutil.copytree(env["out"], out)
    for marker in out.joinpath("cells").rglob("*.step.json"):
        if json.loads(marker.read_text())["identity"] == "bob":
            marker.unlink()
    # Two intra-op threads in each actor, as in this process (conftest): Ray's default for a 1-CPU actor is
    # one, and another thread count sums floats in another order (BRISQUE then differs in the 4th digit).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "CLOAK_CACHE_DIR": env["cache"],
                                       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}})
    try:
        run = run_eval(env["root"] / "plan.toml", out, executor="ray", workers=2)
    finally:
        ray.shutdown()
    assert all(c["status"] == "ok" for c in run.cells)
    assert sorted(c["identity"] for c in run.cells if not c["cached"]) == ["bob"] * 4
    local = csv_values(env["out"])
    for key, value in csv_values(out).items():
        assert float(value) == pytest.approx(float(local[key]), rel=1e-3, abs=1e-6), key



