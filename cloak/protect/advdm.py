"""AdvDM — adversarial examples for diffusion models (Liang et al., ICML'23).

protect.md §3. PGD-ℓ∞ ascent on the frozen model's denoising loss L_dn(θ0, x, c); each step draws
one fresh Monte-Carlo sample (t, ε, posterior noise) per image — the paper's estimate of the loss
over all timesteps. It is Mist's "semantic" mode with a random start. The paper's own (ε, α, N)
table was not available to us, so every default is a proposal: Mist's released settings
(ε 16/255, α 1/255 in [0,1] units, 100 steps, random start) with the attacker's instance prompt and
SD 2.1-base, the surrogate of the Anti-DreamBooth protocol cloak evaluates against.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from cloak.adversarial.per_image import ImageStreams, per_image_pgd
from cloak.diffusion import denoising_loss, encode_latents_in_loss, encode_prompts
from cloak.diffusion.dreambooth import autocast_for
from cloak.io.images import ImageSet
from cloak.protect.base import BudgetOptions, ProtectMethod, ProtectResult


class AdvDMOptions(BudgetOptions):
    eps: float = Field(16.0, ge=0, description="ℓ∞ budget", json_schema_extra={"unit": "unit"})
    alpha: float = Field(1.0, ge=0, description="PGD step size", json_schema_extra={"unit": "unit"})
    unit: Literal["m11", "01", "255"] = Field("255", description="unit of eps and alpha (255 = 8-bit levels "
                                                                  "of [0,1]: 16 = 16/255)")
    steps: int = Field(100, ge=0, description="PGD steps, one fresh (t, ε) draw per image each")
    random_start: bool = Field(True, description="start from a uniform random point of the ε-ball")
    prompt: str = Field("a photo of sks person", description="text condition c of the denoising loss")
    batch_size: int = Field(4, ge=1, description="images per forward pass. Each image draws from its own random "
                            "stream, but batched kernels round differently from single ones and the sign step "
                            "can amplify that into a few levels: only batch_size=1 gives bytes that never depend "
                            "on the other images (their order, --resume)")


class AdvDM(ProtectMethod):
    paper = "Liang et al., Adversarial Example Does Good: Preventing Painting Imitation from Diffusion Models " \
            "via Adversarial Examples, ICML 2023 (arXiv 2302.04578)"
    implements = "AdvDM: PGD ascent on the frozen LDM's denoising loss, fresh Monte-Carlo (t, ε) per step " \
                 "(= psyker-team/mist mist_v3.py mode 0, plus random start)"
    notes = "Default model: sd21-base [PROP]. Per-image: each image's result is independent of the others."
    Options = AdvDMOptions
    proposals: ClassVar[tuple[str, ...]] = ("eps", "alpha", "unit", "steps", "random_start", "prompt")
    group = False
    steps_option = "steps"
    default_model = "sd21-base"
    tiny_options: ClassVar[dict] = {"steps": 4}

    def __call__(self, images: ImageSet) -> ProtectResult:
        ctx, o = self.ctx, self.opts
        if ctx.extras.get("target_image"):
            ctx.warn("advdm is untargeted: --target-image is ignored")
        sd = ctx.models.sd(ctx.model)
        with torch.no_grad():
            text = encode_prompts(sd.tokenizer, sd.text_encoder, [o.prompt])
        f = sd.vae_scale_factor
        latent_shape = (sd.unet.config.in_channels, images.pixels.shape[-2] // f, images.pixels.shape[-1] // f)

        def objective(x: torch.Tensor, streams: ImageStreams) -> torch.Tensor:
            draw = streams.draw(latent_shape, sd.noise_scheduler, x.device)
            latents = encode_latents_in_loss(sd.vae, x, posterior_noise=draw.posterior_noise)
            with autocast_for(latents.device):
                # Per-image losses: the sum's gradient w.r.t. image i is that image's alone.
                return denoising_loss(sd.unet, sd.noise_scheduler, latents, text.to(latents.dtype), ctx.generator,
                                      timesteps=draw.timesteps, noise=draw.noise, reduction="none")

        steps = ctx.iters(o.steps)
        x0 = images.pixels.to(ctx.device)
        streams = ImageStreams.for_images(images.pixels, ctx.seed)
        with ctx.progress.task("advdm", steps * -(-len(x0) // o.batch_size)) as bar:
            run = per_image_pgd(x0, streams, objective, steps=steps, eps=o.eps_m11, alpha=o.alpha_m11, ascent=True,
                                random_start=o.random_start, batch_size=o.batch_size, task=bar)
        records = [{"denoising_loss_first": float(a), "denoising_loss_last": float(b)}
                   for a, b in zip(run.first_loss, run.final_loss)]
        return ProtectResult(run.pixels, records, summary={
            "steps": steps, "prompt": o.prompt,
            "denoising_loss_first": float(run.first_loss.mean()), "denoising_loss_last": float(run.final_loss.mean()),
            "denoising_loss_note": "L_dn of the frozen model on one random (t, ε) per step; first = the first step "
                                   "(random start), last = mean over the last 10 % of steps; noisy estimates"})
