"""Noisy Upscaling's noise stage (docs/spec-additions.md §U1; the purifier itself is not registered yet)."""

from __future__ import annotations

import torch


def test_noise_stage_is_clipped_8_bit_gaussian_in_01_units():
    from cloak.purify.noisy_upscale import add_gaussian_noise

    image = torch.zeros(1, 3, 64, 64)  # mid-gray: no clipping
    noisy = add_gaussian_noise(image, 0.1, torch.Generator().manual_seed(0))
    levels = (noisy + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # 8-bit values
    std01 = float(((noisy - image) / 2).std())
    assert abs(std01 - 0.1) < 0.005, std01  # σ in [0,1] units
    white = add_gaussian_noise(torch.ones(1, 3, 16, 16), 0.1, torch.Generator().manual_seed(0))
    assert float(white.max()) <= 1 and float(white.min()) < 1  # clipped at the top, noisy below


# ------------------------------------------------------------------------------------------------ shared helpers


def _method(cls, cache, seed=0, **opts):
    """A purifier on the built-in stand-ins with a CPU context, prepared."""
    from cloak._progress import Progress
    from cloak.methods import RunContext
    from cloak.models.handle import Models

    ctx = RunContext(models=Models(cache_dir=cache, tiny=True), model="tiny-sd", device=torch.device("cpu"),
                     dtype=torch.float32, seed=seed, generator=torch.Generator().manual_seed(seed), resolution=64,
                     cache_dir=cache, progress=Progress())
    m = cls(cls.Options(**opts), ctx)
    m.prepare()
    return m


def _record_calls(module):
    """Keyword arguments and inputs of every forward call of ``module`` (a forward pre-hook)."""
    calls = []

    def hook(_mod, args, kwargs):
        calls.append({"args": [a.detach().clone() if torch.is_tensor(a) else a for a in args],
                      **{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}})

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _cosine_abar(t: int) -> float:
    """ᾱ_t of the 1000-step cosine schedule (Nichol & Dhariwal; IF's get_named_beta_schedule('cosine')):
    ā((t+1)/T)/ā(0) with ā(s) = cos²((s + 0.008)/1.008 · π/2), far from the 0.999 β cap here."""
    import math

    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return f((t + 1) / 1000) / f(0)


# ------------------------------------------------------------------------------------------------ PDM-Pure


def test_pdm_pure_working_sizes_follow_deepfloyd_if():
    from cloak.purify.pdm_pure import canvas_size, working_size

    assert working_size(512, 512, 64) == (64, 64) and working_size(512, 512, 256) == (256, 256)
    assert working_size(768, 512, 64) == (96, 64)  # short side 64, long side ×1.5, multiple of 8
    assert working_size(512, 1024, 64) == (64, 128)
    assert canvas_size(96, 64) == (384, 256)  # ×4 (img_scale), floored to 32
    assert canvas_size(80, 64) == (320, 256)  # the release's 256-px support would be 304 wide here (it asserts)


def test_pdm_pure_runs_the_released_schedule_and_pipeline_calls(shared_cache, monkeypatch):
    """Noise level reached (t* = 44 of the respacing 0, 11, …, 99), the whole chain sampled from t = 99,
    the condition re-noised at aug level 250 per call and row, guidance rows (prompt, empty prompt), then
    the upscaler with DDPM, 50 steps, guidance 4, noise level 20 and the prompt; native size; seeded."""
    import cloak.models.restoration as restoration
    from cloak.models.deepfloyd import t5_embeddings
    from cloak.purify.pdm_pure import PDMPure

    sr_calls = []
    real_upscale4 = restoration.upscale4

    def spy(pipe, image, prompt, **kw):
        sr_calls.append({"scheduler": type(pipe.scheduler).__name__, "prediction": pipe.scheduler.config.prediction_type,
                         "prompt": prompt, "size": tuple(image.shape[-2:]), "range": (float(image.min()),
                                                                                      float(image.max())), **kw})
        return real_upscale4(pipe, image, prompt, **{**kw, "steps": 1})  # the calls are checked, not the 50 steps

    monkeypatch.setattr(restoration, "upscale4", spy)
    m = _method(PDMPure, shared_cache, size=32)
    calls = _record_calls(m.unet)
    image = torch.full((1, 3, 40, 48), 0.5)  # h 40, w 48: not square, not a multiple of 32
    out = m(image)
    assert out.shape == image.shape  # native size

    steps = [int(c["args"][1]) for c in calls]
    assert steps == [99, 88, 77, 66, 55, 44, 33, 22, 11, 0]  # space_timesteps(1000, "10,0,…,0"), all sampled
    assert m.record["t_star"] == 44 and m.record["first_step_t"] == 99 and m.record["canvas"] == [32, 32]
    first = calls[0]["args"][0]
    assert first.shape == (2, 6, 32, 32)  # [prompt, unconditional] × [x_t, noised condition]
    x_t, cond = first[0, :3], first[:, 3:]
    abar, aug = _cosine_abar(44), _cosine_abar(250)
    assert abs(float(x_t.mean()) - abar ** 0.5 * 0.5) < 0.03  # the support (constant 0.5) at ᾱ_44
    assert abs(float(x_t.std()) - (1 - abar) ** 0.5) < 0.1 * (1 - abar) ** 0.5
    assert abs(float(cond.mean()) - aug ** 0.5 * 0.5) < 0.03
    assert abs(float(cond.std()) - (1 - aug) ** 0.5) < 0.08 * (1 - aug) ** 0.5
    assert not torch.equal(cond[0], cond[1])  # each row its own augmentation draw…
    assert not torch.equal(calls[1]["args"][0][:, 3:], cond)  # …and a new one at every call
    assert all(torch.equal(c["class_labels"], torch.tensor([250, 250])) for c in calls)
    text = t5_embeddings(m.ctx.models.resolve("deepfloyd-if-t5", "t")[1], ["a picture", ""], torch.device("cpu"),
                         torch.float32)
    assert torch.equal(calls[0]["encoder_hidden_states"], text)

    (sr,) = sr_calls
    assert (sr["scheduler"], sr["prediction"]) == ("DDPMScheduler", "v_prediction")
    assert (sr["prompt"], sr["steps"], sr["guidance"], sr["noise_level"]) == ("a picture", 50, 4.0, 20)
    assert sr["size"] == (32, 32) and 0 <= sr["range"][0] and sr["range"][1] <= 1

    assert torch.equal(_method(PDMPure, shared_cache, size=32)(image), out)  # same seed, same result
    assert not torch.equal(_method(PDMPure, shared_cache, seed=1, size=32)(image), out)


def test_pdm_pure_plain_sdedit_start_and_stage2_only(shared_cache):
    from cloak.purify.pdm_pure import PDMPure

    m = _method(PDMPure, shared_cache, size=32, start="noised", sr=False)
    calls = _record_calls(m.unet)
    image = torch.zeros(1, 3, 30, 20)
    out = m(image)
    assert [int(c["args"][1]) for c in calls] == [44, 33, 22, 11, 0]
    assert m.sr_pipe is None and out.shape == image.shape


# ------------------------------------------------------------------------------------------------ Noisy Upscaling


def test_noisy_upscale_calls_the_upscaler_as_released(shared_cache, monkeypatch):
    """σ 0.1 noise, then the upscaler with 75 steps, guidance 9, told noise level 320 while its input is noised
    at 320 − noise_level_sub 320 = 0 (the fork's semantics, checked inside the UNet's inputs); native size;
    seeded."""
    import cloak.models.restoration as restoration
    from cloak.purify.noisy_upscale import NoisyUpscaling, add_gaussian_noise

    o = NoisyUpscaling.Options()
    assert (o.noise_std, o.sr_noise_level, o.sr_input_noise_level, o.sr_input) == (0.1, 320, 0, "full")
    sr_calls = []
    real_upscale4 = restoration.upscale4

    def spy(pipe, image, prompt, **kw):
        sr_calls.append({"prompt": prompt, "size": image.size, **kw})
        return real_upscale4(pipe, image, prompt, **{**kw, "steps": 2})  # the calls are checked, not 75 steps

    monkeypatch.setattr(restoration, "upscale4", spy)
    m = _method(NoisyUpscaling, shared_cache, seed=5)
    calls = _record_calls(m.pipe.unet)
    image = torch.linspace(-0.8, 0.8, 40 * 48 * 3).reshape(1, 3, 40, 48)
    out = m(image)
    assert out.shape == image.shape
    (sr,) = sr_calls
    assert (sr["steps"], sr["guidance"], sr["noise_level"], sr["low_res_noise_level"]) == (75, 9.0, 320, 0)
    assert sr["size"] == (48, 40) and sr["prompt"] == "a photo of a person"  # the noisy image at its own size

    noisy = add_gaussian_noise(image, 0.1, torch.Generator().manual_seed(5))  # the same first draw
    for call in calls:
        assert torch.equal(call["class_labels"], torch.tensor([320, 320]))
        lowres = call["args"][0][:, 4:]  # after the 4 latent channels: the conditioning image
        residual = float((lowres - noisy).std())
        assert residual < 0.02, residual  # noised at level 0 (std 0.01), not at 320 (≈ 0.55)
    assert torch.equal(_method(NoisyUpscaling, shared_cache, seed=5)(image), out)
    assert not torch.equal(_method(NoisyUpscaling, shared_cache, seed=6)(image), out)


def test_upscale4_noises_its_input_at_the_level_asked(shared_cache):
    """Stock behaviour (input noised at the label's level) unless a separate input level is given."""
    from cloak.models.restoration import upscale4
    from cloak.purify.noisy_upscale import NoisyUpscaling

    pipe = _method(NoisyUpscaling, shared_cache).pipe
    calls = _record_calls(pipe.unet)
    image = torch.zeros(1, 3, 16, 16)
    for level in (None, 320):
        upscale4(pipe, (image + 1) / 2, "a", steps=1, guidance=1.0, noise_level=320, low_res_noise_level=level,
                 generator=torch.Generator().manual_seed(0))
    stock, same = (float(c["args"][0][:, 4:].std()) for c in calls)
    assert abs(stock - (1 - 0.69946) ** 0.5) < 0.05 and stock == same  # ᾱ_320 of the low-res scheduler
    assert "add_noise" not in vars(pipe.low_res_scheduler)  # the shadowing is undone after the call


def test_t5_runs_in_bfloat16_when_float16_is_asked(shared_cache):
    """T5 v1.1 overflows in float16: the encoder runs in bfloat16 (as IF's T5Embedder) and only its output is
    cast."""
    from cloak.models.deepfloyd import t5_embeddings
    from cloak.models.handle import Models

    path = Models(cache_dir=shared_cache, tiny=True).resolve("deepfloyd-if-t5", "t")[1]
    cpu = torch.device("cpu")
    half = t5_embeddings(path, ["a picture"], cpu, torch.float16)
    assert half.dtype == torch.float16 and bool(torch.isfinite(half).all())
    assert torch.equal(half, t5_embeddings(path, ["a picture"], cpu, torch.bfloat16).to(torch.float16))
    assert not torch.equal(half, t5_embeddings(path, ["a picture"], cpu, torch.float32).to(torch.float16))
