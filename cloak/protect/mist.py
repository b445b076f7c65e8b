"""Mist — textural and semantic losses, fused (Liang & Wu 2023).

protect.md §5, following psyker-team/mist ``mist_v3.py``. A targeted ℓ∞ PGD (advertorch style:
uniform random start, ``x ← proj(x − α·sign ∇J)``) *minimizes*

    J = L_tex − w·L_sem,   w = 10^(rate+3)

with ``L_tex = Σ (z(x) − z(x_tgt))²`` (sum-reduced squared error between scaled posterior samples of
the image and of the target texture) and ``L_sem = L_dn(θ0, x, c)`` (the LDM training loss at one
random t). The modes follow the code's numbering, not the README's: semantic (0) minimizes −L_sem
only, textural (1) L_tex only, fused (2) both. As in the code, the textural and the semantic terms
use two independent posterior samples of the same encoding. The target is cloak's own texture
(``cloak/data/mist_target.png``, drawn by ``make_mist_target.py``) unless ``--target-image`` names
one; it is resized to the working resolution. Terms are per image (the released code runs one
image at a time), so w keeps its meaning at any batch size. ``block_num`` > 1 (processing the image
in tiles to save memory) is not implemented; 1 is the released default.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from cloak.adversarial.per_image import ImageStreams, per_image_pgd
from cloak.adversarial.target import describe, load_target, target_path, textural_distances
from cloak.diffusion import LatentCache, denoising_loss, encode_prompts
from cloak.diffusion.dreambooth import autocast_for
from cloak.diffusion.vae import load_vae
from cloak.io.images import ImageSet
from cloak.protect.base import BudgetOptions, ProtectMethod, ProtectResult

DEFAULT_TARGET = Path(__file__).resolve().parent.parent / "data" / "mist_target.png"
MODES = {"semantic": 0, "textural": 1, "fused": 2}  # the released code's numbering


class MistOptions(BudgetOptions):
    eps: float = Field(16.0, ge=0, description="ℓ∞ budget", json_schema_extra={"unit": "unit"})
    alpha: float = Field(1.0, ge=0, description="PGD step size", json_schema_extra={"unit": "unit"})
    unit: Literal["m11", "01", "255"] = Field("255", description="unit of eps and alpha (255 = 8-bit levels "
                                                                  "of [0,1]: 16 = 16/255)")
    steps: int = Field(100, ge=0, description="PGD steps")
    mode: Literal["semantic", "textural", "fused"] = Field(
        "fused", description="loss: semantic (code mode 0: −L_sem), textural (1: L_tex), fused (2: L_tex − w·L_sem)")
    rate: float = Field(1.0, description="fusion weight exponent: w = 10^(rate+3)")
    prompt: str = Field("a photo", description="text condition of L_sem (released: 'a painting' for styles, "
                                               "'a photo' for objects)")
    target_image: str | None = Field(None, description="target texture (same as --target-image); default: "
                                                       "cloak's own pattern")
    random_start: bool = Field(True, description="start from a uniform random point of the ε-ball (as released)")
    batch_size: int = Field(4, ge=1, description="images per forward pass. Each image draws from its own random "
                            "stream, but batched kernels round differently from single ones and the sign step "
                            "can amplify that into a few levels: only batch_size=1 gives bytes that never depend "
                            "on the other images (their order, --resume)")


class Mist(ProtectMethod):
    paper = "Liang & Wu, Mist: Towards Improved Adversarial Examples for Diffusion Models, 2023 (arXiv 2305.12683)"
    implements = "Mist per psyker-team/mist mist_v3.py + Masked_PGD.py (targeted Linf PGD on L_tex − w·L_sem, " \
                 "modes numbered as in the code)"
    notes = "Default model: sd14. Target: --target-image, else cloak's own periodic texture " \
            "(cloak/data/mist_target.png, Apache-2.0, made by make_mist_target.py) [PROP]. Per-image: each " \
            "image's result is independent of the others."
    Options = MistOptions
    proposals: ClassVar[tuple[str, ...]] = ("prompt", "target_image")
    group = False
    steps_option = "steps"
    default_model = "sd14"
    tiny_options: ClassVar[dict] = {"steps": 4}

    def __call__(self, images: ImageSet) -> ProtectResult:
        ctx, o = self.ctx, self.opts
        semantic, textural = o.mode != "textural", o.mode != "semantic"
        weight = 10.0 ** (o.rate + 3)
        # The textural mode needs no UNet: load the VAE alone then.
        sd = ctx.models.sd(ctx.model) if semantic else None
        vae = sd.vae if sd is not None else load_vae(ctx.models, ctx.model)
        scaling = vae.config.scaling_factor
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        h, w = images.pixels.shape[-2:]
        latent_shape = (vae.config.latent_channels, h // f, w // f)

        target_info, target = None, None
        if not textural and target_path(ctx, o.target_image) is not None:
            ctx.warn("mist: the target image is not used in semantic mode")
        if textural:
            path = target_path(ctx, o.target_image)
            source = ("--target-image" if ctx.extras.get("target_image") else "option") if path else "builtin"
            path = path or DEFAULT_TARGET
            # The target's posterior is encoded once; each step draws a fresh sample from it, as re-encoding would.
            target = LatentCache.encode(vae, load_target(path, (h, w)).to(ctx.device))
            target_info = describe(path, source)
        text = None
        if semantic:
            with torch.no_grad():
                text = encode_prompts(sd.tokenizer, sd.text_encoder, [o.prompt])

        def terms(x: torch.Tensor, streams: ImageStreams):
            """(L_tex, L_sem) per image, each None where the mode does not use it."""
            dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
            tex = sem = None
            if textural:
                z = (dist.mean + dist.std * streams.randn(latent_shape, x.device, dist.mean.dtype)) * scaling
                z_tgt = (target.mean + target.std * streams.randn(latent_shape, x.device, dist.mean.dtype)) * scaling
                tex = (z.float() - z_tgt.float()).pow(2).flatten(1).sum(1)
            if semantic:
                draw = streams.draw(latent_shape, sd.noise_scheduler, x.device)
                z = (dist.mean + dist.std * draw.posterior_noise.to(dist.mean.dtype)) * scaling
                with autocast_for(z.device):
                    sem = denoising_loss(sd.unet, sd.noise_scheduler, z, text.to(z.dtype), ctx.generator,
                                         timesteps=draw.timesteps, noise=draw.noise, reduction="none")
            return tex, sem

        def objective(x: torch.Tensor, streams: ImageStreams) -> torch.Tensor:
            tex, sem = terms(x, streams)
            if o.mode == "semantic":
                return -sem
            if o.mode == "textural":
                return tex
            return tex - weight * sem

        steps = ctx.iters(o.steps)
        x0 = images.pixels.to(ctx.device)
        streams = ImageStreams.for_images(images.pixels, ctx.seed)
        with ctx.progress.task(f"mist {o.mode}", steps * -(-len(x0) // o.batch_size)) as bar:
            run = per_image_pgd(x0, streams, objective, steps=steps, eps=o.eps_m11, alpha=o.alpha_m11, ascent=False,
                                random_start=o.random_start, batch_size=o.batch_size, task=bar)

        records = [{"objective_first": float(a), "objective_last": float(b)}
                   for a, b in zip(run.first_loss, run.final_loss)]
        summary = {"steps": steps, "mode": o.mode, "mode_code": MODES[o.mode], "fusion_weight": weight,
                   "objective_first": float(run.first_loss.mean()), "objective_last": float(run.final_loss.mean()),
                   "objective_note": "J (minimized) on one random draw per step; first = the first step (random "
                                     "start), last = mean over the last 10 % of steps"}
        if textural:
            # The textural distance with posterior means: deterministic, comparable clean vs protected.
            before, after = (textural_distances(vae, pixels, target.mean, scaling, o.batch_size)
                             for pixels in (x0, run.pixels))
            for rec, a, b in zip(records, before, after):
                rec.update(textural_distance_clean=float(a), textural_distance=float(b))
            summary.update(target=target_info, textural_distance_clean=float(before.mean()),
                           textural_distance=float(after.mean()),
                           textural_distance_note="Σ(s·(E(x).mean − E(target).mean))², before 8-bit rounding; "
                                                  "lower = closer to the target texture")
        return ProtectResult(run.pixels, records, summary=summary)
