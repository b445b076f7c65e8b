"""Image directories: ordering, hidden files, EXIF, modes, cropping, atomic metadata-free writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cloak.errors import InputError, OutputExistsError
from cloak.io.images import fit, list_images, natural_key, read_images, to_uint8, write_png


def test_natural_sort_and_hidden(tmp_path):
    for name in ["img10.png", "img2.png", "img1.png", ".hidden.png", "Img3.PNG", "x.txt"]:
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG") if name.endswith((".png", ".PNG")) else \
            (tmp_path / name).write_text("x")
    (tmp_path / ".git").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".git" / "a.png")
    assert [p.name for p in list_images(tmp_path)] == ["img1.png", "img2.png", "Img3.PNG", "img10.png"]
    assert natural_key("a2") < natural_key("a10")


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 270 when displayed: width and height swap
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    s = read_images(tmp_path, None)
    assert tuple(s.pixels.shape[-2:]) == (40, 20)  # H×W after orientation


def test_fit_resizes_short_side_and_centre_crops():
    img = Image.new("RGB", (200, 100))
    out = fit(img, 64)
    assert out.size == (64, 64)


def test_sizes_must_match_without_resolution(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (12, 10)).save(tmp_path / "b.png")
    with pytest.raises(InputError, match="--resolution"):
        read_images(tmp_path, None)
    assert read_images(tmp_path, 16).pixels.shape == (2, 3, 16, 16)


def test_values_in_range_and_exact_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    s = read_images(tmp_path, None)
    assert s.pixels.min() >= -1 and s.pixels.max() <= 1
    assert np.array_equal(to_uint8(s.pixels[0]), arr)
    assert len(s.items[0].sha256) == 64


def test_write_png_strips_metadata_and_refuses_overwrite(tmp_path):
    path = tmp_path / "sub" / "x.png"
    write_png(path, torch.zeros(3, 8, 8))
    with Image.open(path) as img:
        assert img.format == "PNG" and not img.info.get("exif") and not img.getexif()
    with pytest.raises(OutputExistsError):
        write_png(path, torch.zeros(3, 8, 8))
    write_png(path, torch.ones(3, 8, 8), force=True)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_keep_going_collects_failures(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="bad.png"):
        read_images(tmp_path, 8)
    s = read_images(tmp_path, 8, keep_going=True)
    assert s.names == ["ok"] and s.failures[0][0].name == "bad.png"


def test_nested_names_keep_relative_stem(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.jpg")
    assert read_images(tmp_path, 8).names == ["a/x"]
