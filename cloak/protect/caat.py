"""CAAT — Cross-Attention Adversarial Training (Xu et al., CVPR 2024).

docs/spec-additions.md §P3, following CO2-cityao/CAAT ``CAAT.py`` and ``scripts/train_CAAT.sh``. One
min-max loop on one loss, the denoising loss L_dn of the whole set under the prompt: every step draws
(t, ε, posterior sample) per image, runs one forward and one backward pass, then

* the images take a PGD-ℓ∞ *ascent* step, ``x ← Π_ε(x + α·sign(∇ₓ L_dn))``;
* the cross-attention key/value projections (``attn2.to_k``/``to_v``, as Custom Diffusion fine-tunes them)
  take an AdamW *descent* step on the same gradient (lr 1e-5, grad-norm clip 1.0),

so the perturbation is learned against a model that keeps adapting to it. The K/V weights are fp32 copies
that live for the run only (:class:`cloak.diffusion.cross_kv.TrainableCrossKV`): the loaded model is left
exactly as loaded. No random start. The release's quirks do not change the perturbation under its own script
(listed in the spec), so there is no ``--compat`` variant.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from cloak.adversarial import pgd_step
from cloak.adversarial.groups import Groups, loss_and_grad
from cloak.diffusion import Draw, denoising_loss, encode_latents_in_loss, encode_prompts
from cloak.diffusion.cross_kv import TrainableCrossKV
from cloak.diffusion.dreambooth import DreamBoothConfig, make_adamw
from cloak.diffusion.precision import PIXEL_DTYPE, autocast_for
from cloak.io.images import ImageSet
from cloak.protect.aspl import pgd_batch_field
from cloak.protect.base import BudgetOptions, ProtectMethod, ProtectResult, load_weights, restore_groups, weights_of

GRAD_CLIP = 1.0  # CAAT.py --max_grad_norm default, applied to the K/V weights only


class CaatOptions(BudgetOptions):
    eps: float = Field(0.05, ge=0, description="ℓ∞ budget (train_CAAT.sh --eps)", json_schema_extra={"unit": "unit"})
    alpha: float = Field(0.005, ge=0, description="PGD step size (train_CAAT.sh --alpha)",
                         json_schema_extra={"unit": "unit"})
    unit: Literal["m11", "01", "255"] = Field("m11", description="unit of eps and alpha (m11 = [-1,1], as released)")
    steps: int = Field(250, ge=0, description="joint steps: one image step and one K/V step each (--max_train_steps)")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate of the cross-attention K/V weights")
    prompt: str = Field("a photo of a person", description="text condition of the loss (--instance_prompt)")
    pgd_batch: int = pgd_batch_field()
    checkpoint_every: int = Field(25, ge=0, description="steps between checkpoints of the run's state (the set, "
                                                        "the K/V weights and AdamW's moments; for --resume); 0 = none")


class Caat(ProtectMethod):
    paper = "Xu et al., Perturbing Attention Gives You More Bang for the Buck: Subtle Imaging Perturbations That " \
            "Efficiently Fool Customized Diffusion Models, CVPR 2024 (arXiv 2404.15081)"
    implements = "CAAT: joint PGD ascent on the images and AdamW descent on the UNet's cross-attention K/V " \
                 "projections, one loss and one backward pass per step (CO2-cityao/CAAT CAAT.py, train_CAAT.sh)"
    notes = "Default model: sd21-base [PROP] (the release names none; its README lists SD 2.1-base first). Group " \
            "method: the whole set trains one set of K/V weights. The trained K/V weights are discarded; the " \
            "loaded model is left as loaded."
    Options = CaatOptions
    proposals: ClassVar[tuple[str, ...]] = ("checkpoint_every",)
    steps_option = "steps"
    tiny_options: ClassVar[dict] = {"steps": 4}

    def __call__(self, images: ImageSet) -> ProtectResult:
        ctx, o = self.ctx, self.opts
        if ctx.extras.get("target_image"):
            ctx.warn("caat is untargeted: --target-image is ignored")
        sd = ctx.models.sd(ctx.model)
        x0 = Groups.of(images, ctx.device, PIXEL_DTYPE)  # fp32 whatever --dtype: bf16 would round α-steps away
        with torch.no_grad():
            text = encode_prompts(sd.tokenizer, sd.text_encoder, [o.prompt])
        steps = ctx.iters(o.steps)
        checkpoint = self.loop_checkpoint(x0, "step")
        with TrainableCrossKV(sd.unet) as kv:
            optimizer = make_adamw(kv.params, DreamBoothConfig(lr=o.lr))
            x, history, start = x0.clone(), [], 0
            saved = checkpoint.restore(ctx.generator)
            if saved is not None:
                start, x, history = saved["count"], restore_groups(saved["tensors"]["x"], x0), saved["loop"]["history"]
                load_weights(kv.params, saved["tensors"]["kv"])
                optimizer.load_state_dict(saved["tensors"]["optimizer"])
            with ctx.progress.task(self.name or "caat", steps) as bar:
                if start:
                    bar.advance(start, status="resumed")
                for done in range(start + 1, steps + 1):
                    x, loss = self.step(sd, kv, optimizer, text, x, x0)
                    history.append(loss)
                    if o.checkpoint_every and done % o.checkpoint_every == 0 and done < steps:
                        checkpoint.save(done, steps, ctx.generator, {"x": x.parts, "kv": weights_of(kv.params),
                                                                     "optimizer": optimizer.state_dict()},
                                        {"history": history})
                    bar.advance(1, status=f"loss {loss:.4f}")
            checkpoint.clear()
            change, n_params = kv.relative_change(), kv.count()
            n_layers = len(kv.params) // 2
        return ProtectResult(x.detach().result(), summary=self.summary(history, change, n_layers, n_params))

    def step(self, sd, kv: TrainableCrossKV, optimizer, text: torch.Tensor, x: Groups, x0: Groups):
        """One joint step: L_dn of the set on one draw per image; images ascend, K/V weights descend."""
        ctx, o = self.ctx, self.opts
        scheduler, f = sd.noise_scheduler, sd.vae_scale_factor
        draws = [Draw.sample(p.shape[0], (sd.unet.config.in_channels, p.shape[-2] // f, p.shape[-1] // f),
                             scheduler, ctx.generator, ctx.device) for p in x.parts]

        def loss_fn(pixels, bucket: int, rows: slice | None = None) -> torch.Tensor:
            draw = draws[bucket] if rows is None else draws[bucket].rows(rows)
            latents = encode_latents_in_loss(sd.vae, pixels, ctx.dtype, posterior_noise=draw.posterior_noise)
            with autocast_for(latents.device, ctx.dtype):
                return denoising_loss(sd.unet, scheduler, latents, text, ctx.generator, timesteps=draw.timesteps,
                                      noise=draw.noise.to(latents.dtype))

        loss, grad = loss_and_grad(x, loss_fn, self.chunks, params=kv.params)
        torch.nn.utils.clip_grad_norm_(kv.params, GRAD_CLIP)
        x = x.map(lambda p, g, p0: pgd_step(p.detach(), g, p0, o.alpha_m11, o.eps_m11), grad, x0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return x, loss

    def chunks(self, n: int) -> list[slice] | None:
        size = self.opts.pgd_batch
        return [slice(i, min(i + size, n)) for i in range(0, n, size)] if 0 < size < n else None

    def summary(self, history: list[float], change: float, n_layers: int, n_params: int) -> dict:
        tail = history[-max(1, len(history) // 10):]
        return {"steps": len(history), "prompt": self.opts.prompt, "lr": self.opts.lr,
                "denoising_loss_first": history[0] if history else None,
                "denoising_loss_last": sum(tail) / len(tail) if tail else None,
                "denoising_loss_note": "L_dn of the set under the adapting K/V weights, on one random draw per "
                                       "step; first = the first step, last = mean over the last 10 % of steps; "
                                       "noisy estimates",
                "kv_layers": n_layers, "kv_parameters": n_params, "kv_relative_change": change,
                "kv_note": "‖W − W₀‖/‖W₀‖ of the cross-attention to_k/to_v weights at the end of the run; they were "
                           "fp32 copies, discarded: the loaded model is unchanged"}
