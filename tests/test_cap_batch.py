"""CAP's line search in batches (issue 16 §4): a step's candidates go through the UNet together, each on the
step's own draw, so the choice of λ and the protected images are those of one pass per candidate."""

from __future__ import annotations

import pytest
import torch

from _groups_helper import image_set, make_method


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """This file's tests run on one intra-op thread (conftest's ``one_thread``)."""


def _count_unet_calls(monkeypatch) -> dict:
    from diffusers import UNet2DConditionModel

    calls = {"n": 0}
    forward = UNet2DConditionModel.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted)
    return calls


def _cap_run(cache, shapes, options):
    images = image_set(list(shapes))
    method = make_method("cap", cache, {"iterations": 1, "pgd_steps": 3, "ratio_max": 4, "start_fraction": 0,
                                        **options})
    result = method(images)
    pixels = result.pixels if isinstance(result.pixels, torch.Tensor) else torch.cat(
        [p.flatten() for p in result.pixels])
    return pixels, result.summary["cap"]


@pytest.mark.parametrize("shapes, options, batched", [
    (((64, 64),) * 3, {}, 0),                                            # all candidates in one pass
    (((64, 64), (64, 64), (64, 128)), {"pgd_batch": 1}, 3),              # two buckets, chunks, passes of 3
    (((64, 64),) * 2, {"target_image": "__target__", "target_weight": 0.5}, 0),  # T-ASPL's targeted loss
])
def test_batched_line_search_is_the_sequential_one(shared_cache, tmp_path, monkeypatch, shapes, options, batched):
    """cap_batch=1 (one UNet pass per candidate, the old path) against the batched search: the same λ every step,
    the same candidates evaluated, the protected images byte-equal at fp32 (the chosen point is computed the same
    way; only the losses that rank the candidates come from a bigger batch, and agree to float rounding), and the
    UNet passes of the line search drop from one per candidate (× buckets × chunks) to one per pass."""
    if "target_image" in options:
        from conftest import write_images

        target = write_images(tmp_path / "target", n=1, seed=5)
        options = {**options, "target_image": str(next(target.glob("*.png")))}
    calls = _count_unet_calls(monkeypatch)
    one, seq = _cap_run(shared_cache, shapes, {**options, "cap_batch": 1})
    unet_seq = calls["n"]
    calls["n"] = 0
    many, bat = _cap_run(shared_cache, shapes, {**options, "cap_batch": batched})
    unet_bat = calls["n"]

    assert seq["cap_steps"] == 3 and seq["lambdas"] == bat["lambdas"]
    assert seq["candidates_evaluated"] == bat["candidates_evaluated"] > 3  # more than r = 0 alone
    assert torch.equal(one, many)
    for a, b in zip(seq["step_loss_chosen"] + seq["step_loss_host_step"],
                    bat["step_loss_chosen"] + bat["step_loss_host_step"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)  # targeted: a difference of two MSEs
    pieces = sum(len(range(0, rows, options.get("pgd_batch") or rows)) for rows in
                 {s: sum(1 for t in shapes if t == s) for s in shapes}.values())  # loss calls per candidate set
    assert seq["candidate_loss_passes"] == seq["candidates_evaluated"] * pieces
    per_step = [-(-n // (batched or 10 ** 9)) for n in seq["candidates_per_step"]]
    assert bat["candidate_loss_passes"] == sum(per_step) * pieces < seq["candidate_loss_passes"]
    # The counted passes are the real UNet calls saved; nothing else in the run changed.
    assert unet_seq - unet_bat == seq["candidate_loss_passes"] - bat["candidate_loss_passes"]


def test_simac_host_batched_keeps_its_feature_term(shared_cache):
    """SimAC's feature term joins each candidate's loss from one clean-branch pass shared by the candidates:
    the batched search picks the λ of the sequential one and gives the same bytes."""
    options = {"host": "simac", "iterations": 1, "surrogate_steps": 1, "pgd_steps": 2, "select_rounds": 1,
               "select_candidates": 2, "ratio_max": 3, "start_fraction": 0}
    runs = {}
    for batch in (1, 0):
        method = make_method("cap", shared_cache, {**options, "cap_batch": batch})
        result = method(image_set([(64, 64)] * 2))
        runs[batch] = (result.pixels, result.summary["cap"], result.summary["feature_term"]["last_value"])
    assert runs[1][1]["lambdas"] == runs[0][1]["lambdas"]
    assert torch.equal(runs[1][0], runs[0][0])
    assert runs[1][2] == pytest.approx(runs[0][2], rel=1e-5)
    assert runs[0][1]["candidate_loss_passes"] == 2 < runs[1][1]["candidate_loss_passes"]


def test_candidate_values_are_each_candidates_loss_value():
    """The batched evaluation against the one-candidate one on a toy loss with per-image draws: two buckets,
    chunks, candidates stacked candidate-major each take their own images' draws."""
    from cloak.adversarial.groups import Groups, candidate_values, loss_value

    gen = torch.Generator().manual_seed(0)
    weights = [torch.rand(2, 3, 4, 4, generator=gen), torch.rand(3, 3, 4, 6, generator=gen)]  # the "draws"

    def loss_fn(pixels, b, rows=None, copies=1):
        w = weights[b] if rows is None else weights[b][rows]
        per_image = (pixels * w.repeat(copies, 1, 1, 1)).pow(2).flatten(1).mean(1)
        return per_image.mean() if copies == 1 else per_image.reshape(copies, -1).mean(1)

    def chunks(n):
        return [slice(i, min(i + 2, n)) for i in range(0, n, 2)]

    sets = [Groups([torch.randn(2, 3, 4, 4, generator=gen), torch.randn(3, 3, 4, 6, generator=gen)],
                   [[0, 3], [1, 2, 4]]) for _ in range(4)]
    for pieces in (None, chunks):
        batched = candidate_values(sets, loss_fn, pieces)
        single = [loss_value(s, loss_fn, pieces) for s in sets]
        assert batched == pytest.approx(single, rel=1e-6)
        assert len(set(batched)) == 4


def test_draw_repeat_tiles_every_per_image_tensor():
    from cloak.protect.aspl import FamilyDraw

    n = 3
    draw = FamilyDraw(torch.arange(n), torch.randn(n, 4, 2, 2), torch.randn(n, 4, 2, 2),
                      {"step_noise": torch.randn(n, 4, 2, 2), "scale": torch.tensor(0.5)})
    two = draw.repeat(2)
    assert torch.equal(two.timesteps, torch.tensor([0, 1, 2, 0, 1, 2]))
    for a, b in ((two.noise, draw.noise), (two.posterior_noise, draw.posterior_noise),
                 (two.extra["step_noise"], draw.extra["step_noise"])):
        assert torch.equal(a[:n], b) and torch.equal(a[n:], b)
    assert two.extra["scale"] is draw.extra["scale"]


def test_memory_low_evaluates_one_candidate_per_pass():
    from cloak.diffusion.memory import tier_options
    from cloak.protect.cap import CapOptions

    assert tier_options("low", CapOptions)["cap_batch"] == 1
    assert CapOptions().cap_batch == 8
