"""MetaCloak — meta-learned, transformation-robust perturbations (Liu et al. CVPR'24).

protect.md §7. A pool of surrogates is made by DreamBooth-training the base model on the images to
protect for 1000 steps, keeping snapshots at steps {0, 199, 399, 599, 799, 999}. Then, 4 times over,
each snapshot is loaded and unrolled: 100 rounds of 6 PGD steps against it followed by 2 DreamBooth
steps of it on the current poison. The PGD loss is the denoising loss of *transformed* images
(resize → centre-crop → Gaussian blur σ~U(0.1,2) → random flip), the gradient flowing through the
transforms (EoT), so the perturbation survives them.

Budget 11/255 (0–255 units), step 1.1/255 [C: script/methods_config.sh]. The pool is trained on the
images themselves: the released code loads set A and never uses it [Q note], so --ref is ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from cloak.adversarial.eot import metacloak_transforms
from cloak.diffusion import LatentCache, encode_prompts
from cloak.diffusion.dreambooth import DreamBoothTrainer
from cloak.diffusion.precision import PIXEL_DTYPE
from cloak.diffusion.surrogate import SnapshotPool
from cloak.adversarial.groups import Groups, square_crops
from cloak.io.images import ImageSet
from cloak.protect.aspl import Aspl, SurrogateOptions, _PixelLatents, pgd_batch_field
from cloak.protect.base import ProtectResult, load_weights, restore_groups, weights_of


class MetaCloak(Aspl):
    paper = "Liu et al., MetaCloak: Preventing Unauthorized Subject-driven Text-to-image Diffusion-based " \
            "Synthesis via Meta-learning, CVPR 2024 (arXiv 2311.13127)"
    implements = ("MetaCloak per liuyixin-louis/MetaCloak attacks/algs/metacloak.py + robust_pgd_worker.py: "
                  "snapshot pool, unrolled learner, EoT through differentiable transforms; fp32 surrogate "
                  "weights unless --compat")
    uses_ref = False
    steps_option = "trials"

    class Options(SurrogateOptions):
        eps: float = Field(11.0, ge=0, description="ℓ∞ budget r", json_schema_extra={"unit": "unit"})
        alpha: float = Field(1.1, ge=0, description="PGD step size (r/10)", json_schema_extra={"unit": "unit"})
        unit: Literal["m11", "01", "255"] = Field("255", description="unit of eps and alpha")
        trials: int = Field(4, ge=0, description="passes over the snapshot pool (total_trail_num)")
        pool_steps: int = Field(1000, ge=1, description="DreamBooth steps that build the pool (total_train_steps)")
        snapshot_interval: int = Field(200, ge=1, description="steps between pool snapshots (interval)")
        advance_steps: int = Field(2, ge=1, description="DreamBooth steps of the unrolled learner per round")
        pgd_steps: int = Field(6, ge=0, description="PGD steps per round (defense_pgd_step_num)")
        sample_num: int = Field(1, ge=1, description="EoT transform draws per PGD step (defense_sample_num)")
        blur: bool = Field(True, description="EoT: Gaussian blur (transform_gau)")
        blur_kernel: int = Field(7, ge=1, description="EoT: blur kernel size (gauK)")
        blur_sigma_min: float = Field(0.1, gt=0, description="EoT: smallest blur σ (torchvision default)")
        blur_sigma_max: float = Field(2.0, gt=0, description="EoT: largest blur σ (torchvision default)")
        hflip: bool = Field(True, description="EoT: random horizontal flip p=0.5 (transform_hflip)")
        pgd_batch: int = pgd_batch_field()

    tiny_options: ClassVar[dict] = {"class_images": 2, "trials": 1, "pool_steps": 4, "snapshot_interval": 2,
                                    "advance_steps": 1, "pgd_steps": 1}
    notes: ClassVar[str] = ("Rounds per snapshot = snapshot_interval / advance_steps (100 by default). The "
                            "inner min-max attacker of the code is disabled in the published config "
                            "(attack_pgd_radius=0) and not implemented.")

    def __call__(self, images: ImageSet) -> ProtectResult:
        ctx, o = self.ctx, self.opts
        if ctx.ref is not None:
            ctx.warn("metacloak: --ref is not used (the snapshot pool is trained on the images themselves, "
                     "as the released code does)")
        if o.blur and o.blur_kernel % 2 == 0:
            from cloak.errors import UsageError

            raise UsageError(f"metacloak: blur_kernel must be odd, got {o.blur_kernel}")
        sd = ctx.models.sd(ctx.model)
        self.prepare_target(sd, None)  # warns if --target-image was given: MetaCloak has no targeted variant
        x0 = Groups.of(images, ctx.device, PIXEL_DTYPE)
        self._crop_size = self.crop_size(images)
        crops = square_crops(images, self._crop_size, ctx.device, PIXEL_DTYPE)  # what the pool trains on
        # EoT resizes every working copy's short side to the resolution and centre-crops a square, so the
        # loss sees res×res images whatever the bucket; each bucket draws its own blur σ and flip per step
        # (torchvision draws one per batched call, and each bucket is one call).
        self.eot = metacloak_transforms(self._crop_size, blur_kernel=o.blur_kernel,
                                        blur_sigma=(o.blur_sigma_min, o.blur_sigma_max), blur=o.blur, flip=o.hflip)
        class_latents = self.class_latents(sd)
        self._n_class = len(class_latents) if class_latents is not None else 0
        unet, te = sd.trainable_copy()
        learner = DreamBoothTrainer(sd, unet, te, self.db_config(), class_latents=class_latents,
                                    generator=ctx.generator)
        self.track(sd, learner)
        pool, pool_steps = self.build_pool(learner, crops)
        rounds = self.rounds()
        trials, n_pgd, n_adv = ctx.iters(o.trials), ctx.iters(o.pgd_steps), ctx.iters(o.advance_steps)
        total = trials * len(pool) * rounds
        x = x0.clone()
        history: list[float] = []
        # Checkpoint after every round: x, the unrolled learner's weights, the generator, the counters. The
        # pool is rebuilt on resume (same seed, same draws: its generator state is then overwritten), and
        # the learner's optimizer is reset at every round, so nothing else carries over.
        checkpoint = self.loop_checkpoint(x0, "round")
        done = 0
        saved = checkpoint.restore(ctx.generator)
        if saved is not None:
            done, x = saved["count"], restore_groups(saved["tensors"]["x"], x0)
            history = saved["loop"]["history"]
            self.restore_loop(saved["loop"])
        with ctx.progress.task("metacloak", total) as bar:
            if done:
                bar.advance(done, status="resumed")
            for g in range(done, total):
                slot = (g // rounds) % len(pool)
                if g % rounds == 0:
                    pool.load(slot, learner.unet, learner.text_encoder)
                elif g == done and saved is not None:
                    load_weights(learner.params, saved["tensors"]["learner"])
                learner.freeze()
                x, loss = self.pgd(sd, learner.unet, learner.text_encoder, x, x0, n_pgd, o.eps_m11, o.alpha_m11)
                # f ← DB(f, x, n): a new optimizer per call in the released code, i.e. reset state.
                learner.unfreeze()
                self.tune_shuffled(learner, _PixelLatents(learner, x.detach(), self._crop_size).sample, len(x),
                                   n_adv)
                self.end_call(learner)  # the moments go: the next call starts afresh, none sit through PGD
                history.append(loss)
                checkpoint.save(g + 1, total, ctx.generator,
                                {"x": x.parts, "learner": weights_of(learner.params)},
                                {"history": history, **self.loop_state()})
                bar.advance(1, status=f"snapshot {pool_steps[slot]} loss {loss:.4f}")
        checkpoint.clear()
        summary = self.summary(history)
        summary["clean_reference"] = "none (pool trained on the images themselves)"
        summary.update({"pool_snapshots": pool_steps, "rounds_per_snapshot": rounds, "trials": trials,
                        "eot": self.eot_record()})
        return ProtectResult(x.detach().result(), summary=summary)

    def rounds(self) -> int:
        ctx, o = self.ctx, self.opts
        return max(1, ctx.iters(o.snapshot_interval) // ctx.iters(o.advance_steps))

    def snapshot_steps(self) -> list[int]:
        """Steps before which the pool keeps the weights: 0 and every (s+1) % interval == 0 [C]."""
        ctx, o = self.ctx, self.opts
        steps, interval = ctx.iters(o.pool_steps), ctx.iters(o.snapshot_interval)
        return [s for s in range(steps) if s == 0 or (s + 1) % interval == 0]

    def total_pgd_steps(self) -> int:
        ctx, o = self.ctx, self.opts
        return ctx.iters(o.trials) * len(self.snapshot_steps()) * self.rounds() * ctx.iters(o.pgd_steps)

    def build_pool(self, learner: DreamBoothTrainer, x0: torch.Tensor) -> tuple[SnapshotPool, list[int]]:
        """Train DreamBooth on the clean images (square crops), keeping snapshots in preallocated buffers."""
        ctx = self.ctx
        steps = ctx.iters(self.opts.pool_steps)
        marks = self.snapshot_steps()
        pool = SnapshotPool((learner.unet, learner.text_encoder), len(marks))
        instances = LatentCache.encode(learner.sd.vae, x0)
        learner.unfreeze()
        learner.reset_optimizer()
        order = torch.randperm(len(x0), generator=ctx.generator).tolist()
        slot = 0
        with ctx.progress.task("metacloak pool", steps) as bar:
            for s in range(steps):
                if slot < len(marks) and s == marks[slot]:
                    pool.save(slot, learner.unet, learner.text_encoder)
                    slot += 1
                i = order[s % len(order)]
                cls = [s % self._n_class] if self._n_class else None
                loss = learner.step(instances.sample([i], ctx.generator), cls)
                bar.advance(1, status=f"loss {loss:.4f}")
        self.end_call(learner)  # the pool is built: its AdamW moments are not needed by the rounds
        return pool, marks

    def tune_shuffled(self, trainer: DreamBoothTrainer, sample, n_images: int, steps: int) -> None:
        """``steps`` DreamBooth steps as the released ``train_few_step``: the instance images in a fresh
        random order each call, the class images from index 0 each call."""
        order = torch.randperm(n_images, generator=self.ctx.generator).tolist()
        for s in range(steps):
            cls = [s % self._n_class] if self._n_class else None
            trainer.step(sample([order[s % n_images]], self.ctx.generator), cls)

    def pgd(self, sd, unet, text_encoder, x: Groups, x0: Groups, steps: int, eps: float, alpha: float, bar=None):
        """PGD through the EoT transforms: each step sums ``sample_num`` losses of T_m(x), each with its
        own transform draw and diffusion draw (per shape bucket), and ascends the sign of the summed
        gradient."""
        with torch.no_grad():
            text = encode_prompts(sd.tokenizer, text_encoder, [self.opts.instance_prompt])
        loss_value = float("nan")
        size = (self._crop_size, self._crop_size)
        for _ in range(steps):
            draws = []
            for _ in range(self.opts.sample_num):
                per_bucket = []
                for part, idx in zip(x.parts, x.indices):
                    params = self.eot.sample(part.shape[0], self.ctx.generator)
                    per_bucket.append((params, self.draw(sd, part, idx, pixel_shape=size)))
                draws.append(per_bucket)

            def loss_fn(pixels, bucket: int, rows=None, draws=draws):
                # rows: a pgd_batch chunk of the bucket; it takes its own rows of every per-image draw
                picked = [m[bucket] if rows is None else _eot_rows(m[bucket], rows) for m in draws]
                return sum(self.loss(sd, unet, self.eot.apply(pixels, params), text, draw, bucket=bucket)
                           for params, draw in picked)

            x, loss_value = self.update(x, x0, loss_fn, eps, alpha)
            self.pgd_steps_done += 1
            if bar is not None:
                bar.advance(1, status=f"loss {loss_value:.4f}")
        return x.detach(), loss_value

    def eot_record(self) -> dict[str, Any]:
        o = self.opts
        return {"resize_center_crop": self.ctx.resolution, "blur": o.blur and {"kernel": o.blur_kernel,
                "sigma": [o.blur_sigma_min, o.blur_sigma_max]}, "hflip": 0.5 if o.hflip else 0.0,
                "samples_per_step": o.sample_num}


def _eot_rows(drawn: tuple, rows: slice) -> tuple:
    """(EoT parameters, diffusion draw) of one bucket, cut to a pgd_batch chunk: per-image tensors (first
    dimension = the bucket's images) keep their rows, per-set ones (one blur σ, one flip) stay whole."""
    params, draw = drawn
    n = len(draw.timesteps)

    def cut(value):
        if isinstance(value, list):
            return [cut(v) for v in value]
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n and n > 1:
            return value[rows]
        return value

    return cut(params), draw.rows(rows)
