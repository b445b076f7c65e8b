"""Results that do not depend on how a run was cut up: resume, input order, batch size; caches by content.

Every random draw of a per-item method comes from the item's own stream (run seed, item identity), so
an image's output is the same bytes whether it is processed alone, in another order, in another batch,
or after ``--resume`` skipped the images before it (issue 14 item 16). A no-op ``--resume`` keeps the
earlier report's figures (item 4). Caches of class images and surrogates follow a local model's
content, not its path (item 19).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images
from PIL import Image

from cloak.api import Common, run_attack, run_purify


def _bytes(folder: Path) -> dict[str, bytes]:
    """Decoded pixels of every PNG under ``folder`` by relative path."""
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)).tobytes()
            for p in sorted(folder.rglob("*.png"))}


# --- per-item streams -------------------------------------------------------------------------------

def test_per_item_generator_depends_on_seed_and_key_only():
    import torch

    from cloak.adversarial.per_image import per_item_generator, pixels_key

    def draw(seed, key):
        return torch.randn(4, generator=per_item_generator(seed, key))

    assert torch.equal(draw(0, "a"), draw(0, "a"))
    assert not torch.equal(draw(0, "a"), draw(1, "a"))
    assert not torch.equal(draw(0, "a"), draw(0, "b"))
    x = torch.rand(3, 8, 8) * 2 - 1
    # The key is the 8-bit content and shape: where an image sits in a batch plays no part.
    assert pixels_key(x) == pixels_key(torch.stack([x.flip(-1), x])[1])
    assert pixels_key(x) != pixels_key(x.flip(-1))
    assert pixels_key(x) != pixels_key(x[:, :4])


# --- purify -----------------------------------------------------------------------------------------

def _purify_common(method: str, **kw) -> Common:
    from cloak.purify import PURIFY

    return Common(method=method, tiny=True, effort=0.05, seed=3, options=dict(PURIFY.get(method).tiny_options),
                  argv=[], **kw)


@pytest.mark.parametrize("method", ["diffpure", "ldiffpure"])
def test_purify_resume_and_input_order_give_the_same_bytes(tmp_path, method):
    images = write_images(tmp_path / "in", n=3, size=(32, 32))
    run_purify(images, tmp_path / "all", common=_purify_common(method))
    whole = _bytes(tmp_path / "all")
    assert len(whole) == 3

    # Resume after deleting the first two outputs: the third was skipped, the first two are redone.
    for name in ("img0.png", "img1.png"):
        (tmp_path / "all" / name).unlink()
    run_purify(images, tmp_path / "all", common=_purify_common(method, resume=True))
    assert _bytes(tmp_path / "all") == whole

    # Another order (the names sort the other way round) and one image alone: same bytes per image.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for i, name in enumerate(("img2.png", "img0.png", "img1.png")):
        shutil.copy(images / name, shuffled / f"{chr(ord('c') - i)}-{name}")
    run_purify(shuffled, tmp_path / "shuffled-out", common=_purify_common(method))
    renamed = {k.split("-", 1)[1]: v for k, v in _bytes(tmp_path / "shuffled-out").items()}
    assert renamed == whole


# --- resume keeps the earlier report ------------------------------------------------------------------

def test_a_noop_resume_keeps_the_earlier_report(tmp_path):
    images = write_images(tmp_path / "in", n=2, size=(32, 32))
    out = tmp_path / "out"
    first = json.loads(run_purify(images, out, common=_purify_common("diffpure")).to_json())
    assert first["summary"]["stand_in"] is True and first["summary"]["ok"] == 2

    again = json.loads(run_purify(images, out, common=_purify_common("diffpure", resume=True)).to_json())
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == again
    assert again["summary"]["ok"] == 2 and again["summary"]["skipped"] == 0
    assert again["summary"]["stand_in"] is True and again["summary"]["kept_from_earlier"] == 2
    assert any("stand-in" in w for w in again["warnings"])
    assert {m["id"] for m in again["models"]} == {m["id"] for m in first["models"]}
    for a, b in zip(first["items"], again["items"]):
        assert b["kept_from"] == first["started"]
        assert {k: v for k, v in b.items() if k != "kept_from"} == a
    assert again["summary"]["seconds_per_image"] == first["summary"]["seconds_per_image"]

    # A partial resume: the redone image gets this run's record, the other keeps the earlier one.
    (out / "img1.png").unlink()
    third = json.loads(run_purify(images, out, common=_purify_common("diffpure", resume=True)).to_json())
    assert [i["status"] for i in third["items"]] == ["ok", "ok"]
    assert "kept_from" in third["items"][0] and "kept_from" not in third["items"][1]
    assert third["summary"]["kept_from_earlier"] == 1


# --- caches keyed by content --------------------------------------------------------------------------

def test_class_images_follow_a_local_models_content_not_its_path(tmp_path, tiny_sd, shared_cache):
    import torch
    from safetensors.torch import load_file, save_file

    from cloak.diffusion.class_images import class_images, model_key
    from cloak.models.handle import DIGEST_FILE, Models

    local = tmp_path / "model"
    shutil.copytree(tiny_sd.path, local, ignore=shutil.ignore_patterns(DIGEST_FILE))

    def load(path):
        models = Models(cache_dir=shared_cache, device="cpu", dtype=torch.float32)
        return models, models.sd(str(path))

    models, sd = load(local)
    first = class_images(sd, "a photo of a person", 2, tmp_path / "cache", steps=2, resolution=32)
    record = next(r for r in models.records() if r.path == str(local.resolve()))
    assert record.sha256 == sd.digest and len(sd.digest) == 64  # the report names the local model's content
    assert json.loads((local / DIGEST_FILE).read_text())["sha256"] == sd.digest

    # The same content elsewhere: the same key, the cached images are reused.
    moved = tmp_path / "moved"
    shutil.copytree(local, moved)
    assert model_key(load(moved)[1]) == model_key(sd)

    # The folder replaced in place with other weights (as `immunize --force` does): new key, new images.
    weights = next((local / "unet").glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v + 0.05 if v.is_floating_point() else v for k, v in state.items()}, weights)
    _, changed = load(local)
    assert changed.digest != sd.digest and model_key(changed) != model_key(sd)
    second = class_images(changed, "a photo of a person", 2, tmp_path / "cache", steps=2, resolution=32)
    assert not torch.equal(first, second)
    assert len(list((tmp_path / "cache" / "class-images").iterdir())) == 2
