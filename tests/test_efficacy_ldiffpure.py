"""LDiffPure moves a protected photo back towards the clean one, on a stand-in whose answer is known (issue 15 §4).

tiny-sd cannot show this: its random VAE's reconstruction D(E(x)) is far from x (MSE ≈ 0.39 in [-1,1]², see
the IMPRESS test), so anything LDiffPure decodes is further from the clean photo than a ±16/255 perturbation
is. The stand-in here is a latent diffusion model for which the right denoiser is exact and cheap:

* VAE: the identity (latent = the pixels, scaling factor 1, posterior std 1e-3), so LDiffPure's encode and
  decode lose nothing and only its diffusion part is tested;
* "UNet": the exact ε-prediction of a Gaussian image model fitted, in the test, to 32 photos of the test's
  domain (identity_set: crops of one colour field with per-pixel noise): mean image μ and a stationary power
  spectrum P per channel, so E[x₀ | z_t] is a Wiener filter, ε̂ = (z_t − √ᾱ_t·E[x₀|z_t]) / √(1−ᾱ_t). It ignores
  the prompt (classifier-free guidance is then a no-op);
* tokenizer, text encoder and DDPM schedule from tiny-sd.

The perturbation is AdvDM (cloak's, default budget 16/255, 40 steps) against the same stand-in. LDiffPure then
runs with its published settings (t = 300, a DDPM step at every timestep to 0).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
from conftest import identity_set
from PIL import Image


class _IdentityVAE(torch.nn.Module):
    """encode → a posterior whose mean is the image itself; decode → the latent. Lossless by construction."""

    def __init__(self, std: float = 1e-3):
        super().__init__()
        self.std = std
        self.config = SimpleNamespace(scaling_factor=1.0, block_out_channels=(3,), latent_channels=3)
        self.register_buffer("anchor", torch.zeros(()))  # gives the module a device and a dtype

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x, std=torch.full_like(x, self.std)))

    def decode(self, z):
        return SimpleNamespace(sample=z)


class _GaussianDenoiser(torch.nn.Module):
    """The exact ε-prediction for x₀ ~ N(μ, Σ) with Σ diagonal in the 2-D Fourier basis (per channel power P)."""

    def __init__(self, mean: torch.Tensor, power: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)  # 3×H×W
        self.register_buffer("power", power)  # 3×H×W, E|FFT(x − μ)|² / (H·W): variance per frequency
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.config = SimpleNamespace(in_channels=3, sample_size=mean.shape[-1])

    def forward(self, sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1)
        a = self.alphas_cumprod[t].to(sample.dtype).view(-1, 1, 1, 1).expand(len(sample), 1, 1, 1)
        centred = sample - a.sqrt() * self.mean
        gain = a.sqrt() * self.power / (a * self.power + (1 - a))  # Wiener gain per frequency
        x0 = self.mean + torch.fft.ifft2(torch.fft.fft2(centred) * gain).real
        return SimpleNamespace(sample=(sample - a.sqrt() * x0) / (1 - a).sqrt())


def _m11(folder) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _stand_in(tiny_sd, tmp_path):
    from cloak.models.handle import SDModel

    train = _m11(identity_set(tmp_path / "prior", 32, 10))
    mean = train.mean(0)
    h, w = mean.shape[-2:]
    power = (torch.fft.fft2(train - mean).abs() ** 2).mean(0) / (h * w)
    power = power.clamp_min(1e-6)
    unet = _GaussianDenoiser(mean, power, tiny_sd.noise_scheduler.alphas_cumprod.float())
    return SDModel(id="gaussian-stand-in", path=tmp_path, vae=_IdentityVAE(), unet=unet,
                   text_encoder=tiny_sd.text_encoder, tokenizer=tiny_sd.tokenizer,
                   noise_scheduler=tiny_sd.noise_scheduler, stand_in=True, device=torch.device("cpu"),
                   dtype=torch.float32)


def _ctx(sd, seed: int = 0):
    from cloak._progress import Progress
    from cloak.methods import RunContext

    models = SimpleNamespace(sd=lambda *a, **k: sd)
    return RunContext(models=models, model=sd.id, device=torch.device("cpu"), dtype=torch.float32, seed=seed,
                      generator=torch.Generator().manual_seed(seed), resolution=64, cache_dir=sd.path,
                      progress=Progress())


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    from cloak.adversarial.eot import gaussian_blur

    return gaussian_blur(x, 2 * math.ceil(3 * sigma) + 1, sigma)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


def _purify(sd, pixels: torch.Tensor, t: int) -> torch.Tensor:
    """LDiffPure (seed 0) on each image in turn: two sets purified this way share every random draw."""
    from cloak.purify.ldiffpure import LatentDiffPure

    purifier = LatentDiffPure(LatentDiffPure.Options(t=t), _ctx(sd))
    purifier.prepare()
    return torch.cat([purifier(p[None]) for p in pixels])


def test_ldiffpure_brings_an_advdm_photo_closer_to_the_clean_one(tiny_sd, tmp_path):
    """At t = 30 (cloak's tiny setting), LDiffPure's output is closer to the clean photo than the AdvDM-protected
    input is, for every image: MSE (in [-1,1]²) seen 0.0146/0.0147/0.0152 → 0.0065/0.0054/0.0046 (in a side run
    without 8-bit rounding: ±16-level random-sign noise 0.0154 → 0.0055 on average; the clean photo itself comes
    out at 0.0050, the sampler's own variance).

    At the published t = 300 the sampler's own variance swamps that on this stand-in (a Gaussian prior is
    broad: the clean photo comes out at MSE 0.0144, the protected one at 0.0136 from 0.0148), so there the test
    asks what LDiffPure is for: with the same random draws, the perturbation's footprint on the output,
    purify(protected) − purify(clean), is smaller than the perturbation itself, for every image. Seen: MSE
    0.0010/0.0003/0.0001 against 0.0146/0.0147/0.0152.

    Not asserted, because it does not hold here: LDiffPure beating a Gaussian blur. A σ = 1 blur of the
    protected photo is at MSE 0.0048/0.0036/0.0027 from clean, better than LDiffPure at either t; the stand-in's
    prior knows no more than a blur does about these photos, and the sampler adds its own variance."""
    from cloak.io.images import read_images
    from cloak.protect.advdm import AdvDM

    torch.set_num_threads(1)  # conftest's _threads_restored puts the count back afterwards
    sd = _stand_in(tiny_sd, tmp_path)
    images = read_images(identity_set(tmp_path / "clean", 3, 2), 64)
    clean = images.pixels
    protected = AdvDM(AdvDM.Options(steps=40), _ctx(sd))(images).pixels
    protected = ((protected + 1) * 127.5).round() / 127.5 - 1  # as saved: 8-bit PNG levels
    assert (protected - clean).abs().max() <= 16 / 127.5 + 1e-6

    before = _mse(protected, clean)
    after = _mse(_purify(sd, protected, 30), clean)
    footprint = _mse(_purify(sd, protected, 300), _purify(sd, clean, 300))
    blur = _mse(_blur(protected, 1.0), clean)
    print("ldiffpure MSE to clean:", {"protected": before.tolist(), "purified t=30": after.tolist(),
                                      "footprint t=300": footprint.tolist(), "blur σ=1": blur.tolist()})
    assert (after < 0.5 * before).all(), (before, after)
    assert (footprint < 0.5 * before).all(), (before, footprint)
