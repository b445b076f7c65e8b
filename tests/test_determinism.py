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

    # Resume after deleting the last two outputs: the first is skipped, so with one shared stream the
    # redone images would draw what the first one drew before.
    for name in ("img1.png", "img2.png"):
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


# --- class images: effort, sampler, reuse, --class-dir ------------------------------------------------

def _ctx(tmp_path, *, effort=1.0, compat=False, **extras):
    import torch

    from cloak._progress import Progress
    from cloak.methods import RunContext

    return RunContext(models=None, model="tiny-sd", device=torch.device("cpu"), dtype=torch.float32, seed=0,
                      generator=None, resolution=32, cache_dir=tmp_path / "cache", progress=Progress(),
                      effort=effort, compat=compat, extras=dict(extras))


def test_effort_scales_class_images_with_floors_and_compat_keeps_the_sampler(tmp_path):
    from cloak.diffusion.class_images import class_image_plan

    def plan(**kw):
        p = class_image_plan(_ctx(tmp_path, **{k: v for k, v in kw.items() if k != "n"}), kw.get("n", 200), 50)
        return p.count, p.steps, p.sampler

    assert plan() == (200, 25, "dpm")  # [PROP] DPM-Solver++ at half the steps
    assert plan(effort=0.5) == (100, 12, "dpm")
    assert plan(effort=0.02) == (4, 10, "dpm")  # floors
    assert plan(effort=0.02, n=2) == (2, 10, "dpm")  # a floor never adds images nobody asked for
    assert plan(effort=3) == (200, 25, "dpm")  # never above what the method asked for
    assert plan(compat=True) == (200, 50, "default")
    assert plan(n=0) == (0, 25, "dpm")
    assert class_image_plan(None, 7, 50).count == 7  # no run context: exactly as asked


def test_class_images_are_reused_extended_and_recorded(tmp_path, tiny_sd, monkeypatch):
    import torch

    from cloak.diffusion import class_images as module

    calls = []
    real_generate = module.generate
    monkeypatch.setattr(module, "generate", lambda pipe, prompt, seeds, **kw: (calls.append(list(seeds)),
                                                                               real_generate(pipe, prompt, seeds,
                                                                                             **kw))[1])
    ctx = _ctx(tmp_path, effort=0.02)
    first = module.class_images(tiny_sd, "a photo of person", 2, ctx.cache_dir, steps=4, ctx=ctx)
    assert first.shape == (2, 3, 32, 32) and calls == [[0, 1]]
    record = ctx.extras["class_images"][0]
    assert record["count"] == 2 and record["steps"] == 2 and record["sampler"] == "dpm"
    assert record["source"] == "generated" and record["requested_count"] == 2 and "PROP" in record["note"]

    # Another method or verb asking for the same set: nothing generated, the same pixels.
    other = _ctx(tmp_path, effort=0.02)
    again = module.class_images(tiny_sd, "a photo of person", 2, other.cache_dir, steps=4, ctx=other)
    assert calls == [[0, 1]] and torch.equal(first, again) and other.extras["class_images"][0]["source"] == "cache"
    # More images later: only the missing seeds are generated; the first ones stay.
    more = module.class_images(tiny_sd, "a photo of person", 3, other.cache_dir, steps=4, ctx=_ctx(tmp_path))
    assert calls[-1] == [2] and torch.equal(more[:2], first)


def test_class_image_bar_moves_per_sampling_step_with_the_same_images(tmp_path, tiny_sd):
    """The bar counts image-steps, so its ETA moves within a batch (a batch of class images takes minutes on a
    real model); the images are those generated without a bar."""
    import torch

    from cloak._progress import Progress, Task
    from cloak.diffusion.class_images import class_image_plan, class_images

    class Recorder(Progress):
        def __init__(self):
            self.tasks = []

        def task(self, description, total):
            task = Task()
            task.description, task.total, task.steps, task.statuses = description, total, [], []

            def advance(n=1, status=None):
                task.steps.append(n)
                task.statuses.append(status)

            task.advance = advance
            self.tasks.append(task)
            return task

    ctx = _ctx(tmp_path / "a", effort=0.02)
    ctx.progress = Recorder()
    plan = class_image_plan(ctx, 3, 4)
    with_bar = class_images(tiny_sd, "a photo of person", 3, ctx.cache_dir, steps=4, ctx=ctx, batch_size=2)
    (task,) = ctx.progress.tasks
    assert task.description == "class images" and task.total == 3 * plan.steps
    assert sum(task.steps) == task.total and len([n for n in task.steps if n]) == 2 * plan.steps  # 2 batches
    assert task.statuses[-1] == "3/3 images"
    plain = _ctx(tmp_path / "b", effort=0.02)
    without = class_images(tiny_sd, "a photo of person", 3, plain.cache_dir, steps=4, progress=lambda *a: None,
                           ctx=plain, batch_size=2)
    assert torch.equal(with_bar, without)


