"""FSMG — Fully-trained Surrogate Model Guidance (Anti-DreamBooth, Le et al. ICCV'23), and T-FSMG.

protect.md §1. A surrogate θ_ref is DreamBooth-trained once on the clean reference set (set A:
1000 steps, lr 5e-7, batch 2, text encoder trained, attack.md §1 recipe) and kept in the cache, so a
second run on the same set reuses it. The images then take 100 PGD steps raising θ_ref's denoising
loss, the whole set in one batch. With a target image the loss is the targeted one (T-FSMG).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from cloak.adversarial.groups import Groups
from cloak.diffusion.precision import PIXEL_DTYPE
from cloak.diffusion.surrogate import cached_dreambooth
from cloak.io.images import ImageSet
from cloak.protect.aspl import Aspl, SurrogateOptions, TargetOptions, pgd_batch_field, save_every_field
from cloak.protect.base import ProtectResult, restore_groups


class Fsmg(Aspl):
    paper = "Le et al., Anti-DreamBooth, ICCV 2023 (arXiv 2303.15433)"
    implements = ("FSMG per VinAIResearch/Anti-DreamBooth attacks/fsmg.py: PGD against a DreamBooth surrogate "
                  "fully trained on the clean set (cached); T-FSMG with a target image")
    uses_ref = True
    steps_option = "steps"

    class Options(TargetOptions, SurrogateOptions):
        steps: int = Field(100, ge=0, description="PGD steps (max_train_steps)")
        pgd_batch: int = pgd_batch_field()
        save_every: int = save_every_field()
        surrogate_steps: int = Field(1000, ge=0, description="DreamBooth steps of the surrogate on the clean set")
        surrogate_batch_size: int = Field(2, ge=1, description="instance images per surrogate step "
                                                               "(as many class images join)")
        checkpoint_every: int = Field(10, ge=0, description="PGD steps between checkpoints of the run's state "
                                                            "(for --resume); 0 = none")

    tiny_options: ClassVar[dict] = {"class_images": 2, "surrogate_steps": 2, "steps": 2}
    notes: ClassVar[str] = ("Clean reference set (set A) from --ref trains the surrogate; without it the input "
                            "images stand in. The surrogate is cached under <cache>/surrogates/, keyed by base "
                            "model, sha256 of the clean images and every hyper-parameter (seed included).")

    def __call__(self, images: ImageSet) -> ProtectResult:
        ctx, o = self.ctx, self.opts
        sd = ctx.models.sd(ctx.model)
        x0 = Groups.of(images, ctx.device, PIXEL_DTYPE)
        clean = self.clean_set(images)
        info: dict = {}
        unet, text_encoder = cached_dreambooth(
            ctx, sd, clean, ctx.iters(o.surrogate_steps), self.db_config(), batch_size=o.surrogate_batch_size,
            n_class_images=o.class_images, class_image_steps=o.class_image_steps, info=info)
        self.prepare_target(sd, x0)
        steps = self.total_pgd_steps()
        # The surrogate is fixed (cached on disk, rebuilt from its own seed), so a checkpoint every
        # ``checkpoint_every`` PGD steps holds the set, the generator and the counters.
        checkpoint = self.loop_checkpoint(x0, "PGD step")
        x, history = x0.clone(), []
        saved = checkpoint.restore(ctx.generator)
        if saved is not None:
            x, history = restore_groups(saved["tensors"]["x"], x0), saved["loop"]["history"]
            self.restore_loop(saved["loop"])
        with ctx.progress.task(self.name or "fsmg", steps) as bar:
            if self.pgd_steps_done:
                bar.advance(self.pgd_steps_done, status="resumed")
            while self.pgd_steps_done < steps:
                chunk = min(steps - self.pgd_steps_done, o.checkpoint_every or steps)
                x, loss = self.pgd(sd, unet, text_encoder, x, x0, chunk, o.eps_m11, o.alpha_m11, bar=bar,
                                   on_step=lambda x, k: self.save_snapshot(x, k, "step"))
                history = [loss]
                if self.pgd_steps_done < steps:
                    checkpoint.save(self.pgd_steps_done, steps, ctx.generator, {"x": x.parts},
                                    {"history": history, **self.loop_state()})
        checkpoint.clear()
        self._sd = sd
        self.dtypes.note("trained_weights", unet.parameters())  # θ_ref as trained (or loaded from the cache)
        for role, value in info.pop("dtypes", {}).items():
            self.dtypes.note(role, value)
        summary = self.summary(history if steps else [])
        summary["surrogate"] = info
        return ProtectResult(x.result(), summary=summary)

    def total_pgd_steps(self) -> int:
        return self.ctx.iters(self.opts.steps)
