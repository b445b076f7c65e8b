"""ASPL — Alternating Surrogate and Perturbation Learning (Anti-DreamBooth, Le et al. ICCV'23).

protect.md §2. Each iteration: a scratch learner f' (a copy of the persistent surrogate f) is
DreamBooth-tuned on the clean reference set, the images take K PGD steps that raise f's denoising
loss, then f itself is tuned on the current poison so it tracks what an attacker's model would learn.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from cloak.adversarial import pgd_step
from cloak.diffusion import Draw, LatentCache, denoising_loss, encode_latents, encode_prompts
from cloak.diffusion.class_images import class_images
from cloak.diffusion.dreambooth import DreamBoothConfig, DreamBoothTrainer, autocast_for, copy_params
from cloak.io.images import ImageSet
from cloak.protect.base import BudgetOptions, ProtectMethod, ProtectResult


class SurrogateOptions(BudgetOptions):
    """Options of the DreamBooth surrogate shared by the fine-tuning family (protect.md §0)."""

    lr: float = Field(5e-7, gt=0, description="surrogate DreamBooth learning rate (AdamW)")
    prior_weight: float = Field(1.0, ge=0, description="prior-preservation weight λ")
    class_images: int = Field(200, ge=0, description="class images for prior preservation (0 = no prior)")
    class_image_steps: int = Field(50, ge=1, description="sampling steps used to make the class images")
    instance_prompt: str = Field("a photo of sks person", description="the attacker's instance prompt")
    class_prompt: str = Field("a photo of person", description="the class prompt")
    train_text_encoder: bool = Field(True, description="surrogate DreamBooth also trains the text encoder")


class Aspl(ProtectMethod):
    paper = "Le et al., Anti-DreamBooth, ICCV 2023 (arXiv 2303.15433)"
    implements = "ASPL per VinAIResearch/Anti-DreamBooth attacks/aspl.py; fp32 surrogate weights unless --compat"
    uses_ref = True
    steps_option = "iterations"

    class Options(SurrogateOptions):
        iterations: int = Field(50, ge=0, description="outer ASPL iterations N")
        surrogate_steps: int = Field(3, ge=0, description="DreamBooth steps per surrogate update (n)")
        pgd_steps: int = Field(6, ge=0, description="PGD steps per iteration (K)")
        persistent_cycling: bool = Field(
            False, description="continue the image index across surrogate calls (released code restarts at 0, "
                               "so only images 0..n-1 are ever used) [PROP option]")

    tiny_options: ClassVar[dict] = {"class_images": 2, "iterations": 2, "surrogate_steps": 1, "pgd_steps": 2}
    notes: ClassVar[str] = "Clean reference set (set A) from --ref; without it the input images stand in for it."

    def __call__(self, images: ImageSet) -> ProtectResult:
        ctx, o = self.ctx, self.opts
        sd = ctx.models.sd(ctx.model)
        gen = ctx.generator
        x0 = images.pixels.to(ctx.device, ctx.dtype)
        clean = (ctx.ref.pixels if ctx.ref is not None else images.pixels).to(ctx.device, ctx.dtype)

        trainers = self.surrogate_pair(sd, clean)
        learner, surrogate = trainers
        ref_latents = self._ref_latents
        n_f, n_pgd = ctx.iters(o.surrogate_steps), ctx.iters(o.pgd_steps)
        iterations = ctx.iters(o.iterations)
        eps, alpha = o.eps_m11, o.alpha_m11

        x = x0.clone()
        clean_cursor = poison_cursor = 0
        history = []
        with ctx.progress.task("aspl", iterations) as bar:
            for _ in range(iterations):
                # f' ← DB(copy(f), A_clean, n): weights copied into a preallocated twin, optimizer state zeroed.
                copy_params(surrogate.unet, learner.unet)
                copy_params(surrogate.text_encoder, learner.text_encoder)
                learner.reset_optimizer()
                learner.unfreeze()
                clean_cursor = self.tune(learner, ref_latents.sample, len(ref_latents), n_f, clean_cursor)
                learner.freeze()
                x, loss = self.pgd(sd, learner.unet, learner.text_encoder, x, x0, n_pgd, eps, alpha)
                # f ← DB(f, x, n): the surrogate follows the poisoned learner.
                surrogate.reset_optimizer()
                poison = _PixelLatents(surrogate, x.detach())
                poison_cursor = self.tune(surrogate, poison.sample, len(x), n_f, poison_cursor)
                history.append(loss)
                bar.advance(1, status=f"loss {loss:.4f}")
        return ProtectResult(x.detach(), summary={"final_pgd_loss": history[-1] if history else None,
                                                  "clean_reference": "ref" if ctx.ref is not None else "input"})

    # --- pieces shared with the other members of the family (SimAC, CAP hosts, ...) ---------------
    def surrogate_pair(self, sd, clean: torch.Tensor) -> tuple[DreamBoothTrainer, DreamBoothTrainer]:
        """(learner f', persistent surrogate f), each with its own weights and optimizer, made once."""
        ctx, o = self.ctx, self.opts
        class_latents = None
        if o.class_images > 0 and o.prior_weight > 0:
            cls = class_images(sd, o.class_prompt, o.class_images, ctx.cache_dir, steps=o.class_image_steps,
                               resolution=ctx.resolution)
            class_latents = LatentCache.encode(sd.vae, cls.to(ctx.device, ctx.dtype))
        self._ref_latents = LatentCache.encode(sd.vae, clean)
        self._n_class = len(class_latents) if class_latents is not None else 0
        cfg = DreamBoothConfig(lr=o.lr, prior_weight=o.prior_weight, train_text_encoder=o.train_text_encoder,
                               instance_prompt=o.instance_prompt, class_prompt=o.class_prompt,
                               bf16_weights=ctx.compat)
        pair = []
        for _ in range(2):
            unet, te = sd.trainable_copy()
            pair.append(DreamBoothTrainer(sd, unet, te, cfg, class_latents=class_latents, generator=ctx.generator))
        return pair[0], pair[1]

    def tune(self, trainer: DreamBoothTrainer, sample, n_images: int, steps: int, cursor: int) -> int:
        """``steps`` DreamBooth steps on one instance image each (+1 class image), as aspl.py does.

        Returns the next cursor: 0 (restart, released behaviour) unless ``persistent_cycling``.
        """
        start = cursor if self.opts.persistent_cycling else 0
        for s in range(steps):
            i = (start + s) % n_images
            cls = [(start + s) % self._n_class] if self._n_class else None
            trainer.step(sample([i], self.ctx.generator), cls)
        return start + steps

    def pgd(self, sd, unet, text_encoder, x, x0, steps: int, eps: float, alpha: float):
        """``steps`` PGD ascent steps on L_dn of the frozen (unet, text_encoder); whole batch per step.

        Each step draws its randomness once (``Draw``) and hands ``update`` a loss of x alone, so a
        plug-in (CAP) can evaluate several candidate steps on the same draw.
        """
        with torch.no_grad():
            text = encode_prompts(sd.tokenizer, text_encoder, [self.opts.instance_prompt])
        loss_value = float("nan")
        for _ in range(steps):
            draw = self.draw(sd, x)

            def loss_fn(pixels, draw=draw):
                return self.loss(sd, unet, pixels, text, draw)

            x, loss_value = self.update(x, x0, loss_fn, eps, alpha)
            self.pgd_steps_done += 1
        return x.detach(), loss_value

    pgd_steps_done = 0  # global PGD step counter k (CAP switches on at k̂ = K/2)

    def draw(self, sd, x) -> Draw:
        f = sd.vae_scale_factor
        shape = (sd.unet.config.in_channels, x.shape[-2] // f, x.shape[-1] // f)
        return Draw.sample(x.shape[0], shape, sd.noise_scheduler, self.ctx.generator, x.device)

    def loss(self, sd, unet, pixels, text, draw: Draw) -> torch.Tensor:
        """L_dn of ``pixels`` (gradient flows through the VAE encoder) on one fixed draw."""
        latents = encode_latents(sd.vae, pixels, posterior_noise=draw.posterior_noise)
        with autocast_for(latents.device):
            return denoising_loss(unet, sd.noise_scheduler, latents, text.to(latents.dtype), self.ctx.generator,
                                  timesteps=draw.timesteps, noise=draw.noise)

    def update(self, x, x0, loss_fn, eps: float, alpha: float):
        """One PGD ascent step (sign of ∇ₓ loss), projected to the budget. Plug-ins override this."""
        x = x.detach().requires_grad_(True)
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss, x)
        return pgd_step(x.detach(), grad, x0, alpha, eps), float(loss.detach())


class _PixelLatents:
    """Fresh posterior samples of (changing) pixels, in the LatentCache.sample signature."""

    def __init__(self, trainer: DreamBoothTrainer, pixels: torch.Tensor):
        self.trainer, self.pixels = trainer, pixels

    def sample(self, index, generator) -> torch.Tensor:
        return self.trainer.encode_instances(self.pixels[index])
