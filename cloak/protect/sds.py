"""SDS(+), SDS(−), SDS-T — score-distillation protection (Xue et al., ICLR 2024).

docs/spec-additions.md §P1, following xavihart/Diff-Protect ``code/attacks.py`` ``pgd_sds`` and
``configs/attack/base.yaml``. AdvDM's PGD on the frozen LDM's denoising loss, with the gradient of
score distillation (:mod:`cloak.diffusion.sds`): the UNet runs forward only and ``g = ε̂ − ε`` is sent
back through the VAE encoder alone. Each step draws one (t ~ U{0..T−1}, ε, posterior sample) per image.

* ``sds-plus`` — SDS(+): ascend the loss, ``x ← x + α·sign(∇)``, as AdvDM does.
* ``sds-minus`` — SDS(−): *descend* it, ``x ← x − α·sign(∇)``; the paper's finding is that this
  protects better, and it is the released config's default (``g_mode: "-"``).
* ``sds-t`` — SDS-T: SDS(−) plus a pull of the latent toward a target texture, the step being
  ``sign(−r·∇_sds − ∇ L_tex)`` with ``L_tex = Σ (z(x) − z(x_tgt))²`` (Mist's textural loss) and
  r = ``target_rate`` = 5 as released.

No random start (the released ``pgd_sds`` default). The released code has no quirk that changes the
result under these settings, so there is no ``--compat`` variant.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from cloak.adversarial.per_image import ImageStreams, per_image_pgd
from cloak.adversarial.target import describe, load_target, target_path, textural_distances
from cloak.diffusion import LatentCache, encode_prompts
from cloak.diffusion.dreambooth import autocast_for
from cloak.diffusion.sds import score_residual
from cloak.io.images import ImageSet
from cloak.protect.base import BudgetOptions, ProtectMethod, ProtectResult

DEFAULT_TARGET = Path(__file__).resolve().parent.parent / "data" / "mist_target.png"
PAPER = "Xue, Liang, Wu, Chen, Toward Effective Protection Against Diffusion-Based Mimicry through Score " \
        "Distillation, ICLR 2024 (arXiv 2311.12832)"


class SDSOptions(BudgetOptions):
    eps: float = Field(16.0, ge=0, description="ℓ∞ budget", json_schema_extra={"unit": "unit"})
    alpha: float = Field(1.0, ge=0, description="PGD step size", json_schema_extra={"unit": "unit"})
    unit: Literal["m11", "01", "255"] = Field("255", description="unit of eps and alpha (255 = 8-bit levels "
                                                                  "of [0,1]: 16 = 16/255)")
    steps: int = Field(100, ge=0, description="PGD steps, one fresh (t, ε) draw per image each")
    random_start: bool = Field(False, description="start from a uniform random point of the ε-ball (released: "
                                                  "no)")
    prompt: str = Field("a photo", description="text condition of the score (released default for photos; "
                                               "'a portrait photo' for portrait folders)")
    batch_size: int = Field(4, ge=1, description="images per forward pass. Each image draws from its own random "
                            "stream, but batched kernels round differently from single ones and the sign step "
                            "can amplify that into a few levels: only batch_size=1 gives bytes that never depend "
                            "on the other images (their order, --resume)")


class SDSTOptions(SDSOptions):
    target_rate: float = Field(5.0, ge=0, description="weight r of the SDS term against the textural term")
    target_image: str | None = Field(None, description="target texture (same as --target-image); default: "
                                                       "cloak's own pattern (as Mist)")


class _ScoreDistillation(ProtectMethod):
    paper = PAPER
    direction: ClassVar[Literal["+", "-"]] = "-"
    targeted: ClassVar[bool] = False
    Options = SDSOptions
    proposals: ClassVar[tuple[str, ...]] = ()
    group = False
    steps_option = "steps"
    default_model = "sd14"
    tiny_options: ClassVar[dict] = {"steps": 4}

    def __call__(self, images: ImageSet) -> ProtectResult:
        ctx, o = self.ctx, self.opts
        if ctx.extras.get("target_image") and not self.targeted:
            ctx.warn(f"{self.name} is untargeted: --target-image is ignored (sds-t uses one)")
        sd = ctx.models.sd(ctx.model)
        vae, scaling = sd.vae, sd.vae.config.scaling_factor
        with torch.no_grad():
            text = encode_prompts(sd.tokenizer, sd.text_encoder, [o.prompt])
        f = sd.vae_scale_factor
        h, w = images.pixels.shape[-2:]
        latent_shape = (sd.unet.config.in_channels, h // f, w // f)

        target = target_info = None
        if self.targeted:
            path = target_path(ctx, o.target_image)
            source = ("--target-image" if ctx.extras.get("target_image") else "option") if path else "builtin"
            path = path or DEFAULT_TARGET
            target = LatentCache.encode(vae, load_target(path, (h, w)).to(ctx.device))
            target_info = describe(path, source)

        def objective(x: torch.Tensor, streams: ImageStreams) -> torch.Tensor:
            """L_dn (sds±; r·L_dn + L_tex for sds-t) of one draw; its gradient is the score-distillation one."""
            draw = streams.draw(latent_shape, sd.noise_scheduler, x.device)
            dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
            z = (dist.mean + dist.std * draw.posterior_noise.to(dist.mean.dtype)) * scaling
            with autocast_for(z.device):
                score = score_residual(sd.unet, sd.noise_scheduler, z, text, timesteps=draw.timesteps,
                                       noise=draw.noise)
            value = score.surrogate(z)
            if not self.targeted:
                return value
            # As released, the textural term encodes the image again: its own posterior sample.
            z2 = (dist.mean + dist.std * streams.randn(latent_shape, x.device, dist.mean.dtype)) * scaling
            z_tgt = (target.mean + target.std * streams.randn(latent_shape, x.device, dist.mean.dtype)) * scaling
            return o.target_rate * value + (z2.float() - z_tgt.float()).pow(2).flatten(1).sum(1)

        steps = ctx.iters(o.steps)
        x0 = images.pixels.to(ctx.device)
        streams = ImageStreams.for_images(images.pixels, ctx.seed)
        with ctx.progress.task(self.name, steps * -(-len(x0) // o.batch_size)) as bar:
            run = per_image_pgd(x0, streams, objective, steps=steps, eps=o.eps_m11, alpha=o.alpha_m11,
                                ascent=self.direction == "+",
                                random_start=o.random_start, batch_size=o.batch_size, task=bar)
        label = "objective" if self.targeted else "denoising_loss"
        records = [{f"{label}_first": float(a), f"{label}_last": float(b)}
                   for a, b in zip(run.first_loss, run.final_loss)]
        summary = {"steps": steps, "prompt": o.prompt, "direction": self.direction,
                   f"{label}_first": float(run.first_loss.mean()), f"{label}_last": float(run.final_loss.mean()),
                   f"{label}_note": ("r·L_dn + L_tex (minimised)" if self.targeted else
                                     "L_dn of the frozen model") + " on one random draw per step; first = the "
                                     "first step, last = mean over the last 10 % of steps; noisy estimates"}
        if self.targeted:
            before, after = (textural_distances(vae, pixels, target.mean, scaling, o.batch_size)
                             for pixels in (x0, run.pixels))
            for rec, a, b in zip(records, before, after):
                rec.update(textural_distance_clean=float(a), textural_distance=float(b))
            summary.update(target=target_info, target_rate=o.target_rate, textural_distance_clean=float(before.mean()),
                           textural_distance=float(after.mean()),
                           textural_distance_note="Σ(s·(E(x).mean − E(target).mean))², before 8-bit rounding; "
                                                  "lower = closer to the target texture")
        return ProtectResult(run.pixels, records, summary=summary)


class SDSPlus(_ScoreDistillation):
    implements = "SDS(+): PGD ascent on L_dn with the score-distillation gradient ε̂−ε through the VAE encoder " \
                 "only (xavihart/Diff-Protect attacks.py pgd_sds, g_mode '+')"
    notes = "Default model: sd14 (as released). Per-image. Cheaper than advdm: no backward pass through the UNet."
    direction = "+"


class SDSMinus(_ScoreDistillation):
    implements = "SDS(−): PGD descent on L_dn with the score-distillation gradient ε̂−ε through the VAE encoder " \
                 "only (xavihart/Diff-Protect attacks.py pgd_sds, g_mode '-', the released default)"
    notes = "Default model: sd14 (as released). Per-image. The paper's recommended variant: minimising the " \
            "loss protects better than maximising it."
    direction = "-"


class SDST(_ScoreDistillation):
    implements = "SDS-T: SDS(−) plus Mist's textural pull to a target, step sign(−r·∇_sds − ∇L_tex), r = 5 " \
                 "(xavihart/Diff-Protect attacks.py pgd_sds with using_target)"
    notes = "Default model: sd14 (as released). Target: --target-image, else cloak's own periodic texture " \
            "(cloak/data/mist_target.png; the release uses Mist's MIST.png) [PROP]. Per-image."
    direction = "-"
    targeted = True
    Options = SDSTOptions
    proposals: ClassVar[tuple[str, ...]] = ("target_image",)
