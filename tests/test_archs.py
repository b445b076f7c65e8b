"""Our CodeFormer and guided-diffusion architectures: published key/shape layout, tiny forward passes,
strict save/load round trips, and the diffusion schedule and SDEdit sampler.

The JSON fixtures list every state-dict key and shape of the published checkpoints' architectures
(codeformer.pth; 256x256_diffusion_uncond.pt); they were written from the upstream reference code, so
an exact match means the real weights load with strict=True. Full-size models are built on the meta
device: no memory, no time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cloak.errors import ModelUnavailableError
from cloak.models.archs.codeformer import CodeFormer, build_codeformer, load_codeformer
from cloak.models.archs.guided_diffusion import (
    GaussianDiffusion,
    UNetModel,
    build_guided_diffusion,
    linear_beta_schedule,
    load_guided_diffusion,
    sdedit,
    space_timesteps,
)

DATA = Path(__file__).parent / "data"

TINY_CODEFORMER = dict(
    img_size=32,
    nf=32,
    ch_mult=(1, 2),
    codebook_size=16,
    emb_dim=8,
    dim_embd=32,
    n_head=2,
    n_layers=1,
    connect_list=("32",),
)
TINY_UNET = dict(
    image_size=16,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_head_channels=16,
)


def _key_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Upstream zero-initialises output convs; random values everywhere make the checks meaningful.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ---------------------------------------------------------------------------------------------- layout


def test_codeformer_full_size_matches_published_keys():
    with torch.device("meta"):
        model = build_codeformer()
    expected = json.loads((DATA / "codeformer_keys.json").read_text())
    assert len(expected) == 515
    assert _key_shapes(model) == expected


def test_codeformer_fusion_points_match_upstream_tables():
    # Upstream hard-codes these block indices for the 512 px network; ours derives them from the layout.
    with torch.device("meta"):
        model = build_codeformer()
    assert model.encoder.taps == {512: 2, 256: 5, 128: 8, 64: 11, 32: 14, 16: 18}
    assert model.generator.taps == {16: 6, 32: 9, 64: 12, 128: 15, 256: 18, 512: 21}


def test_guided_diffusion_full_size_matches_published_keys():
    with torch.device("meta"):
        model = build_guided_diffusion()
    expected = json.loads((DATA / "guided_diffusion_256_uncond_keys.json").read_text())
    assert len(expected) == 566
    assert _key_shapes(model) == expected


# ---------------------------------------------------------------------------------------------- CodeFormer


@pytest.fixture(scope="module")
def tiny_codeformer() -> CodeFormer:
    torch.manual_seed(0)
    return _randomize(build_codeformer(**TINY_CODEFORMER)).eval()


def test_codeformer_tiny_forward(tiny_codeformer):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        out = tiny_codeformer(x, w=0.5, adain=True)
        out_w0 = tiny_codeformer(x, w=0.0, adain=False)
    assert out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all() and torch.isfinite(out_w0).all()
    assert not torch.allclose(out, out_w0)  # the fidelity weight changes the result


def test_codeformer_rejects_wrong_size(tiny_codeformer):
    with pytest.raises(ValueError, match="32×32"):
        tiny_codeformer(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("entry", ["params_ema", "params"])
def test_codeformer_save_load_round_trip(tiny_codeformer, tmp_path, entry):
    path = tmp_path / "codeformer.pth"
    torch.save({entry: tiny_codeformer.state_dict()}, path)
    loaded = load_codeformer(path, "cpu", **TINY_CODEFORMER)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny_codeformer(x))


def test_codeformer_load_errors(tiny_codeformer, tmp_path):
    with pytest.raises(ModelUnavailableError):
        load_codeformer(tmp_path / "missing.pth", **TINY_CODEFORMER)
    bad = tmp_path / "bad.pth"
    torch.save({"weights": tiny_codeformer.state_dict()}, bad)
    with pytest.raises(ModelUnavailableError, match="params_ema"):
        load_codeformer(bad, **TINY_CODEFORMER)
    # Strict: a checkpoint of another shape is refused, not half-loaded.
    torch.save({"params_ema": tiny_codeformer.state_dict()}, bad)
    with pytest.raises(ModelUnavailableError, match="does not match"):
        load_codeformer(bad, **{**TINY_CODEFORMER, "n_layers": 2})


# ---------------------------------------------------------------------------------------------- guided diffusion


@pytest.fixture(scope="module")
def tiny_unet() -> UNetModel:
    return _randomize(build_guided_diffusion(**TINY_UNET)).eval()


def test_unet_tiny_forward(tiny_unet):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny_unet(x, torch.tensor([0, 999]))
    assert out.shape == (2, 6, 16, 16)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # the timestep matters


def test_unet_save_load_round_trip(tiny_unet, tmp_path):
    path = tmp_path / "unet.pt"
    torch.save(tiny_unet.state_dict(), path)
    loaded = load_guided_diffusion(path, "cpu", **TINY_UNET)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([123])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), tiny_unet(x, t))
    with pytest.raises(ModelUnavailableError, match="does not match"):
        load_guided_diffusion(path, **{**TINY_UNET, "num_res_blocks": 2})
    with pytest.raises(ModelUnavailableError):
        load_guided_diffusion(tmp_path / "missing.pt", **TINY_UNET)


def test_linear_schedule_endpoints():
    betas = linear_beta_schedule(1000)
    assert betas.dtype == torch.float64 and len(betas) == 1000
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    # Fewer steps stretch the same range: 1e-4·1000/T … 0.02·1000/T.
    assert linear_beta_schedule(250)[-1].item() == pytest.approx(0.08)


def test_space_timesteps():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert len(space_timesteps(1000, [10, 20, 30])) == 60
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respaced_schedule_keeps_alphas_cumprod():
    full = GaussianDiffusion()
    kept = space_timesteps(1000, "250")
    respaced = GaussianDiffusion(linear_beta_schedule(1000), use_timesteps=kept)
    assert respaced.num_timesteps == 250
    assert respaced.timestep_map.tolist() == kept
    torch.testing.assert_close(respaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12, atol=1e-15)
    # The respaced βs are recomputed from ᾱ, so they are larger than the original ones at the kept steps.
    assert (respaced.betas[1:] > full.betas[kept][1:]).all()


def test_sdedit_at_zero_returns_input(tiny_unet):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(sdedit(tiny_unet, x, 0, torch.Generator().manual_seed(0)), x)


def test_sdedit_is_seeded_and_respects_steps(tiny_unet):
    diffusion = GaussianDiffusion.respaced("50")
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    calls = []

    def counting(x_t, t):
        calls.append(int(t[0]))
        return tiny_unet(x_t, t)

    with torch.no_grad():
        a = diffusion.sdedit(counting, x, 3, torch.Generator().manual_seed(7))
        b = diffusion.sdedit(tiny_unet, x, 3, torch.Generator().manual_seed(7))
    # The model sees the original-process timesteps of respaced steps 2, 1, 0.
    assert calls == [int(diffusion.timestep_map[i]) for i in (2, 1, 0)] == [41, 20, 0]
    assert torch.equal(a, b) and a.shape == x.shape and torch.isfinite(a).all()


def test_p_sample_learned_range_variance(tiny_unet):
    # v = -1 gives the posterior variance, v = +1 gives β: the learned range's two ends.
    diffusion = GaussianDiffusion()
    x = torch.zeros(1, 3, 4, 4)
    t = 500
    for v, table in ((-1.0, diffusion.posterior_log_variance_clipped), (1.0, diffusion.log_betas)):

        def model(x_t, _t, v=v):
            return torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], dim=1)

        p = diffusion.p_mean_variance(model, x, t)
        torch.testing.assert_close(p["log_variance"], torch.full_like(x, table[t].item()))
