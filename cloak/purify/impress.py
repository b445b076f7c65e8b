"""IMPRESS (Cao et al., NeurIPS 2023) as run by DiffShortcut (purify.md §7, App. C.1 eq. 8).

Optimise the pixels x_p (start: x_adv + N(0, 0.1²)) to minimise

    ‖D(E(x_p)) − x_p‖²_mean + α · max(LPIPS_vgg(x_p, x_adv) − Δ, 0)

where D(E(·)) is the SD VAE round trip through the posterior mode (diffusers ``AutoencoderKL(x).sample``):
clean images are consistent under it, protected ones less so. Adam (eps 1e-5), cosine learning-rate decay to
1e-5, values clamped to [-1, 1] after every step.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from cloak.diffusion.loss import sample_noise
from cloak.methods import MethodOptions
from cloak.purify.base import PurifyMethod
from cloak.purify.ldiffpure import multiple_of, resize_to


class Impress(PurifyMethod):
    paper = "Cao et al., IMPRESS: Evaluating the Resilience of Imperceptible Perturbations Against Unauthorized " \
            "Data Usage in Diffusion-Based Generative AI, NeurIPS 2023; DiffShortcut App. C.1"
    implements = ("Adam on the pixels: VAE-consistency MSE + α·max(LPIPS-vgg − Δ, 0), cosine LR to 1e-5, clamp; "
                  "3000 iterations, α 0.1, Δ 0.1, init noise 0.1; VAE of SD 2.1-base (DiffShortcut "
                  "defenses/impress.py)")
    proposals: ClassVar[tuple[str, ...]] = ("lr",)
    notes: ClassVar[str] = "lr 0.01 as in the released code; the paper text says 0.001 (-o lr=0.001)."
    uses_models: ClassVar[bool] = True
    needs_grad: ClassVar[bool] = True
    default_model: ClassVar[str] = "sd21-base"

    class Options(MethodOptions):
        iterations: int = Field(3000, ge=1, description="Adam iterations (scaled by --effort)")
        lr: float = Field(0.01, gt=0, description="Adam learning rate (code 0.01, paper 0.001) [PROP]")
        lr_min: float = Field(1e-5, ge=0, description="final learning rate of the cosine decay")
        alpha: float = Field(0.1, ge=0, description="weight α of the LPIPS constraint")
        delta: float = Field(0.1, ge=0, description="LPIPS budget Δ (no penalty below it)")
        init_noise: float = Field(0.1, ge=0, description="std of the Gaussian added to the start point ([-1,1] units)")
        lpips_net: str = Field("vgg", pattern="^(vgg|alex)$", description="LPIPS backbone")

    tiny_options: ClassVar[dict] = {"iterations": 20}

    def prepare(self) -> None:
        from cloak.models.lpips import lpips_model

        ctx = self.ctx
        self.sd = ctx.models.sd(ctx.model, role="purifier-vae")
        self.lpips = lpips_model(ctx.models, self.opts.lpips_net, role="impress-lpips")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        ctx, o, vae = self.ctx, self.opts, self.sd.vae
        h, w = image.shape[-2:]
        x_adv = multiple_of(image.float(), self.sd.vae_scale_factor).to(ctx.device, ctx.dtype).detach()
        x = (x_adv + o.init_noise * sample_noise(x_adv.shape, ctx.generator, ctx.device, ctx.dtype)).detach()
        x.requires_grad_(True)
        iterations = ctx.iters(o.iterations)
        opt = torch.optim.Adam([x], lr=o.lr, eps=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations, eta_min=o.lr_min)
        lpips_dtype = next(self.lpips.parameters()).dtype
        with ctx.progress.task("impress", iterations) as bar:
            for _ in range(iterations):
                opt.zero_grad(set_to_none=True)
                consistency = F.mse_loss(vae(x).sample.float(), x.float())
                perceptual = self.lpips(x.to(lpips_dtype), x_adv.to(lpips_dtype)).flatten()[0]
                loss = consistency + o.alpha * torch.clamp(perceptual - o.delta, min=0)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.clamp_(-1, 1)
                bar.advance(1, status=f"loss {float(loss.detach()):.4f}")
        # Loss terms at the last iteration (before its step).
        self.record = {"impress_consistency": round(float(consistency.detach()), 6),
                       "impress_lpips": round(float(perceptual.detach()), 5)}
        return resize_to(x.detach().float(), h, w)
