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


def _cutout(path, size=(48, 40)):
    """An RGBA photo-like image whose left third is fully transparent and a band half transparent."""
    rng = np.random.default_rng(3)
    rgb = np.asarray(Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC))
    alpha = np.full(size[::-1], 255, np.uint8)
    alpha[:, : size[0] // 3] = 0
    alpha[:5] = 128
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    return alpha


def test_purify_keeps_transparency_and_reports_the_conversion(cli, tmp_path):
    """An RGBA cut-out came back as an opaque RGB image on white, and the report did not say so."""
    folder = tmp_path / "in"
    folder.mkdir()
    alpha = _cutout(folder / "cut.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(folder / "grey.png")
    out = tmp_path / "out"
    r = cli("purify", "-q", "--method", "jpeg", folder, out)
    assert r.exit_code == 0, r.stderr
    written = Image.open(out / "cut.png")
    assert written.mode == "RGBA" and written.size == (48, 40)
    assert np.array_equal(np.asarray(written)[..., 3], alpha)
    items = {i["input"].rsplit("/", 1)[-1]: i for i in json.loads((out / "report.json").read_text())["items"]}
    assert items["cut.png"]["input_mode"] == "RGBA" and items["cut.png"]["output_mode"] == "RGBA"
    assert any("composited on white" in n for n in items["cut.png"]["conversion"])
    assert items["grey.png"]["input_mode"] == "L" and items["grey.png"]["output_mode"] == "RGB"
    assert Image.open(out / "grey.png").mode == "RGB"


def test_protect_keeps_transparency_at_native_size(cli, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    alpha = _cutout(folder / "cut.png", size=(70, 50))
    out = tmp_path / "out"
    r = cli("protect", "-q", "--method", "advdm", "--tiny", "--effort", "0.01", folder, out)
    assert r.exit_code == 0, r.stderr
    written = Image.open(out / "cut.png")
    assert written.mode == "RGBA" and written.size == (70, 50)
    assert np.array_equal(np.asarray(written)[..., 3], alpha)
    item = json.loads((out / "report.json").read_text())["items"][0]
    assert item["input_mode"] == "RGBA" and item["output_mode"] == "RGBA"


def test_animated_input_warns_that_only_the_first_frame_is_used(cli, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    frames = [Image.new("RGB", (32, 32), c) for c in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    out = tmp_path / "out"
    r = cli("purify", "--method", "jpeg", folder, out)
    assert r.exit_code == 0, r.stderr
    assert "only the first frame" in r.stderr and str(folder / "anim.gif") in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert any("first frame" in w for w in report["warnings"])
    assert any("first of 3 frames" in n for n in report["items"][0]["conversion"])


def test_score_warns_about_images_without_a_same_named_reference(cli, tmp_path):
    """Generated images with no same-named reference were 'ok' with null scores and a mean over the rest, and
    nothing on the terminal said so."""
    gen = write_images(tmp_path / "gen", n=3)
    ref = write_images(tmp_path / "ref", n=2, seed=1)  # img0, img1: gen's img2 has no reference
    r = cli("score", "--json", "--metric", "psnr,ssim", "--ref", ref, gen)
    assert r.exit_code == 0, r.stderr
    assert "1 of 3 images" in r.stderr and "img2" in r.stderr
    report = json.loads(r.stdout)
    assert any("no reference of the same name" in w for w in report["warnings"])
    flagged = {i["input"].rsplit("/", 1)[-1]: i.get("unpaired", False) for i in report["items"]}
    assert flagged == {"img0.png": False, "img1.png": False, "img2.png": True}
    assert report["summary"]["metrics"]["psnr"]["n"] == 2
    # All paired: no warning.
    r = cli("score", "--metric", "psnr", "--ref", ref, ref)
    assert r.exit_code == 0 and "no reference" not in r.stderr


def test_keep_metadata_from_a_tiff_drops_its_pixel_layout_and_fixes_sizes(cli, tmp_path):
    """--keep-metadata copied a TIFF's whole first IFD into the PNG: ImageWidth/ImageLength of the unrotated
    image, strip offsets, compression... And a phone JPEG's PixelX/YDimension kept the unrotated size."""
    folder = tmp_path / "in"
    folder.mkdir()
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "TestCam"
    photo.save(folder / "scan.tiff", exif=exif.tobytes())
    exif.get_ifd(0x8769).update({0xA002: 60, 0xA003: 40})
    photo.save(folder / "phone.jpg", exif=exif.tobytes(), quality=95)
    out = tmp_path / "out"
    assert cli("purify", "-q", "--method", "jpeg", "--keep-metadata", folder, out).exit_code == 0
    with Image.open(out / "scan.png") as img:
        assert img.size == (40, 60)
        tags = img.getexif()
        assert tags[0x010F] == "TestCam" and tags[0x0112] == 1
        assert not {256, 257, 259, 273, 279} & set(tags)
    with Image.open(out / "phone.png") as img:
        assert img.size == (40, 60)
        assert dict(img.getexif().get_ifd(0x8769)) == {0xA002: 40, 0xA003: 60}


def test_output_that_is_a_broken_symlink_says_so(cli, tmp_path):
    folder = write_images(tmp_path / "in", n=1)
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone")
    r = cli("purify", "--method", "jpeg", folder, out)
    assert r.exit_code == 2, r.stderr
    assert f"output {out} is a broken symbolic link" in r.stderr and str(tmp_path / "gone") in r.stderr
    (tmp_path / "gone").mkdir()  # the link's target made: the run writes through the link
    assert cli("purify", "-q", "--method", "jpeg", folder, out).exit_code == 0
    assert (tmp_path / "gone" / "img0.png").is_file()


def test_empty_file_and_dangling_link_say_what_they_are(cli, tmp_path):
    """Pillow's words were 'cannot identify image file' for a 0-byte file and 'No such file or directory' for
    a link that ls lists."""
    for name, make, expected in (("empty", lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
                                 ("dangling", lambda p: p.symlink_to(tmp_path / "moved.png"),
                                  f"broken symbolic link (to {tmp_path / 'moved.png'})")):
        folder = tmp_path / name
        folder.mkdir()
        make(folder / "a.png")
        r = cli("purify", "--method", "jpeg", folder, tmp_path / f"out-{name}")
        assert r.exit_code == 3, r.stderr
        assert f"cannot read image {folder / 'a.png'}: {expected}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_infinite_effort_and_huge_seed_are_usage_errors(cli, tmp_path):
    """--effort inf (or 1e308) and a seed past 64 bits ended in an OverflowError/ValueError, exit 1."""
    folder = write_images(tmp_path / "in", n=1)
    for flags, word in ((["--effort", "inf"], "--effort"), (["--effort", "1e308"], "--effort"),
                        (["--seed", str(2**70)], "--seed")):
        for verb in (["protect", "--method", "advdm", "--tiny"], ["purify", "--method", "jpeg"]):
            r = cli(*verb, *flags, folder, tmp_path / "out")
            assert r.exit_code == 2, (flags, verb, r.stderr)
            assert r.stderr.startswith(f"error: {word} must"), r.stderr
    assert cli("purify", "-q", "--method", "jpeg", "--seed", str(-(2**63)), folder, tmp_path / "out").exit_code == 0


def test_jsonl_of_one_verb_is_the_input_of_the_next(cli, tmp_path, monkeypatch):
    """STYLE's pipeline `cloak protect in out --jsonl | cloak purify - pur` failed: each JSON record was taken
    for a path ('standard input line 1: {"input": ...} does not exist')."""
    import io

    folder = write_images(tmp_path / "in", n=2)
    (folder / "broken.png").write_bytes(b"")
    first = cli("purify", "--method", "jpeg", "--jsonl", "--keep-going", folder, tmp_path / "mid")
    assert first.exit_code == 5  # the broken file: a failed record with no output, passed over below
    assert len(first.stdout.splitlines()) == 3
    monkeypatch.setattr("sys.stdin", io.StringIO(first.stdout))
    r = cli("purify", "--method", "gaussian", "--json", "-", tmp_path / "pur")
    assert r.exit_code == 0, r.stderr
    assert sorted(i["input"] for i in json.loads(r.stdout)["items"]) == \
        [str(tmp_path / "mid" / "img0.png"), str(tmp_path / "mid" / "img1.png")]
    assert sorted(p.name for p in (tmp_path / "pur").glob("*.png")) == ["img0.png", "img1.png"]
    monkeypatch.setattr("sys.stdin", io.StringIO('{"input": "x.png", "output": \n'))
    r = cli("purify", "--method", "gaussian", "-", tmp_path / "pur2")
    assert r.exit_code == 3 and "standard input line 1: neither a path nor a JSON record" in r.stderr, r.stderr


def test_a_very_long_strip_keeps_a_bounded_working_copy(cli, tmp_path):
    """A 4000×4 strip became a 64000×64 working copy under tiny-sd (6.8 GB, minutes; 512000×512 under SD):
    the long side is now held at MAX_ASPECT × the resolution, the output is still the photo's own size."""
    from cloak.io.images import MAX_ASPECT, working_copy

    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4000, 3), dtype=np.uint8))
    arr, placement = working_copy(strip, 64, "keep", grid=64)
    assert placement.work == (MAX_ASPECT * 64, 64) and arr.shape == (64, MAX_ASPECT * 64, 3)
    # Up to MAX_ASPECT:1 the short side is the resolution, as before.
    _, wide = working_copy(strip.resize((400, 100)), 64, "keep", grid=64)
    assert wide.content == (256, 64)
    folder = tmp_path / "in"
    folder.mkdir()
    strip.save(folder / "strip.png")
    out = tmp_path / "out"
    r = cli("protect", "--method", "advdm", "--tiny", "--effort", "0.01", folder, out)
    assert r.exit_code == 0, r.stderr
    assert "longer than 4:1" in r.stderr and str(folder / "strip.png") in r.stderr
    assert Image.open(out / "strip.png").size == (4000, 4)


def test_an_empty_metric_flag_is_a_usage_error(cli, tmp_path):
    """--metric '' (an empty shell variable) fell back to the default metrics (fdfr, ism) and failed with exit 4
    for a face model the user never asked for."""
    gen = write_images(tmp_path / "gen", n=1)
    for value in ("", ","):
        r = cli("score", "--metric", value, "--ref", gen, gen)
        assert r.exit_code == 2, r.stderr
        assert "names no metric" in r.stderr
