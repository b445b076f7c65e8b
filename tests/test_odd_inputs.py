"""Odd and broken input files (issue 14 item 22): each is read correctly or is an input error naming the
file (exit 3), never a crash (exit 1); two inputs with one output name are refused before any work."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images
from PIL import Image

from cloak.io.images import load_pil

GRADIENT16 = (np.arange(32 * 32, dtype=np.uint32) * 64).astype(np.uint16).reshape(32, 32)  # 0 … 65472


def _png16(path: Path, samples: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): color type 0 grey, 2 RGB, 4 grey+alpha."""
    h, w = samples.shape[:2]
    raw = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _bomb_png(path: Path) -> Path:
    """A valid PNG header claiming 100000×100000 pixels (the data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _asymmetric() -> np.ndarray:
    y, x = np.mgrid[0:24, 0:40]
    return np.stack([x * 6, y * 10, (x + y) * 3], -1).astype(np.uint8)


# --- 16-bit ---------------------------------------------------------------------------------------------

def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(GRADIENT16).save(path)
    assert Image.open(path).mode.startswith("I")
    got = np.asarray(load_pil(path))
    expected = np.rint(GRADIENT16 / 257.0).astype(np.uint8)
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 0], got[..., 2])
    assert got.mean() == pytest.approx(127, abs=2)  # clipping at 255 gave ~251


def test_16bit_rgb_and_grey_alpha_pngs(tmp_path):
    rgb = np.stack([GRADIENT16, GRADIENT16 // 2, 65535 - GRADIENT16], -1)
    got = np.asarray(load_pil(_png16(tmp_path / "rgb16.png", rgb, 2))).astype(int)
    assert np.abs(got - rgb / 257.0).max() <= 1
    opaque = np.full_like(GRADIENT16, 65535)
    grey_alpha = np.asarray(load_pil(_png16(tmp_path / "la16.png", np.stack([GRADIENT16, opaque], -1), 4)))
    assert np.abs(grey_alpha[..., 1].astype(int) - GRADIENT16 / 257.0).max() <= 1


def test_16bit_tiff_and_float_tiff(tmp_path):
    Image.fromarray(GRADIENT16).save(tmp_path / "g16.tif")
    got = np.asarray(load_pil(tmp_path / "g16.tif"))[..., 0]
    assert np.array_equal(got, np.rint(GRADIENT16 / 257.0).astype(np.uint8))
    Image.fromarray((GRADIENT16 / 65535.0).astype(np.float32)).save(tmp_path / "f.tif")
    got = np.asarray(load_pil(tmp_path / "f.tif"))[..., 0].astype(int)
    assert np.abs(got - GRADIENT16 / 257.0).max() <= 1


# --- EXIF orientation ------------------------------------------------------------------------------------

# The stored pixels for each orientation tag: the upright picture under the inverse of the tag's transform.
_STORE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
          7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_1_to_8_read_upright(tmp_path, orientation):
    upright = Image.fromarray(_asymmetric())
    stored = upright if _STORE[orientation] is None else upright.transpose(_STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    stored.save(path, exif=exif.tobytes())
    assert np.array_equal(np.asarray(load_pil(path)), np.asarray(upright))


# --- the corpus, through the CLI ---------------------------------------------------------------------------

def _good(path: Path, size=(16, 16)) -> Path:
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)
    return path


def _readable_cases(folder: Path) -> dict[str, tuple[Path, np.ndarray | None]]:
    """name → (file, the RGB pixels it must read as, or None to only require a clean read)."""
    cases = {}
    folder.mkdir(parents=True)
    one = folder / "one.png"
    Image.fromarray(np.array([[[10, 200, 30]]], np.uint8)).save(one)
    cases["1x1"] = (one, np.array([[[10, 200, 30]]], np.uint8))
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 4, 8))
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    expected = np.zeros((8, 8, 3), np.uint8)
    expected[:, :4] = (0, 0, 255)
    expected[:, 4:] = 255  # transparent: composited on white
    cases["palette+transparency"] = (folder / "palette.png", expected)
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(folder / "cmyk.jpg", quality=100)
    cases["cmyk jpeg"] = (folder / "cmyk.jpg", None)
    rgb16 = np.stack([GRADIENT16, GRADIENT16 // 2, 65535 - GRADIENT16], -1)
    cases["16-bit rgb"] = (_png16(folder / "rgb16.png", rgb16, 2), None)
    Image.fromarray(GRADIENT16).save(folder / "grey16.png")
    cases["16-bit grey"] = (folder / "grey16.png", np.repeat(np.rint(GRADIENT16 / 257.0).astype(np.uint8)[..., None],
                                                            3, -1))
    la = Image.fromarray(np.stack([np.full((8, 8), 40, np.uint8), np.full((8, 8), 255, np.uint8)], -1), "LA")
    la.save(folder / "grey_alpha.png")
    cases["grey+alpha"] = (folder / "grey_alpha.png", np.full((8, 8, 3), 40, np.uint8))
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    cases["animated gif"] = (folder / "anim.gif", np.asarray(frames[0]))
    try:
        odd = folder / os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
        _good(odd)
        cases["non-utf-8 name"] = (odd, np.full((16, 16, 3), 90, np.uint8))
    except (OSError, UnicodeError):  # the file system refuses such names
        pass
    return cases


def _broken_cases(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    data = _good(folder / "full.jpg", (64, 64)).read_bytes()
    (folder / "full.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    _bomb_png(folder / "bomb.png")
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    return {p.stem: p for p in sorted(folder.iterdir())}


def test_readable_odd_inputs_read_correctly(tmp_path):
    for name, (path, expected) in _readable_cases(tmp_path / "odd").items():
        got = np.asarray(load_pil(path))
        assert got.ndim == 3 and got.shape[-1] == 3, name
        if expected is not None:
            assert np.array_equal(got, expected), name


def test_each_readable_odd_input_purifies_exit_0(cli, tmp_path):
    for name, (path, _) in _readable_cases(tmp_path / "odd").items():
        single = tmp_path / "in" / path.stem
        single.mkdir(parents=True)
        os.link(path, single / path.name)
        out = tmp_path / "out" / path.stem
        r = cli("purify", "-q", "--method", "jpeg", single, out)
        assert r.exit_code == 0, (name, r.stderr)
        assert (out / f"{path.stem}.png").is_file(), name
        json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_each_broken_input_is_exit_3_naming_it(cli, tmp_path):
    for name, path in _broken_cases(tmp_path / "broken").items():
        single = tmp_path / "in" / name
        single.mkdir(parents=True)
        if path.is_symlink():
            (single / path.name).symlink_to(path.resolve())
        else:
            os.link(path, single / path.name)
        verbs = [["purify", "--method", "jpeg"]]
        if name == "text":  # protect reads through the same load_pil; once is enough (it loads a model first)
            verbs.append(["protect", "--method", "advdm", "--tiny", "--effort", "0.01"])
        for verb in verbs:
            r = cli(*verb, single, tmp_path / "out" / name)
            assert r.exit_code == 3, (name, verb, r.stderr)
            assert str(single / path.name) in r.stderr, (name, r.stderr)


def test_directory_named_like_an_image_is_not_an_input(cli, tmp_path):
    folder = write_images(tmp_path / "in", n=1)
    (folder / "x.png").mkdir()
    _good(folder / "x.png" / "inner.png")
    out = tmp_path / "out"
    assert cli("purify", "-q", "--method", "jpeg", folder, out).exit_code == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if p.is_file()) == \
        ["img0.png", "x.png/inner.png"]


def test_keep_going_names_each_failed_file_on_stderr(cli, tmp_path):
    folder = write_images(tmp_path / "in", n=2)
    (folder / "broken.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    r = cli("purify", "--method", "jpeg", "--keep-going", folder, tmp_path / "out")
    assert r.exit_code == 5, r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2
    assert any(str(folder / "broken.png") in line and "cannot identify" in line for line in failed)
    assert any(str(folder / "empty.jpg") in line for line in failed)


def test_two_inputs_with_one_output_name_are_refused_before_any_work(cli, tmp_path, monkeypatch):
    import cloak.models.handle

    class NoModels:
        def __init__(self, *a, **k):
            raise AssertionError("a model was loaded")

    monkeypatch.setattr(cloak.models.handle, "Models", NoModels)
    folder = write_images(tmp_path / "in", n=2)
    Image.open(folder / "img0.png").save(folder / "img0.jpg")
    out = tmp_path / "out"
    for verb in (["purify", "--method", "jpeg"], ["protect", "--method", "advdm", "--tiny"]):
        r = cli(*verb, folder, out)
        assert r.exit_code == 2, r.stderr
        assert str(folder / "img0.jpg") in r.stderr and str(folder / "img0.png") in r.stderr
        assert "img0.png" in r.stderr and not out.exists()
    # A same-named file in another folder keeps its own output name (sub/img0.png): no conflict.
    (folder / "img0.jpg").unlink()
    write_images(folder / "sub", n=1)
    monkeypatch.undo()
    assert cli("purify", "-q", "--method", "jpeg", folder, out).exit_code == 0
    assert (out / "sub" / "img0.png").is_file() and (out / "img0.png").is_file()

