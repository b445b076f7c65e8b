"""Score gates and cloak.toml validation (issue 14 items 12 and 13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cloak.errors import UsageError
from cloak.score.gates import metric_name, parse_gate
from cloak.score.runner import _merge_extras


def _img(path: Path, value: int, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def _pair(tmp_path: Path, gen_value: int = 100, ref_value: int = 110) -> tuple[Path, Path]:
    _img(tmp_path / "g" / "a.png", gen_value)
    _img(tmp_path / "r" / "a.png", ref_value)
    return tmp_path / "g", tmp_path / "r"


def _toml(tmp_path: Path, text: str) -> None:
    (tmp_path / "cloak.toml").write_text(text)


# --- item 13: gates -------------------------------------------------------------------------------------------

def test_gate_on_an_undefined_value_fails_the_run(cli, tmp_path):
    gen, ref = _pair(tmp_path, 100, 100)  # identical: PSNR is undefined (+inf, null in JSON)
    r = cli("score", gen, "--ref", ref, "--metric", "psnr", "--fail-if", "psnr<40")
    assert r.exit_code == 6 and "undefined" in r.stderr
    r = cli("score", gen, "--ref", ref, "--metric", "psnr", "--fail-if", "psnr<40", "--undefined", "pass")
    assert r.exit_code == 0, r.stderr
    _toml(tmp_path, '[score]\nundefined = "pass"\n')
    assert cli("score", gen, "--ref", ref, "--metric", "psnr", "--fail-if", "psnr<40").exit_code == 0
    r = cli("score", gen, "--ref", ref, "--metric", "psnr", "--undefined", "maybe")
    assert r.exit_code == 2 and "fail, pass" in r.stderr


@pytest.mark.parametrize("text,key,message", [
    ("fail_if = 3", "score.fail_if", "a string or a list of strings"),
    ("fail_if = [1]", "score.fail_if", "a string or a list of strings"),
    ("fail_if = {a = 1}", "score.fail_if", "a string or a list of strings"),
    ("sheet = 3", "score.sheet", "a string"),
    ('per_subdir = "false"', "score.per_subdir", "true or false"),
    ("metrics = 3", "score.metrics", "a string or a list"),
    ('metrics = ["ism", "psnrr"]', "score.metrics", "did you mean 'psnr'"),
    ('fail_if = ["ism >> 1"]', "score.fail_if", "comparison"),
    ('undefined = "skip"', "score.undefined", "valid: fail, pass"),
])
def test_score_config_types_are_usage_errors_naming_the_key(cli, tmp_path, text, key, message):
    gen, ref = _pair(tmp_path)
    _toml(tmp_path, f"[score]\n{text}\n")
    r = cli("score", gen, "--ref", ref, "--metric", "psnr")
    assert r.exit_code == 2, r.stderr
    assert key in r.stderr and message in r.stderr and "cloak.toml" in r.stderr


def test_config_gate_applies_only_when_its_metric_is_computed(cli, tmp_path):
    gen, ref = _pair(tmp_path)
    _toml(tmp_path, '[score]\nfail_if = ["ism>0.35", "linf>5"]\n')
    r = cli("score", gen, "--ref", ref, "--metric", "psnr,linf", "--json")
    assert r.exit_code == 6  # linf>5 applies (10 > 5); the ism gate does not break the run
    assert "'ism>0.35' not applied" in r.stderr and "ism" in r.stderr
    rep = json.loads(r.stdout)
    assert [g["gate"] for g in rep["summary"]["gates"]] == ["linf>5"]
    assert any("not applied" in w for w in rep["warnings"])
    # a --fail-if gate on a metric not computed is still an error
    r = cli("score", gen, "--ref", ref, "--metric", "psnr", "--fail-if", "linf>5")
    assert r.exit_code == 2 and "not being computed" in r.stderr


def test_partial_failure_beats_a_failed_gate(cli, tmp_path):
    gen, ref = _pair(tmp_path)
    (gen / "b.png").write_bytes(b"not a png")
    _img(ref / "b.png", 110)
    r = cli("score", gen, "--ref", ref, "--metric", "linf", "--fail-if", "linf>5", "--keep-going")
    assert r.exit_code == 5
    assert "could not be read" in r.stderr and "gate failed: linf>5" in r.stderr
    r = cli("score", gen, "--ref", ref, "--metric", "linf", "--fail-if", "linf>50", "--keep-going")
    assert r.exit_code == 5


def test_metric_names_ignore_case(cli, tmp_path):
    assert metric_name("ISM", ["fdfr", "ism"], "--metric") == "ism"
    assert parse_gate("ISM>0.3", ["ism"]).metrics() == {"ism"}
    with pytest.raises(UsageError, match="did you mean 'ism'"):
        metric_name("ISMM", ["fdfr", "ism"], "--metric")
    gen, ref = _pair(tmp_path)
    r = cli("score", gen, "--ref", ref, "--metric", "PSNR,Linf", "--fail-if", "LINF>5")
    assert r.exit_code == 6
    assert r.stdout.splitlines()[0].startswith("psnr\t") and r.stdout.splitlines()[1].startswith("linf\t")
    r = cli("score", gen, "--ref", ref, "--metric", "PSNRR")
    assert r.exit_code == 2 and "did you mean 'psnr'" in r.stderr


def test_merge_extras_keeps_backend_and_figures():
    merged = _merge_extras([{"backend": "dlib", "ism_det": 0.5, "faces_detected": 2},
                            {"backend": "dlib", "ism_det": None, "faces_detected": 0},
                            {"backend": "dlib", "ism_det": 0.3, "faces_detected": 1}])
    assert merged == {"backend": "dlib", "ism_det": pytest.approx(0.4), "faces_detected": 3}
    assert _merge_extras([{"net": "alex"}, {"net": "vgg"}]) == {"net": {"per_subject": ["alex", "vgg"]}}


def test_per_subdir_keeps_extras_in_the_top_level_table(cli, tmp_path):
    for subject, value in (("alice", 90), ("bob", 120)):
        _img(tmp_path / "gen" / subject / "0.png", value, 64)
        _img(tmp_path / "ref" / subject / "0.png", 100, 64)
    r = cli("score", tmp_path / "gen", "--ref", tmp_path / "ref", "--per-subdir", "--tiny", "--metric", "lpips",
            "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    top = rep["summary"]["metrics"]["lpips"]["extras"]
    assert top["net"] == rep["summary"]["subjects"]["alice"]["metrics"]["lpips"]["extras"]["net"]


# --- item 12: cloak.toml validated at load --------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("[protekt]\nmethod = 'aspl'\n", "unknown section 'protekt' (did you mean 'protect'?)"),
    ("[protect.aspll]\npgd_steps = 2\n", "protect.aspll: unknown protect method 'aspll' (did you mean 'aspl'?)"),
    ("[protect.aspl]\npgd_step = 2\n", "did you mean 'pgd_steps'"),
    ("[protect.aspl]\npgd_steps = 'many'\n", "pgd_steps"),
    ("[protect.aspl]\neps = 0.05\n", "no unit"),
    ("[protect]\nmethod = 'aspll'\n", "protect.method = 'aspll'"),
    ("[protect]\nmetod = 'aspl'\n", "unknown key protect.metod (did you mean 'method'?)"),
    ("[protect]\neps = 8\n", "protect.eps"),
    ("[protect]\neps = '8/255'\neps_unit = 'm11'\n", "give one unit"),
    ("[protect]\nkeep_metadata = 'yes'\n", "protect.keep_metadata = 'yes' must be true or false"),
    ("[purify]\nseed = 1.5\n", "purify.seed = 1.5 must be an integer"),
    ("[defaults]\ndtype = 'fp64'\n", "defaults.dtype = 'fp64'"),
    ("[defaults]\ndevise = 'cpu'\n", "did you mean 'device'"),
    ("[models]\nsd21-base = 3\n", "models.sd21-base"),
    ("[score.ISN]\nbackend = 'dlib'\n", "did you mean 'ism'"),
    ("protect = 3\n", "protect must be a section"),
])
def test_config_is_validated_at_load_naming_file_and_key(cli, tmp_path, text, message):
    _toml(tmp_path, text)
    r = cli("config", "show")
    assert r.exit_code == 2, r.stdout
    stderr = " ".join(r.stderr.split())
    assert message in stderr and "cloak.toml" in stderr, stderr


def test_a_valid_config_loads(cli, tmp_path):
    _toml(tmp_path, '[defaults]\nseed = 3\n[protect]\nmethod = "aspl"\neps = "8/255"\nforce_budget = false\n'
                    '[protect.aspl]\npgd_steps = 2\nunit = "255"\neps = 4\nalpha = 1\n'
                    '[protect.advdm]\neps = "8lv"\n[score]\nmetrics = "psnr,ssim"\nfail_if = "psnr<30"\n'
                    'per_subdir = false\n[score.ism]\nbackend = "dlib"\n')
    r = cli("config", "show")
    assert r.exit_code == 0, r.stderr
    assert "protect.aspl" in r.stdout or "aspl" in r.stdout


# --- item 11: the model cache commands -------------------------------------------------------------------------

def test_models_verify_a_model_never_pulled_is_not_in_the_cache_exit_4(cli):
    r = cli("models", "verify", "sd15")
    assert r.exit_code == 4
    assert r.stdout == "sd15\tnot in the cache\n" and "FAILED" not in r.stdout + r.stderr
    assert "cloak models pull sd15" in r.stderr


def test_models_rm_of_a_model_never_there_removes_nothing(cli, tmp_path):
    r = cli("models", "rm", "--yes", "sd15")
    assert r.exit_code == 0 and "removed" not in r.stdout and r.stdout == ""
    assert "not in the cache" in r.stderr and "nothing removed" in r.stderr
    # an interrupted pull is named as such when removed
    from cloak.config import cache_dir

    partial = cache_dir() / "models" / "sd15"
    (partial / "unet").mkdir(parents=True)
    (partial / "unet" / "x.bin").write_bytes(b"0" * 2048)
    r = cli("models", "rm", "--yes", "sd15")
    assert r.exit_code == 0 and "removed incomplete download" in r.stdout and "2.0K" in r.stdout
    assert not partial.exists()


def test_model_id_suggestions_prefer_prefix_and_substring():
    from cloak.models.catalog import closest_ids, suggest_id

    assert closest_ids("sd21")[0] == "sd21-base"
    assert closest_ids("retina")[0] == "retinaface-r50"
    assert closest_ids("SD15")[0] == "sd15"
    assert suggest_id("sd21") == " (did you mean 'sd21-base'?)"
    assert suggest_id("zzzz") == ""


def test_model_flag_suggests_the_prefix_match(cli, image_dir, tmp_path):
    r = cli("protect", "--model", "sd21", "--eps", "4/255", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "did you mean 'sd21-base'" in r.stderr


def test_models_pull_without_network_says_so_and_how_to_go_on(cli, monkeypatch):
    import huggingface_hub
    import requests

    def offline(**_):
        try:
            raise OSError("[Errno -3] Temporary failure in name resolution")
        except OSError as inner:
            raise requests.exceptions.ConnectionError("HTTPSConnectionPool(host='huggingface.co'): Max retries "
                                                      "exceeded") from inner

    monkeypatch.delenv("CLOAK_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    r = cli("models", "pull", "sd15")
    assert r.exit_code == 4, r.stderr
    text = " ".join(r.stderr.split())
    assert "no network" in text and "--model DIR" in text and "mirror" in text and "models.sd15" in text
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 6
    from cloak.config import cache_dir

    assert not (cache_dir() / "models" / "sd15").exists()  # no empty folder left to look like a cached model
    # a failure that is not the network keeps its own message
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **_: (_ for _ in ()).throw(ValueError("bad")))
    r = cli("models", "pull", "sd15")
    assert r.exit_code == 4 and "no network" not in r.stderr and "bad" in r.stderr


def test_models_list_shows_sizes_on_disk(cli):
    assert cli("models", "path", "tiny-sd").exit_code == 0
    rows = {row["id"]: row for row in json.loads(cli("models", "list", "--json").stdout)}
    assert rows["tiny-sd"]["size_bytes"] > 0 and rows["sd15"]["size_bytes"] is None
    r = cli("models", "list")
    line = next(x for x in r.stdout.splitlines() if x.startswith("tiny-sd\t"))
    assert line.split("\t")[-1][-1] in "BKMG"  # piped: the TSV's last column; a terminal shows a table
