"""Every registered method of every verb meets the same contract on the built-in stand-ins.

Protect: output shape and range, ‖δ‖∞ ≤ ε after 8-bit rounding, same seed ⇒ same bytes, valid report.
Purify: names and sizes kept, same seed ⇒ same bytes. Attack: images generated, model learned,
same seed ⇒ same bytes. Score: every metric returns values of its declared range.
Methods are listed from the registries, so a newly registered method is tested automatically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images
from PIL import Image

from cloak.api import Common, run_attack, run_protect, run_purify, run_score
from cloak.attack import ATTACK
from cloak.io.report import Report
from cloak.protect import PROTECT
from cloak.purify import PURIFY
from cloak.score import SCORE

EFFORT = 0.05


def _common(name: str, registry, seed: int = 0, **kw) -> Common:
    cls = registry.get(name)
    return Common(method=name, tiny=True, effort=EFFORT, seed=seed, options=dict(cls.tiny_options), argv=[], **kw)


def _pixels(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)).tobytes()
            for p in sorted(folder.rglob("*.png"))}


def _valid(report) -> Report:
    data = json.loads((report if isinstance(report, str) else report.to_json()))
    return Report.model_validate(data)


@pytest.mark.parametrize("name", PROTECT.names())
def test_protect_contract(name, tmp_path):
    images = write_images(tmp_path / "in", n=2, size=(72, 64))
    ref = write_images(tmp_path / "ref", n=2, seed=5)
    reports = []
    for run in ("a", "b"):
        rep = run_protect(images, tmp_path / run, ref=str(ref), common=_common(name, PROTECT))
        reports.append(rep)
    a, b = _pixels(tmp_path / "a"), _pixels(tmp_path / "b")
    assert sorted(a) == ["img0.png", "img1.png"]
    assert a == b, "same seed must give the same bytes"
    rep = _valid(reports[0])
    eps_levels = int(rep.summary["budget"]["eps_m11"] * 127.5 + 1e-6)
    clean = {f"img{i}.png": np.asarray(Image.open(images / f"img{i}.png").convert("RGB").resize((64, 64)))
             for i in range(2)}
    for item in rep.items:
        assert item.status == "ok"
        assert item.linf_255 <= eps_levels
        with Image.open(item.output) as img:
            assert img.mode == "RGB" and img.size == (72, 64)  # the photo's own size (--fit keep)
    assert rep.summary["stand_in"] is True and rep.method == name
    assert clean  # inputs were read (the crop is checked against the budget through linf_255 above)


@pytest.mark.parametrize("name", PURIFY.names())
def test_purify_contract(name, tmp_path):
    images = write_images(tmp_path / "in", n=2, size=(48, 40))
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(images / "square.png")
    for run in ("a", "b"):
        rep = run_purify(images, tmp_path / run, common=_common(name, PURIFY))
    a, b = _pixels(tmp_path / "a"), _pixels(tmp_path / "b")
    assert a == b
    assert sorted(a) == ["img0.png", "img1.png", "square.png"]
    for fname in a:
        src = images / fname
        with Image.open(src) as i, Image.open(tmp_path / "a" / fname) as o:
            assert i.size == o.size
    assert all(i.status == "ok" for i in _valid(rep).items)


@pytest.mark.parametrize("name", ATTACK.names())
def test_attack_contract(name, tmp_path):
    images = write_images(tmp_path / "in", n=2)
    for run in ("a", "b"):
        rep = run_attack(images, tmp_path / run, ref=str(images), common=_common(name, ATTACK))
    a, b = _pixels(tmp_path / "a" / "gen"), _pixels(tmp_path / "b" / "gen")
    assert a and a == b
    r = _valid(rep)
    assert r.summary["ref_denoising_loss"] > 0
    assert (tmp_path / "a" / "report.json").is_file()


@pytest.mark.parametrize("name", SCORE.names())
def test_score_contract(name, tmp_path, astronaut):
    gen = tmp_path / "gen"
    gen.mkdir()
    ref = tmp_path / "ref"
    ref.mkdir()
    face = Image.fromarray(astronaut).crop((90, 0, 350, 260)).resize((128, 128))
    face.save(gen / "a.png")
    face.save(ref / "a.png")
    face.transpose(Image.FLIP_LEFT_RIGHT).save(gen / "b.png")
    face.save(ref / "b.png")
    cls = SCORE.get(name)
    opts = {f"{name}.{k}": v for k, v in cls.tiny_options.items()}
    rep = run_score(gen, ref=str(ref), metrics=[name], common=Common(tiny=True, options=opts, argv=[]))
    row = rep.summary["metrics"][name]
    lo, hi = row["range"]
    values = [i.scores[name] for i in rep.items]  # type: ignore[attr-defined]
    assert len(values) == 2
    for v in values:
        if v is None:
            continue
        assert lo is None or v >= lo - 1e-6
        assert hi is None or v <= hi + 1e-6
    assert row["lower_better"] in (True, False) and row["mode"] in ("FR", "NR", "SET")
