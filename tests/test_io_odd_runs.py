"""Runs a user makes with odd folders and files (wave 5 I/O pass): each case was a bug on the code before
it, found at a terminal."""

from __future__ import annotations

import json

import numpy as np
from conftest import write_images
from PIL import Image


def test_output_inside_input_is_not_read_back_as_input(cli, tmp_path):
    """`cloak purify photos photos/out` twice: the second run must not purify photos/out/*.png again into
    photos/out/out/ (each rerun nested one level deeper)."""
    folder = write_images(tmp_path / "photos", n=2)
    out = folder / "out"
    assert cli("purify", "-q", "--method", "jpeg", folder, out).exit_code == 0
    r = cli("purify", "-q", "--method", "jpeg", "--resume", folder, out)
    assert r.exit_code == 0, r.stderr
    assert not (out / "out").exists()
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert sorted(i["input"] for i in report["items"]) == [str(folder / "img0.png"), str(folder / "img1.png")]
    assert cli("purify", "-q", "--method", "jpeg", "--force", folder, out).exit_code == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["img0.png", "img1.png"]


def test_output_inside_input_protect(cli, tmp_path):
    folder = write_images(tmp_path / "photos", n=1)
    out = folder / "protected"
    args = ["protect", "-q", "--method", "advdm", "--tiny", "--effort", "0.01"]
    assert cli(*args, folder, out).exit_code == 0
    r = cli(*args, "--force", folder, out)
    assert r.exit_code == 0, r.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["img0.png"]


def test_purify_stops_at_a_broken_input_before_writing_anything(cli, tmp_path):
    """A broken file after good ones: exit 3 naming it, and no outputs without a report left behind (the rerun
    then failed with 'outputs already exist')."""
    folder = write_images(tmp_path / "in", n=2)
    (folder / "zz.png").write_bytes(b"")
    out = tmp_path / "out"
    r = cli("purify", "--method", "jpeg", folder, out)
    assert r.exit_code == 3 and str(folder / "zz.png") in r.stderr, r.stderr
    assert not out.exists() or not list(out.rglob("*.png"))
    (folder / "zz.png").unlink()
    r = cli("purify", "-q", "--method", "jpeg", folder, out)
    assert r.exit_code == 0, r.stderr
