"""PID — prompt-independent data protection (Li, Mo, Li, Wang, ICML 2024).

docs/spec-additions.md §P2, following PKU-ML/Diffusion-PID-Protection ``PID.py`` and ``PID.sh``. Only
the VAE encoder is used — no UNet, no text encoder, so no prompt: PGD-ℓ∞ *ascent* pushes the
posterior ``q(z|x) = N(μ(x), σ²(x))`` of the protected image away from the clean image's,

    objective        loss (per image, element-mean)
    mean             ‖μ(x) − μ(x₀)‖²
    var              ‖σ(x) − σ(x₀)‖²
    kl               KL(q(z|x₀) ‖ q(z|x))
    add              mean + var
    add-log          ‖log σ²(x) − log σ²(x₀)‖² + ‖μ(x) − μ(x₀)‖²   (PID.sh's choice: the default)
    latent           ‖z − z₀‖², z and z₀ independent posterior samples

from a uniform random start, step 1/255, budget 12.75/255 (0.1 in [-1,1]), 1000 steps.
``--compat`` keeps what the release writes to disk: it saves every 25 steps *before* that step's
update, so its last file holds 975 updates, not 1000.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from cloak.adversarial.per_image import ImageStreams, per_image_pgd
from cloak.diffusion.posterior import POSTERIOR_OBJECTIVES, posterior_distance
from cloak.diffusion.vae import load_vae
from cloak.io.images import ImageSet
from cloak.protect.base import BudgetOptions, ProtectMethod, ProtectResult

RELEASE_SAVE_EVERY = 25  # PID.py saves the images when step % 25 == 0, before the step's update


def released_steps(steps: int) -> int:
    """Updates in the last file the release writes for ``--max_train_steps=steps`` (975 for 1000)."""
    if steps <= 0:
        return 0
    return (steps - 1) // RELEASE_SAVE_EVERY * RELEASE_SAVE_EVERY


class PIDOptions(BudgetOptions):
    eps: float = Field(12.75, ge=0, description="ℓ∞ budget", json_schema_extra={"unit": "unit"})
    alpha: float = Field(1.0, ge=0, description="PGD step size", json_schema_extra={"unit": "unit"})
    unit: Literal["m11", "01", "255"] = Field("255", description="unit of eps and alpha (255 = 8-bit levels "
                                                                  "of [0,1]: 12.75 = 12.75/255)")
    steps: int = Field(1000, ge=0, description="PGD steps (the release's --max_train_steps)")
    objective: Literal[POSTERIOR_OBJECTIVES] = Field(
        "add-log", description="which posterior statistic to push away from the clean one (see the spec)")
    random_start: bool = Field(True, description="start from a uniform random point of the ε-ball (as released)")
    batch_size: int = Field(4, ge=1, description="images per forward pass. Each image draws from its own random "
                            "stream, but batched kernels round differently from single ones and the sign step "
                            "can amplify that into a few levels: only batch_size=1 gives bytes that never depend "
                            "on the other images (their order, --resume)")


class PID(ProtectMethod):
    paper = "Li, Mo, Li, Wang, PID: Prompt-Independent Data Protection Against Latent Diffusion Models, " \
            "ICML 2024 (arXiv 2406.15305)"
    implements = "PID: PGD ascent on a distance between the VAE posteriors of the protected and the clean image " \
                 "(encoder only), objectives as PKU-ML/Diffusion-PID-Protection PID.py --attack_type"
    notes = "Default model: sd15 (only its VAE is loaded; PID.sh). Per-image. --compat stops at the release's " \
            "last saved step (975 of 1000)."
    Options = PIDOptions
    group = False
    steps_option = "steps"
    default_model = "sd15"
    tiny_options: ClassVar[dict] = {"steps": 8}

    def __call__(self, images: ImageSet) -> ProtectResult:
        ctx, o = self.ctx, self.opts
        if ctx.extras.get("target_image"):
            ctx.warn("pid is untargeted: --target-image is ignored")
        vae = load_vae(ctx.models, ctx.model)
        x0 = images.pixels.to(ctx.device)

        def posterior(pixels: torch.Tensor):
            return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist

        steps = ctx.iters(o.steps)
        if ctx.compat:
            steps = released_steps(steps)
        streams = ImageStreams.for_images(images.pixels, ctx.seed)
        outs, after = [], []
        with ctx.progress.task("pid", steps * -(-len(x0) // o.batch_size)) as bar:
            for start in range(0, len(x0), o.batch_size):
                index = list(range(start, min(start + o.batch_size, len(x0))))
                with torch.no_grad():
                    clean = posterior(x0[index])
                clean_mean, clean_logvar = clean.mean.detach(), clean.logvar.detach()

                def distance(x: torch.Tensor, chunk_streams: ImageStreams) -> torch.Tensor:
                    return posterior_distance(posterior(x), clean_mean, clean_logvar, o.objective, chunk_streams)

                chunk_streams = streams.subset(index)
                run = per_image_pgd(x0[index], chunk_streams, distance, steps=steps, eps=o.eps_m11,
                                    alpha=o.alpha_m11, ascent=True, random_start=o.random_start,
                                    batch_size=len(index), task=bar)
                outs.append(run.pixels)
                with torch.no_grad():
                    after.append(distance(run.pixels, chunk_streams).cpu())
        pixels, after = torch.cat(outs), torch.cat(after)
        records = [{"posterior_distance": float(d)} for d in after]
        return ProtectResult(pixels, records, summary={
            "steps": steps, "objective": o.objective, "posterior_distance": float(after.mean()),
            "posterior_distance_note": f"the '{o.objective}' distance between the posteriors of the protected and the "
                                       "clean image, before 8-bit rounding; higher = further from the clean one",
            **({"compat_steps": f"{steps} (the release's last saved step)"} if ctx.compat else {})})
