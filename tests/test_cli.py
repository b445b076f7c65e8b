"""The CLI as a user meets it: help, exit codes, stdout/stderr split, bad input, config precedence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, write_images
from PIL import Image

ASPL_FAST = [*TINY, "-o", "iterations=1", "-o", "surrogate_steps=1", "-o", "pgd_steps=1"]


def test_help_lists_verbs(cli):
    r = cli("--help")
    assert r.exit_code == 0
    for verb in ("protect", "purify", "attack", "score", "models", "methods"):
        assert verb in r.stdout


@pytest.mark.parametrize("verb", ["protect", "purify", "attack", "score", "models", "methods", "config"])
def test_every_verb_has_help_with_examples(cli, verb):
    r = cli(verb, "--help")
    assert r.exit_code == 0, r.stderr
    assert "Usage" in r.stdout
    if verb in ("protect", "purify", "attack", "score", "models"):
        assert "Examples" in r.stdout


def test_cli_import_does_not_import_torch():
    code = "import sys, cloak.cli; import cloak.cli._docs; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_version(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith("cloak ")


def test_unknown_method_suggests(cli, image_dir, tmp_path):
    r = cli("protect", "--method", "apsl", image_dir, tmp_path / "out")
    assert r.exit_code == 2
    assert "did you mean 'aspl'" in r.stderr
    assert r.stdout == ""


def test_unknown_option_suggests(cli, image_dir, tmp_path):
    r = cli("protect", *TINY, "-o", "pgd_step=3", image_dir, tmp_path / "out")
    assert r.exit_code == 2
    assert "did you mean 'pgd_steps'" in r.stderr


def test_bad_option_value_is_usage_error(cli, image_dir, tmp_path):
    r = cli("protect", *TINY, "-o", "pgd_steps=many", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "pgd_steps" in r.stderr


def test_missing_input_dir(cli, tmp_path):
    r = cli("protect", *ASPL_FAST, tmp_path / "nope", tmp_path / "out")
    assert r.exit_code == 3
    assert "nope" in r.stderr
    assert not (tmp_path / "out").exists()


def test_empty_input_dir(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("purify", tmp_path / "empty", tmp_path / "out")
    assert r.exit_code == 3 and "no images" in r.stderr


def test_unreadable_image_names_the_file(cli, image_dir, tmp_path):
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    r = cli("purify", "--method", "jpeg", image_dir, tmp_path / "out")
    assert r.exit_code == 3
    assert "broken.png" in r.stderr
    assert not (tmp_path / "out" / "img0.png").exists()


def test_keep_going_writes_the_rest_and_exits_5(cli, image_dir, tmp_path):
    (image_dir / "broken.jpg").write_bytes(b"garbage")
    r = cli("purify", "--method", "jpeg", "--keep-going", "--json", image_dir, tmp_path / "out")
    assert r.exit_code == 5
    report = json.loads(r.stdout)
    statuses = {Path(i["input"]).name: i["status"] for i in report["items"]}
    assert statuses["broken.jpg"] == "failed" and statuses["img0.png"] == "ok"
    assert (tmp_path / "out" / "img2.png").is_file()
    assert (tmp_path / "out" / "report.json").is_file()


def test_no_overwrite_without_force_then_resume_and_force(cli, image_dir, tmp_path):
    out = tmp_path / "out"
    assert cli("purify", "--method", "jpeg", image_dir, out).exit_code == 0
    before = (out / "img0.png").stat().st_mtime_ns
    r = cli("purify", "--method", "jpeg", image_dir, out)
    assert r.exit_code == 2 and "--force" in r.stderr
    r = cli("purify", "--method", "jpeg", "--resume", "--json", image_dir, out)
    assert r.exit_code == 0
    # Nothing was redone: each item is the earlier run's record, kept (a no-op resume keeps the report).
    items = json.loads(r.stdout)["items"]
    assert {i["status"] for i in items} == {"ok"} and all(i.get("kept_from") for i in items)
    assert (out / "img0.png").stat().st_mtime_ns == before
    assert cli("purify", "--method", "jpeg", "--force", image_dir, out).exit_code == 0
    assert cli("purify", "--force", "--resume", image_dir, out).exit_code == 2


def test_same_input_and_output_refused(cli, image_dir):
    r = cli("purify", image_dir, image_dir)
    assert r.exit_code == 2 and "same" in r.stderr


def test_missing_model_exits_4_with_pull_command(cli, image_dir, tmp_path):
    r = cli("protect", "--model", "sd21-base", image_dir, tmp_path / "out")
    assert r.exit_code == 4
    assert "cloak models pull sd21-base" in r.stderr
    assert "--tiny" in r.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_model_id(cli, image_dir, tmp_path):
    r = cli("protect", "--model", "sd21-bse", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "did you mean 'sd21-base'" in r.stderr


def test_json_goes_to_stdout_and_only_json(cli, image_dir, tmp_path):
    r = cli("protect", *ASPL_FAST, "--json", image_dir, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["schema"] == "cloak.report/1"
    assert report["summary"]["stand_in"] is True
    assert any("protects nothing" in w for w in report["warnings"])
    assert "protects nothing" in r.stderr


def test_default_stdout_is_output_path(cli, image_dir, tmp_path):
    r = cli("purify", image_dir, tmp_path / "out")
    assert r.exit_code == 0
    assert r.stdout.strip() == str(tmp_path / "out")


def test_quiet_keeps_stdout_and_silences_stderr(cli, image_dir, tmp_path):
    r = cli("purify", "-q", image_dir, tmp_path / "out")
    assert r.exit_code == 0
    assert r.stdout == f"{tmp_path / 'out'}\n"  # -q changes stderr only (README: stdout per mode)
    assert r.stderr == ""


def test_jsonl_one_record_per_item(cli, image_dir, tmp_path):
    r = cli("purify", "--jsonl", image_dir, tmp_path / "out")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 3 and all(rec["status"] == "ok" for rec in lines)


def test_config_precedence_and_sources(cli, image_dir, tmp_path):
    (tmp_path / "cloak.toml").write_text('[protect]\nmethod = "aspl"\n[protect.aspl]\npgd_steps = 2\n'
                                         'iterations = 1\nsurrogate_steps = 1\nclass_images = 2\n'
                                         '[defaults]\nseed = 7\n')
    r = cli("protect", "--tiny", "--json", "-o", "iterations=1", image_dir, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["options"]["pgd_steps"] == {"value": 2, "source": "config"}
    assert rep["options"]["iterations"] == {"value": 1, "source": "-o"}
    assert rep["options"]["eps"]["source"] == "default"
    assert rep["params"]["seed"] == {"value": 7, "source": "config"}
    assert rep["seed"] == 7


def test_config_unknown_section_is_usage_error(cli, image_dir, tmp_path):
    (tmp_path / "cloak.toml").write_text("[protekt]\nmethod = 'aspl'\n")
    r = cli("purify", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "protect" in r.stderr


def test_eps_unit_converts_and_is_recorded(cli, image_dir, tmp_path):
    r = cli("protect", *ASPL_FAST, "--eps", "8", "--eps-unit", "255", "--json", image_dir, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["options"]["unit"]["value"] == "255"
    assert rep["summary"]["budget"]["eps_m11"] == pytest.approx(16 / 255)
    # the default step (0.005 m11) is converted to the new unit, not reinterpreted
    assert rep["options"]["alpha"]["value"] == pytest.approx(0.005 * 127.5)
    assert max(i["linf_255"] for i in rep["items"]) <= 8


def test_bad_eps_unit(cli, image_dir, tmp_path):
    r = cli("protect", *TINY, "--eps-unit", "percent", image_dir, tmp_path / "out")
    assert r.exit_code == 2


def test_methods_listing_and_show(cli):
    r = cli("methods")
    assert r.exit_code == 0 and "protect\taspl" in r.stdout and "score\tism" in r.stdout
    r = cli("methods", "show", "aspl")
    assert r.exit_code == 0 and "pgd_steps" in r.stdout and "Anti-DreamBooth" in r.stdout
    r = cli("methods", "protect", "aspl", "--json")
    assert json.loads(r.stdout)["options"]
    assert cli("methods", "aspk").exit_code == 2


def test_models_list_path_verify(cli):
    r = cli("models", "list", "--json")
    rows = {row["id"]: row for row in json.loads(r.stdout)}
    assert {"sd21-base", "sd15", "sd14", "retinaface-r50", "arcface-irse50", "tiny-sd"} <= set(rows)
    assert rows["sd21-base"]["stand_in"] == "tiny-sd"
    r = cli("models", "path", "tiny-sd")
    assert r.exit_code == 0 and (Path(r.stdout.strip()) / "model_index.json").is_file()
    r = cli("models", "path", "sd15")
    assert r.exit_code == 4 and "cloak models pull sd15" in r.stderr
    assert cli("models", "verify", "tiny-sd").exit_code == 0


def test_models_pull_offline_fails_cleanly(cli, monkeypatch):
    monkeypatch.setenv("CLOAK_OFFLINE", "1")
    r = cli("models", "pull", "sd15")
    assert r.exit_code == 4 and "CLOAK_OFFLINE" in r.stderr


def test_completion_scripts(cli):
    for shell in ("bash", "zsh", "fish"):
        r = cli("completion", shell)
        assert r.exit_code == 0 and "cloak" in r.stdout and "protect" in r.stdout
    assert cli("completion", "tcsh").exit_code == 2


def test_config_show(cli, tmp_path):
    (tmp_path / "cloak.toml").write_text("[defaults]\ndevice = 'cpu'\n")
    r = cli("config", "show", "--json")
    data = json.loads(r.stdout)
    assert data["config_file"].endswith("cloak.toml")
    assert data["values"]["defaults"]["device"]["value"] == "cpu"


def test_input_files_never_modified(cli, image_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in image_dir.iterdir()}
    assert cli("protect", *ASPL_FAST, image_dir, tmp_path / "out").exit_code == 0
    assert {p.name: p.read_bytes() for p in image_dir.iterdir()} == before


def test_odd_inputs_are_read(cli, tmp_path):
    src = tmp_path / "odd"
    src.mkdir()
    Image.new("L", (50, 90), 128).save(src / "gray.png")
    Image.new("RGBA", (70, 40), (255, 0, 0, 0)).save(src / "alpha.png")
    Image.new("P", (64, 64)).save(src / "palette.gif")
    Image.new("RGB", (200, 64), (0, 10, 200)).save(src / "wide.jpg", quality=90)
    Image.new("I;16", (64, 64)).save(src / "deep.png")
    (src / ".hidden.png").write_bytes(b"x")
    (src / "notes.txt").write_text("not an image")
    r = cli("protect", *ASPL_FAST, "--fit", "crop", "--json", src, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    names = sorted(Path(i["output"]).name for i in json.loads(r.stdout)["items"])
    assert names == ["alpha.png", "deep.png", "gray.png", "palette.png", "wide.png"]
    for name in names:
        with Image.open(tmp_path / "out" / name) as img:
            assert img.mode == "RGB" and img.size == (64, 64)


def test_tiny_image_is_an_input_error_not_a_crash(cli, tmp_path):
    src = write_images(tmp_path / "imgs", n=1)
    Image.new("RGB", (1, 1)).save(src / "dot.png")
    # --fit crop: 1×1 is upscaled to the working square like any small image, and that square is the output.
    r = cli("protect", *ASPL_FAST, "--fit", "crop", src, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    # --fit keep returns a 1×1 photo: the working perturbation averaged down to one pixel rounds away, and
    # an output identical to its input is a failed item that says so, not a crash and not a success.
    r = cli("protect", *ASPL_FAST, src, tmp_path / "keep")
    assert r.exit_code in (0, 5) and "Traceback" not in r.stderr, r.stderr
    if r.exit_code == 5:
        assert "dot.png" in r.stderr and "identical to its input" in r.stderr


def _photo_with_metadata(folder: Path) -> Path:
    """A JPEG as a phone writes it: camera make, GPS position, orientation 6, an sRGB ICC profile."""
    from PIL import ExifTags, ImageCms

    folder.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "TestCam"
    exif.get_ifd(ExifTags.IFD.GPSInfo).update({1: "N", 2: (52.0, 31.0, 12.0)})
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    img.save(folder / "phone.jpg", exif=exif, icc_profile=icc, dpi=(300, 300), quality=95)
    return folder


@pytest.mark.parametrize("verb", ["protect", "purify"])
def test_metadata_is_stripped_unless_kept(cli, tmp_path, verb):
    src = _photo_with_metadata(tmp_path / "src")
    args = [*ASPL_FAST] if verb == "protect" else ["--method", "gaussian", "--tiny"]
    assert cli(verb, *args, src, tmp_path / "plain").exit_code == 0
    with Image.open(tmp_path / "plain" / "phone.png") as img:
        assert not img.getexif() and "icc_profile" not in img.info and "dpi" not in img.info
    r = cli(verb, *args, "--keep-metadata", "--json", src, tmp_path / "kept")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["params"]["keep_metadata"] == {"value": True, "source": "flag"}
    with Image.open(tmp_path / "kept" / "phone.png") as img, Image.open(src / "phone.jpg") as orig:
        exif = img.getexif()
        assert exif[0x010F] == "TestCam" and exif[0x0112] == 1  # pixels are already upright
        assert exif.get_ifd(0x8825)[1] == "N"
        assert img.info["icc_profile"] == orig.info["icc_profile"]
        assert round(img.info["dpi"][0]) == 300


def test_paths_on_stdin(cli, tmp_path, monkeypatch):
    """`find … | cloak purify - out/`: listed order kept, names relative to the common folder, a folder expands."""
    import io

    a = write_images(tmp_path / "shoot" / "a", n=2, seed=1)
    b = write_images(tmp_path / "shoot" / "b", n=1, seed=2)
    listing = f"{b / 'img0.png'}\n\n{a}\n{a / 'img1.png'}\n"  # a blank line, a folder, a file listed twice
    monkeypatch.setattr("sys.stdin", io.StringIO(listing))
    r = cli("purify", "--method", "gaussian", "--tiny", "--json", "-", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    outputs = [Path(i["output"]).relative_to(tmp_path / "out").as_posix() for i in json.loads(r.stdout)["items"]]
    assert outputs == ["b/img0.png", "a/img0.png", "a/img1.png"]

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{a / 'img0.png'}\n{tmp_path / 'gone.png'}\n"))
    r = cli("protect", *ASPL_FAST, "-", tmp_path / "out2")
    assert r.exit_code == 3 and "line 2" in r.stderr and "gone.png" in r.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("flags, message", [
    (["--device", "foo"], "unknown --device"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--resolution", "0"], "--resolution must be a positive"),
    (["--resolution", "12"], "multiple of 8"),
])
def test_bad_run_flags_are_usage_errors_before_any_work(cli, image_dir, tmp_path, flags, message):
    r = cli("protect", *ASPL_FAST, *flags, image_dir, tmp_path / "out")
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_model_path_that_does_not_exist_is_named_as_a_directory(cli, image_dir, tmp_path):
    r = cli("attack", "--tiny", "--model", tmp_path / "no-such-model", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "model directory" in r.stderr and "no-such-model" in r.stderr


def test_out_of_memory_is_one_line_with_a_hint(cli, image_dir, tmp_path, monkeypatch):
    import torch

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    import importlib

    monkeypatch.setattr(importlib.import_module("cloak.protect.run"), "run_protect", oom)
    r = cli("protect", *ASPL_FAST, image_dir, tmp_path / "out")
    assert r.exit_code == 1 and "out of memory" in r.stderr and "pgd_batch" in r.stderr
    assert "Traceback" not in r.stderr