def test_class_dir_replaces_generation(tmp_path, tiny_sd, monkeypatch):
    from cloak.diffusion import class_images as module

    monkeypatch.setattr(module, "generate", lambda *a, **k: pytest.fail("nothing may be generated"))
    own = write_images(tmp_path / "mine", n=3, size=(40, 40), seed=5)
    ctx = _ctx(tmp_path, effort=1.0, class_dir=str(own))
    pixels = module.class_images(tiny_sd, "a photo of person", 2, ctx.cache_dir, steps=50, ctx=ctx)
    assert pixels.shape == (2, 3, 32, 32)
    assert ctx.extras["class_images"][0]["source"] == "class-dir" and not ctx.warnings
    module.class_images(tiny_sd, "a photo of person", 5, ctx.cache_dir, steps=50, ctx=ctx)
    assert ctx.extras["class_images"][-1]["count"] == 3 and "holds 3 image(s)" in ctx.warnings[0]
    assert not (ctx.cache_dir / "class-images").exists()


def test_two_writers_filling_one_class_image_folder_both_succeed(tmp_path, tiny_sd):
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from cloak.diffusion.class_images import class_images

    def make(_):
        ctx = _ctx(tmp_path, effort=0.02)
        return class_images(tiny_sd, "a photo of a dog", 3, ctx.cache_dir, steps=4, ctx=ctx)

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(make, range(2))
    assert torch.equal(a, b)
    folder = next((tmp_path / "cache" / "class-images").rglob("*-dpm-2st"))
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "2.png"]  # no temp file left


# --- attack sampling ----------------------------------------------------------------------------------

def test_attack_resume_after_deleting_outputs_gives_the_same_bytes(tmp_path):
    images = write_images(tmp_path / "in", n=2, size=(32, 32))
    opts = {"steps": 1, "class_images": 0, "num_images": 5, "sample_steps": 2, "prompts": ["a photo of sks person"]}

    def common(**kw):
        return Common(method="dreambooth", tiny=True, seed=1, resolution=32, argv=[], options=dict(opts), **kw)

    out = tmp_path / "out"
    run_attack(images, out, common=common())
    whole = _bytes(out / "gen")
    assert len(whole) == 5
    # Seed 2 alone is redone: it must still be computed in its batch of four, as the first time.
    victim = next(k for k in whole if k.endswith("/2.png"))
    (out / "gen" / victim).unlink()
    report = run_attack(images, out, common=common(resume=True))
    assert _bytes(out / "gen") == whole
    assert report.summary["ok"] == 5 and report.summary["kept_from_earlier"] == 4


def test_generate_returns_only_the_asked_seeds_in_their_fixed_batches(tiny_sd):
    from cloak.diffusion.sampling import build_pipeline, generate

    pipe = build_pipeline(tiny_sd)
    kw = dict(steps=2, guidance=7.5, resolution=32, batch_size=4, all_seeds=list(range(5)))
    full = generate(pipe, "a photo", list(range(5)), **kw)
    seen = []
    part = generate(pipe, "a photo", [4, 2], on_image=lambda i, a: seen.append(i), **kw)
    assert [a.tobytes() for a in part] == [full[4].tobytes(), full[2].tobytes()]
    assert sorted(seen) == [0, 1]
    with pytest.raises(ValueError):
        generate(pipe, "a photo", [7], **kw)


# --- protect, per-image methods ---------------------------------------------------------------------

def _protect(cli, src: Path, out: Path, *args) -> dict:
    r = cli("protect", "--tiny", "-q", "--json", "--method", "mist", "--steps", "3", *args, src, out)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_mist_resume_and_input_order_give_the_same_bytes(cli, tmp_path):
    images = write_images(tmp_path / "in", n=3)
    _protect(cli, images, tmp_path / "all", "-o", "batch_size=1")
    whole = _bytes(tmp_path / "all")
    (tmp_path / "all" / "img0.png").unlink()
    _protect(cli, images, tmp_path / "all", "-o", "batch_size=1", "--resume")
    assert _bytes(tmp_path / "all") == whole

    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for i, name in enumerate(("img2.png", "img0.png", "img1.png")):
        shutil.copy(images / name, shuffled / f"{chr(ord('c') - i)}-{name}")
    _protect(cli, shuffled, tmp_path / "shuffled-out", "-o", "batch_size=1", "--seed", "0")
    assert {k.split("-", 1)[1]: v for k, v in _bytes(tmp_path / "shuffled-out").items()} == whole


def test_class_dir_flag_reaches_the_run_context_and_the_report(cli, tmp_path, monkeypatch):
    from cloak._verb import VerbRun
    from cloak.attack import ATTACK
    from cloak.errors import InputError

    own = write_images(tmp_path / "mine", n=2)
    seen = {}

    def fake_attack(input_dir, output_dir, *, common, **kw):
        seen["class_dir"] = common.class_dir
        raise InputError("stop here")

    import importlib

    monkeypatch.setattr(importlib.import_module("cloak.attack.run"), "run_attack", fake_attack)
    r = cli("attack", "--tiny", "--class-dir", own, tmp_path / "in", tmp_path / "out")
    assert r.exit_code == 3 and seen["class_dir"] == str(own)

    run = VerbRun("attack", ATTACK, Common(tiny=True, class_dir=str(own), argv=[]), "dreambooth", "sd21-base")
    ctx = run.context()
    assert ctx.extras["class_dir"] == str(own) and run.params["class_dir"] == {"value": str(own), "source": "flag"}
    with pytest.raises(InputError, match="not a directory"):
        VerbRun("attack", ATTACK, Common(tiny=True, class_dir=str(tmp_path / "nope"), argv=[]), "dreambooth",
                "sd21-base").context()
