"""PhotoGuard — the encoder attack (Salman et al., ICML'23).

protect.md §4. Only the VAE encoder of the model is used: PGD-ℓ∞ *descent* on
``‖E(x).latent_dist.mean − z_tgt‖₂`` (unscaled posterior mean, no sampling), from a uniform random
start, with a step that decays linearly from α to α/100 over the N steps, as in MadryLab/photoguard
``demo_simple_attack_*.ipynb``. The img2img demo pulls toward the zero latent, the inpainting demo
toward a target image's latent; cloak's default target is the latent of a mid-gray image [PROP],
``--target-image`` picks another. The "diffusion attack" (backpropagating through the sampler) is
not shipped.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from cloak.adversarial.per_image import ImageStreams, per_image_pgd
from cloak.adversarial.target import describe, load_target, target_path
from cloak.diffusion.vae import load_vae
from cloak.io.images import ImageSet
from cloak.protect.base import BudgetOptions, ProtectMethod, ProtectResult

FINAL_STEP_RATIO = 0.01  # the demos decay α to α/100


class PhotoGuardOptions(BudgetOptions):
    eps: float = Field(0.06, ge=0, description="ℓ∞ budget (0.06 m11 ≈ 7.65/255)", json_schema_extra={"unit": "unit"})
    alpha: float = Field(0.02, ge=0, description="initial PGD step, decays linearly to alpha/100",
                         json_schema_extra={"unit": "unit"})
    unit: Literal["m11", "01", "255"] = Field("m11", description="unit of eps and alpha")
    steps: int = Field(1000, ge=0, description="PGD steps N")
    target: Literal["gray", "zero"] = Field(
        "gray", description="target when no target image is given: latent mean of a mid-gray image, or the zero "
                            "latent (img2img demo)")
    target_image: str | None = Field(None, description="target image (same as --target-image); its latent mean "
                                                       "is the target")
    random_start: bool = Field(True, description="start from a uniform random point of the ε-ball (as released)")
    batch_size: int = Field(4, ge=1, description="images per forward pass. Each image draws from its own random "
                            "stream, but batched kernels round differently from single ones and the sign step "
                            "can amplify that into a few levels: only batch_size=1 gives bytes that never depend "
                            "on the other images (their order, --resume)")


def step_schedule(alpha: float, steps: int):
    """``α_i = α − (α − α/100)·i/N`` for i = 0..N−1 (the demos' ``actual_step_size``)."""
    return lambda i: alpha - (alpha - alpha * FINAL_STEP_RATIO) * i / steps


class PhotoGuard(ProtectMethod):
    paper = "Salman et al., Raising the Cost of Malicious AI-Powered Image Editing, ICML 2023 (arXiv 2302.06588)"
    implements = "PhotoGuard encoder attack per MadryLab/photoguard demo notebooks (VAE encoder only, unscaled " \
                 "latent mean, linear step decay α→α/100, random start)"
    notes = "Default model: sd15 (only its VAE is loaded). Target: --target-image, else a mid-gray image [PROP]. " \
            "Per-image: each image's result is independent of the others."
    Options = PhotoGuardOptions
    proposals: ClassVar[tuple[str, ...]] = ("target",)
    group = False
    steps_option = "steps"
    default_model = "sd15"
    tiny_options: ClassVar[dict] = {"steps": 8}

    def __call__(self, images: ImageSet) -> ProtectResult:
        ctx, o = self.ctx, self.opts
        vae = load_vae(ctx.models, ctx.model)
        size = tuple(images.pixels.shape[-2:])

        def latent_mean(pixels: torch.Tensor) -> torch.Tensor:
            return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean.float()

        path = target_path(ctx, o.target_image)
        with torch.no_grad():
            if path is not None:
                z_tgt = latent_mean(load_target(path, size).to(ctx.device))
                target_info = describe(path, "--target-image" if ctx.extras.get("target_image") else "option")
            elif o.target == "gray":
                z_tgt = latent_mean(torch.zeros(1, 3, *size, device=ctx.device))
                target_info = {"kind": "mid-gray image (all zeros in [-1,1])"}
            else:
                z_tgt = None
                target_info = {"kind": "zero latent"}

        def distance(pixels: torch.Tensor, _streams=None) -> torch.Tensor:
            z = latent_mean(pixels)
            return (z if z_tgt is None else z - z_tgt).flatten(1).norm(dim=1)

        steps = ctx.iters(o.steps)
        x0 = images.pixels.to(ctx.device)
        streams = ImageStreams.for_images(images.pixels, ctx.seed)
        with ctx.progress.task("photoguard", steps * -(-len(x0) // o.batch_size)) as bar:
            run = per_image_pgd(x0, streams, distance, steps=steps, eps=o.eps_m11,
                                alpha=step_schedule(o.alpha_m11, max(steps, 1)), ascent=False,
                                random_start=o.random_start, batch_size=o.batch_size, task=bar)
        with torch.no_grad():
            before = torch.cat([distance(x0[i:i + o.batch_size]) for i in range(0, len(x0), o.batch_size)]).cpu()
            after = torch.cat([distance(run.pixels[i:i + o.batch_size])
                               for i in range(0, len(x0), o.batch_size)]).cpu()
        records = [{"latent_distance_clean": float(a), "latent_distance": float(b)} for a, b in zip(before, after)]
        return ProtectResult(run.pixels, records, summary={
            "steps": steps, "target": target_info,
            "latent_distance_clean": float(before.mean()), "latent_distance": float(after.mean()),
            "latent_distance_note": "‖E(x).mean − z_tgt‖₂ of the VAE posterior mean (unscaled), before 8-bit "
                                    "rounding; lower = closer to the target"})
