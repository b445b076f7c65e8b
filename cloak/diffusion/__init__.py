"""Shared diffusion math, written once: every method that fine-tunes or attacks uses these."""

from cloak.diffusion.loss import (
    Draw,
    LatentCache,
    denoising_loss,
    encode_latents,
    encode_latents_in_loss,
    encode_prompts,
    sample_noise,
    sample_timesteps,
    training_target,
)

__all__ = [
    "Draw",
    "LatentCache", "denoising_loss", "encode_latents", "encode_latents_in_loss", "encode_prompts", "sample_noise",
    "sample_timesteps", "training_target",
]
