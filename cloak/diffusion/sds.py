"""Score distillation: the denoising-loss gradient without the UNet's Jacobian (Poole et al. 2022).

``∇_z L_dn = 2·√ᾱ_t · (∂ε̂/∂z_t)ᵀ (ε̂ − ε) / n``; score distillation drops the UNet Jacobian and the
constants and keeps ``g = ε̂(z_t, t, c) − ε``. The UNet then runs forward only, under ``no_grad``: no
activations are kept for a backward pass through it, which is the whole saving (Xue et al. 2024, §4).
Gradients still flow through the VAE encoder into the pixels: the encoder is the part an attacker
cannot route around, and the part those authors found to be vulnerable.

A v-prediction model's output is turned into ε first (``ε̂ = √ᾱ·v̂ + √(1−ᾱ)·z_t``), so ``g`` keeps its
meaning on SD 2.x-v; SD 2.1-base and SD 1.x predict ε directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScoreResidual:
    """``g = ε̂ − ε`` per latent element (no gradient), and the denoising loss it implies, per image."""

    residual: torch.Tensor  # B×C×h×w, detached
    loss: torch.Tensor  # (B,) mean(g²): L_dn of an ε-prediction model on the same draw

    def surrogate(self, latents: torch.Tensor) -> torch.Tensor:
        """A per-image value whose gradient w.r.t. ``latents`` is ``g`` and whose value is the loss.

        ``Σ g·z − sg(Σ g·z) + sg(L)``: backpropagating it sends ``g`` through whatever produced the
        latents (the VAE encoder), and the reported number is the denoising loss of this draw.
        """
        linear = (self.residual.to(latents.dtype) * latents).flatten(1).sum(1).float()
        return linear - linear.detach() + self.loss


def predicted_noise(unet, scheduler, noisy: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor):
    """ε̂(z_t, t, c), whatever the model predicts."""
    pred = unet(noisy, timesteps, text_states).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return pred
    if kind == "v_prediction":
        alphas = scheduler.alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, 1, 1, 1)
        return alphas.sqrt() * pred.float() + (1 - alphas).sqrt() * noisy.float()
    raise ValueError(f"unsupported prediction_type {kind!r}")


@torch.no_grad()
def score_residual(unet, scheduler, latents: torch.Tensor, text_states: torch.Tensor, *, timesteps: torch.Tensor,
                   noise: torch.Tensor) -> ScoreResidual:
    """``ε̂(√ᾱ_t z + √(1−ᾱ_t) ε, t, c) − ε`` for one draw (t, ε) per image; UNet forward only."""
    latents = latents.detach()
    noise = noise.to(latents.device, latents.dtype)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if text_states.shape[0] != latents.shape[0]:
        text_states = text_states.expand(latents.shape[0], *text_states.shape[1:])
    eps = predicted_noise(unet, scheduler, noisy, timesteps, text_states.to(latents.dtype))
    residual = eps.float() - noise.float()
    return ScoreResidual(residual, residual.pow(2).flatten(1).mean(1))
