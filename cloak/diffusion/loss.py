"""The denoising loss L_dn (protect.md §0) and the encoders around it.

Random draws (t, ε, posterior samples) come from an explicit CPU ``torch.Generator`` and are moved
to the device, so a seed gives the same numbers on every device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sample_noise(shape, generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device, dtype)


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (n,), generator=generator).to(device)


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP hidden states (B×77×D), ``max_length`` padding, no attention mask (as SD training does)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def encode_latents(vae, pixels: torch.Tensor, generator: torch.Generator | None = None, *, sample: bool = True,
                   posterior_noise: torch.Tensor | None = None):
    """``s·E(x)``: a posterior sample (or the mean) scaled by the VAE's scaling factor.

    ``posterior_noise`` fixes the sample's noise (to evaluate several candidates on one draw).
    """
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    if sample:
        if posterior_noise is None:
            posterior_noise = sample_noise(dist.mean.shape, generator, dist.mean.device, dist.mean.dtype)
        z = dist.mean + dist.std * posterior_noise.to(dist.mean.device, dist.mean.dtype)
    else:
        z = dist.mean
    return z * vae.config.scaling_factor


def encode_latents_in_loss(vae, pixels: torch.Tensor, run_dtype: torch.dtype | None = None, *,
                           posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`encode_latents` as part of a loss that ∇ₓ flows through: under the same autocast as the UNet
    that reads the latents (cloak.diffusion.precision), and back in fp32.

    On CUDA the default run keeps fp32 weights and computes in bf16 (ARCHITECTURE §7). The VAE encoder is
    part of that compute: at 512² its forward is 1.1 TFLOP per image against the UNet's 0.8 (SD 2.1 shapes,
    torch's FLOP counter), so in a PGD step, which also runs it backward, it is most of the work. Where no
    autocast applies (fp32 on the CPU) or the VAE already holds low-precision weights (``--dtype bf16``),
    this is :func:`encode_latents` itself, to the byte.
    """
    from cloak.diffusion.precision import autocast_dtype

    compute = autocast_dtype(pixels.device, run_dtype)
    if compute is None or vae.dtype != torch.float32:
        return encode_latents(vae, pixels, posterior_noise=posterior_noise)
    with torch.autocast(pixels.device.type, dtype=compute):
        latents = encode_latents(vae, pixels, posterior_noise=posterior_noise)
    return latents.float()


@dataclass
class Draw:
    """One Monte-Carlo draw of L_dn's randomness: timesteps, diffusion noise, posterior noise."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    posterior_noise: torch.Tensor

    @classmethod
    def sample(cls, n: int, latent_shape: tuple[int, ...], scheduler, generator: torch.Generator, device,
               timesteps: torch.Tensor | None = None) -> Draw:
        t = timesteps if timesteps is not None else sample_timesteps(
            n, scheduler.config.num_train_timesteps, generator, device)
        return cls(t.to(device), sample_noise((n, *latent_shape), generator, device),
                   sample_noise((n, *latent_shape), generator, device))

    def rows(self, rows: slice) -> Draw:
        """The same draw for a slice of the images (a chunk of a batch keeps its images' randomness)."""
        return dataclasses.replace(self, timesteps=self.timesteps[rows], noise=self.noise[rows],
                                   posterior_noise=self.posterior_noise[rows])

    def repeat(self, copies: int) -> Draw:
        """The same draw for ``copies`` candidates stacked candidate-major (rows c·n..c·n+n−1 are candidate c):
        every candidate sees its images' own randomness, as if evaluated alone."""
        return dataclasses.replace(self, timesteps=self.timesteps.repeat(copies),
                                   noise=tile_rows(self.noise, copies),
                                   posterior_noise=tile_rows(self.posterior_noise, copies))


def tile_rows(t: torch.Tensor, copies: int) -> torch.Tensor:
    """``t`` stacked ``copies`` times along its first dimension."""
    return t.repeat(copies, *([1] * (t.dim() - 1)))


@dataclass
class LatentCache:
    """Posterior (mean, std) of images that never change, encoded once; fresh samples on demand.

    Sampling ``mean + std·n`` from the cached posterior is exactly a new ``latent_dist.sample()``, at
    none of the VAE cost (ARCHITECTURE §7: encode clean and class images once).
    """

    mean: torch.Tensor
    std: torch.Tensor
    scaling: float

    @classmethod
    @torch.no_grad()
    def encode(cls, vae, pixels: torch.Tensor, batch_size: int = 8) -> LatentCache:
        means, stds = [], []
        for start in range(0, len(pixels), batch_size):
            dist = vae.encode(pixels[start:start + batch_size].to(vae.device, vae.dtype)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        return cls(torch.cat(means), torch.cat(stds), vae.config.scaling_factor)

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, index, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[index], self.std[index]
        return (mean + std * sample_noise(mean.shape, generator, mean.device, mean.dtype)) * self.scaling


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """ε for ε-prediction models, v = √ᾱ ε − √(1−ᾱ) z for v-prediction models."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def denoising_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    text_states: torch.Tensor,
    generator: torch.Generator,
    *,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``mean((f_θ(z_t, t, c) − target)²)`` with t ~ U{0..T−1} and ε ~ N(0, I) per image.

    ``reduction="none"`` returns the per-image mean (B,), for methods that weight images.
    """
    n = latents.shape[0]
    if noise is None:
        noise = sample_noise(latents.shape, generator, latents.device, latents.dtype)
    if timesteps is None:
        timesteps = sample_timesteps(n, scheduler.config.num_train_timesteps, generator, latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if text_states.shape[0] != n:
        text_states = text_states.expand(n, *text_states.shape[1:])
    pred = unet(noisy, timesteps, text_states).sample
    target = training_target(scheduler, latents, noise, timesteps)
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    per_image = err.flatten(1).mean(1)
    return per_image if reduction == "none" else per_image.mean()
