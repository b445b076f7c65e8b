"""A fixed-draw denoising loss: the same (t, ε) for every model, so two models can be compared.

Used to measure what an attacker learned: the fine-tuned model's L_dn on clean photos of the
subject with the instance prompt (lower = the subject was learned better).
"""

from __future__ import annotations

import torch

from cloak.diffusion.loss import LatentCache, training_target


@torch.no_grad()
def fixed_denoising_loss(unet, text_encoder, sd, pixels: torch.Tensor, prompt: str, *, seed: int = 1234,
                         timesteps: int = 10, repeats: int = 2) -> float:
    """Mean L_dn over every image × ``timesteps`` evenly spaced t × ``repeats`` noise draws."""
    from cloak.diffusion.loss import encode_prompts

    gen = torch.Generator("cpu").manual_seed(seed)
    cache = LatentCache.encode(sd.vae, pixels.to(sd.device, sd.vae.dtype))
    states = encode_prompts(sd.tokenizer, text_encoder, [prompt])
    total_t = sd.noise_scheduler.config.num_train_timesteps
    grid = torch.linspace(0, total_t - 1, timesteps).round().long()
    losses = []
    for _ in range(repeats):
        for i in range(len(cache)):
            z = cache.sample([i], gen).expand(len(grid), -1, -1, -1)
            noise = torch.randn(z.shape, generator=gen).to(z.device, z.dtype)
            t = grid.to(z.device)
            noisy = sd.noise_scheduler.add_noise(z, noise, t)
            pred = unet(noisy, t, states.expand(len(grid), -1, -1).to(z.dtype)).sample
            target = training_target(sd.noise_scheduler, z, noise, t)
            losses.append(torch.mean((pred.float() - target.float()) ** 2).item())
    return float(sum(losses) / len(losses))
