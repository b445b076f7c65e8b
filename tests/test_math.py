"""Shared math: budgets and units, projection and quantisation, the denoising loss, DreamBooth steps."""

from __future__ import annotations

import pytest
import torch

from cloak.adversarial import Budget, pgd_step, project, quantize_within_budget, random_start, to_m11
from cloak.diffusion import LatentCache, denoising_loss, training_target
from cloak.diffusion.dreambooth import (
    DreamBoothConfig,
    DreamBoothTrainer,
    ParamBuffer,
    copy_params,
    reset_optimizer_state,
)
from cloak.errors import UsageError


def test_units():
    assert to_m11(0.05, "m11") == pytest.approx(0.05)
    assert to_m11(8, "255") == pytest.approx(16 / 255)
    assert to_m11(8 / 255, "01") == pytest.approx(16 / 255)
    assert Budget(0.05, "m11").as_dict()["levels_255"] == pytest.approx(6.375)
    with pytest.raises(UsageError):
        to_m11(1, "pixels")
    with pytest.raises(UsageError):
        to_m11(-1, "m11")


def test_projection_and_pgd_step():
    x0 = torch.zeros(1, 3, 4, 4)
    x = torch.full_like(x0, 0.3)
    assert project(x, x0, 0.1).max() == pytest.approx(0.1)
    g = torch.randn_like(x0)
    y = pgd_step(x0, g, x0, 0.01, 0.05)
    assert torch.allclose(y, 0.01 * g.sign())
    y = pgd_step(x0, g, x0, 0.01, 0.05, ascent=False)
    assert torch.allclose(y, -0.01 * g.sign())
    assert project(torch.full_like(x0, 2.0), torch.full_like(x0, 0.99), 0.5).max() <= 1


def test_random_start_is_seeded_and_bounded():
    x0 = torch.zeros(2, 3, 8, 8)
    a = random_start(x0, 0.1, torch.Generator().manual_seed(0))
    b = random_start(x0, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.abs().max() <= 0.1


def test_quantisation_never_exceeds_budget():
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (4, 3, 16, 16), generator=gen).float() / 127.5) - 1
    eps = 0.05
    x = project(x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1) * eps * 1.5, x0, eps)
    q = quantize_within_budget(x, x0, eps).float()
    q0 = ((x0 + 1) * 127.5).round()
    assert (q - q0).abs().max() <= int(eps * 127.5)


def test_v_prediction_target(tiny_sd_v):
    sched = tiny_sd_v.noise_scheduler
    z, n, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    v = training_target(sched, z, n, t)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * n - (1 - a).sqrt() * z, atol=1e-5)


def test_denoising_loss_deterministic_and_per_image(tiny_sd):
    z = torch.randn(3, 4, 8, 8)
    text = torch.zeros(1, 77, tiny_sd.text_encoder.config.hidden_size)
    a = denoising_loss(tiny_sd.unet, tiny_sd.noise_scheduler, z, text, torch.Generator().manual_seed(1),
                       reduction="none")
    b = denoising_loss(tiny_sd.unet, tiny_sd.noise_scheduler, z, text, torch.Generator().manual_seed(1),
                       reduction="none")
    assert a.shape == (3,) and torch.equal(a, b)


def test_latent_cache_matches_vae_distribution(tiny_sd):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    cache = LatentCache.encode(tiny_sd.vae, x)
    dist = tiny_sd.vae.encode(x).latent_dist
    assert torch.allclose(cache.mean, dist.mean, atol=1e-5)
    s = cache.sample([0, 1], torch.Generator().manual_seed(0))
    assert s.shape == dist.mean.shape


def test_dreambooth_step_fp32_learns_and_bf16_compat_loses_updates(tiny_sd):
    """The [Q] the spec documents: tiny lr updates vanish in bf16 weights but not in fp32 masters."""
    fractions = {}
    for bf16 in (False, True):
        unet, te = tiny_sd.trainable_copy()
        cfg = DreamBoothConfig(lr=5e-7, bf16_weights=bf16, train_text_encoder=False)
        trainer = DreamBoothTrainer(tiny_sd, unet, te, cfg, class_latents=None,
                                    generator=torch.Generator().manual_seed(0))
        before = [p.detach().clone() for p in unet.parameters()]
        trainer.step(torch.randn(1, 4, 8, 8))
        changed = sum((p.detach() != b).sum().item() for p, b in zip(unet.parameters(), before))
        fractions[bf16] = changed / sum(p.numel() for p in before)
    print(fractions)
    assert fractions[False] > 0.5
    assert fractions[True] < fractions[False] / 10


def test_reset_optimizer_state_equals_fresh_optimizer(tiny_sd):
    unet, te = tiny_sd.trainable_copy()
    cfg = DreamBoothConfig(lr=1e-3, train_text_encoder=False)
    trainer = DreamBoothTrainer(tiny_sd, unet, te, cfg, class_latents=None,
                                generator=torch.Generator().manual_seed(0))
    trainer.step(torch.randn(1, 4, 8, 8))
    reset_optimizer_state(trainer.optimizer)
    for state in trainer.optimizer.state.values():
        assert all(float(v.abs().sum()) == 0 for v in state.values() if torch.is_tensor(v))


def test_param_buffer_and_copy(tiny_sd):
    a, _ = tiny_sd.trainable_copy()
    b, _ = tiny_sd.trainable_copy()
    buf = ParamBuffer(a)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    copy_params(a, b)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    buf.load(a)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), tiny_sd.unet.parameters()))
