"""ASPL — Alternating Surrogate and Perturbation Learning (Anti-DreamBooth, Le et al. ICCV'23),
with its ensemble (E-ASPL) and targeted (T-ASPL) variants.

protect.md §2. Each iteration: a scratch learner f' (a copy of the persistent surrogate f) is
DreamBooth-tuned on the clean reference set, the images take K PGD steps that raise f's denoising
loss, then f itself is tuned on the current poison so it tracks what an attacker's model would learn.

E-ASPL (``-o models=sd14,sd15,sd21-base``): every model j keeps its own f_j; each iteration every
model runs its own f'_j, its own K PGD steps from the shared x, and its own f_j update on its own
result, then x ← mean_j x_j [C: attacks/ensemble_aspl.py]. One model is on the accelerator at a time.

T-ASPL (``--target-image`` or ``-o target_image=``): the PGD loss becomes the targeted loss of §1,
``L_dn − w·MSE(ẑ_{t−1}, q(z_tgt, ε, t−1))``.

The PGD structure ``pgd() → draw() / loss() / update()`` is shared by the whole family (FSMG, SimAC,
MetaCloak subclass this class) and by plug-ins (CAP overrides ``update``).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from cloak.adversarial import pgd_step
from cloak.adversarial.groups import (Groups, candidate_values, center_crop, loss_and_grad, loss_value,
                                     row_chunks, square_crops)
from cloak.diffusion import (
    Draw, LatentCache, encode_latents, encode_latents_in_loss, encode_prompts, sample_noise, training_target,
)
from cloak.diffusion.class_images import class_images
from cloak.diffusion.dreambooth import DreamBoothConfig, DreamBoothTrainer, autocast_for
from cloak.diffusion.lora_surrogate import LoraSurrogateOptions
from cloak.diffusion.loss import tile_rows
from cloak.diffusion.precision import PIXEL_DTYPE, DtypeLedger
from cloak.diffusion.surrogate import SnapshotPool
from cloak.io.images import ImageSet
from cloak.methods import MethodOptions
from cloak.protect.base import (BudgetOptions, ProtectMethod, ProtectResult, load_weights, restore_groups,
                                weights_of)


class SurrogateOptions(BudgetOptions):
    """Options of the DreamBooth surrogate shared by the fine-tuning family (protect.md §0)."""

    lr: float = Field(5e-7, gt=0, description="surrogate DreamBooth learning rate (AdamW)")
    prior_weight: float = Field(1.0, ge=0, description="prior-preservation weight λ")
    class_images: int = Field(200, ge=0, description="class images for prior preservation (0 = no prior)")
    class_image_steps: int = Field(50, ge=1, description="sampling steps used to make the class images")
    instance_prompt: str = Field("a photo of sks person", description="the attacker's instance prompt")
    class_prompt: str = Field("a photo of person", description="the class prompt")
    train_text_encoder: bool = Field(True, description="surrogate DreamBooth also trains the text encoder")


def pgd_batch_field():
    """``pgd_batch`` of the methods whose PGD steps are pieced by ``cloak.adversarial.groups.loss_and_grad``
    (ASPL, FSMG, SimAC, MetaCloak, DLADiff layer 1)."""
    return Field(0, ge=0, description="images per UNet pass in a PGD step (0 = the whole set at once, as released); "
                                      "smaller bounds memory with the same draws and the same step")


def save_every_field():
    """``save_every`` of the methods that hand mid-run sets to ``ctx.snapshot`` (ASPL, SimAC, FSMG)."""
    return Field(0, ge=0, description="also write the set after every N iterations (FSMG: PGD steps) to "
                                      "OUTPUT/.steps/; released code: ASPL every 10 iterations, FSMG every 20 "
                                      "steps; 0 = off")


class TargetOptions(MethodOptions):
    """The targeted variant (T-ASPL / T-FSMG, protect.md §1): on when a target image is given."""

    target_image: str | None = Field(
        None, description="target image: turns on the targeted loss L_dn − w·MSE(ẑ_{t−1}, q(z_tgt, ε, t−1)) "
                          "(or --target-image)")
    target_weight: float = Field(1.0, ge=0, description="weight w of the targeted term")


@dataclass
class FamilyDraw(Draw):
    """A ``Draw`` plus whatever else one PGD step of a family member draws (DDPM step noise for the
    targeted loss, SimAC's clean-branch posterior noise, EoT parameters), so every evaluation of the
    step's loss — CAP evaluates many candidates — sees the same randomness."""

    extra: dict[str, Any] = field(default_factory=dict)

    def rows(self, rows: slice) -> FamilyDraw:
        n = len(self.timesteps)
        extra = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
                 for k, v in self.extra.items()}
        return dataclasses.replace(super().rows(rows), extra=extra)

    def repeat(self, copies: int) -> FamilyDraw:
        n = len(self.timesteps)
        extra = {k: tile_rows(v, copies) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
                 for k, v in self.extra.items()}
        return dataclasses.replace(super().repeat(copies), extra=extra)


def candidate_mse(a: torch.Tensor, b: torch.Tensor, copies: int = 1) -> torch.Tensor:
    """``F.mse_loss(a, b)``; with ``copies`` candidates stacked candidate-major, one mean per candidate (copies,)."""
    if copies == 1:
        return F.mse_loss(a, b)
    return F.mse_loss(a, b, reduction="none").reshape(copies, -1).mean(1)


def ddpm_prev_sample(scheduler, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
                     noise: torch.Tensor) -> torch.Tensor:
    """DDPM posterior step ẑ_{t−1} (diffusers ``DDPMScheduler.step``, variance "fixed_small"), batched
    over per-image t and differentiable; ``noise`` is the step's variance noise (unused where t = 0)."""
    cfg = scheduler.config
    ac = scheduler.alphas_cumprod.to(sample.device, torch.float32)
    t = timesteps.long()
    a_t = ac[t].view(-1, 1, 1, 1)
    a_prev = torch.where(t > 0, ac[(t - 1).clamp(min=0)], torch.ones_like(ac[t])).view(-1, 1, 1, 1)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_a = a_t / a_prev
    cur_b = 1 - cur_a
    if cfg.prediction_type == "epsilon":
        x0 = (sample - b_t.sqrt() * model_output) / a_t.sqrt()
    elif cfg.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * sample - b_t.sqrt() * model_output
    else:
        raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
    if getattr(cfg, "clip_sample", False):
        r = getattr(cfg, "clip_sample_range", 1.0)
        x0 = x0.clamp(-r, r)
    mean = (a_prev.sqrt() * cur_b / b_t) * x0 + (cur_a.sqrt() * b_prev / b_t) * sample
    std = ((b_prev / b_t) * cur_b).clamp(min=1e-20).sqrt()
    keep = (t > 0).view(-1, 1, 1, 1).to(sample.dtype)
    return mean + keep * std * noise.to(sample.dtype)


class Aspl(ProtectMethod):
    paper = "Le et al., Anti-DreamBooth, ICCV 2023 (arXiv 2303.15433)"
    implements = ("ASPL per VinAIResearch/Anti-DreamBooth attacks/aspl.py, E-ASPL per attacks/ensemble_aspl.py "
                  "(-o models=...), T-ASPL with a target image; fp32 surrogate master weights and fp32 "
                  "perturbations under any --dtype (bf16: autocast compute), bf16 weights only with --compat")
    uses_ref = True
    steps_option = "iterations"

    class Options(TargetOptions, SurrogateOptions, LoraSurrogateOptions):
        iterations: int = Field(50, ge=0, description="outer ASPL iterations N")
        surrogate_steps: int = Field(3, ge=0, description="DreamBooth steps per surrogate update (n)")
        pgd_steps: int = Field(6, ge=0, description="PGD steps per iteration (K)")
        pgd_batch: int = pgd_batch_field()
        save_every: int = save_every_field()
        persistent_cycling: bool = Field(
            False, description="continue the image index across surrogate calls (released code restarts at 0, "
                               "so only images 0..n-1 are ever used) [PROP option]")
        models: list[str] = Field([], description="E-ASPL: base models of the ensemble, comma-separated "
                                                  "(paper: sd14,sd15,sd21-base); empty = --model alone")

        @field_validator("models", mode="before")
        @classmethod
        def _split(cls, value):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return value

    tiny_options: ClassVar[dict] = {"class_images": 2, "iterations": 2, "surrogate_steps": 1, "pgd_steps": 2}
    notes: ClassVar[str] = ("Clean reference set (set A) from --ref; without it the input images stand in for it. "
                            "E-ASPL keeps one model on the accelerator at a time; T-ASPL needs a target image.")

    pgd_steps_done = 0  # global PGD step counter k (CAP switches on at k̂ = K/2)
    _target_latents: torch.Tensor | None = None

    # --- the run --------------------------------------------------------------------------------
    def __call__(self, images: ImageSet) -> ProtectResult:
        ctx = self.ctx
        x0 = Groups.of(images, ctx.device, PIXEL_DTYPE)  # fp32 whatever --dtype: bf16 would round α-steps away
        clean = self.clean_set(images)
        ids = self.model_ids()
        if len(ids) > 1:
            return self._ensemble(x0, clean)
        sd = ctx.models.sd(ids[0] if ids else ctx.model)
        self.prepare_target(sd, x0)
        learner, surrogate = self.surrogate_pair(sd, clean)
        try:
            self.prepare(sd, x0)
            self.lend_base(surrogate)
            return self.loop(sd, learner, surrogate, x0)
        finally:
            # The run is over: f' and AdamW's moments go before the base weights are read back, so that
            # reload stays under the loop's peak.
            del learner, surrogate
            self.release_trainers()
            gc.collect()
            self.return_base(sd)

    def loop(self, sd, learner: DreamBoothTrainer, surrogate: DreamBoothTrainer, x0: Groups) -> ProtectResult:
        """The outer iterations, checkpointed after each one."""
        ctx = self.ctx
        state = {"ref": self._ref_latents, "cursors": [0, 0]}
        iterations = ctx.iters(self.opts.iterations)
        x = x0.clone()
        history: list[float] = []
        # Checkpoint after every iteration: x, f's weights, the generator, the counters. f' is copied from
        # f and both optimizers are reset at the start of every iteration, so nothing else carries over.
        checkpoint = self.loop_checkpoint(x0, "iteration")
        start = 0
        saved = checkpoint.restore(ctx.generator)
        if saved is not None:
            start, x = saved["count"], restore_groups(saved["tensors"]["x"], x0)
            load_weights(surrogate.params, saved["tensors"]["surrogate"])
            history, state["cursors"] = saved["loop"]["history"], saved["loop"]["cursors"]
            self.restore_loop(saved["loop"])
        with ctx.progress.task(self.name or "aspl", iterations) as bar:
            if start:
                bar.advance(start, status="resumed")
            for it in range(start, iterations):
                x, loss = self.iteration(sd, learner, surrogate, x, x0, state)
                history.append(loss)
                self.save_snapshot(x, it + 1, "iteration")
                checkpoint.save(it + 1, iterations, ctx.generator,
                                {"x": x.parts, "surrogate": weights_of(surrogate.params)},
                                {"history": history, "cursors": state["cursors"], **self.loop_state()})
                bar.advance(1, status=f"loss {loss:.4f}")
        checkpoint.clear()
        return ProtectResult(x.detach().result(), summary=self.summary(history))

    _lent: tuple | None = None

    def lends_base(self, sd) -> bool:
        """Whether f trains the loaded model's own weights during the loop instead of a copy of them: one full
        copy of the UNet and text encoder less (issue 16 §1; the released aspl.py trains the loaded modules in
        place too). Only where the copy would equal the base: full weights (a LoRA surrogate already trains
        adapters on the shared modules), not --compat (it casts f to bf16 in place), and a base loaded in the
        master dtype (fp32 masters over a bf16 base stay a copy)."""
        if self.ctx.compat or getattr(self.opts, "surrogate", "full") != "full":
            return False
        return all(p.dtype == torch.float32 for m in (sd.unet, sd.text_encoder) for p in m.parameters())

    def lent_trainer(self, sd, cfg: DreamBoothConfig, class_latents, generator) -> DreamBoothTrainer:
        """f on the loaded model's own modules (``lends_base``), made instead of a copy, so no copy is ever made.
        It is frozen until ``lend_base``: ``prepare`` (SimAC's timestep selection) sees the base as loaded. f
        starts from the same weights as a copy would, so nothing else changes. ``return_base`` reads the base
        weights back from the model folder afterwards, so the shared handle is as loaded for whatever runs
        next in the process."""
        self._lent = (sd.unet, sd.text_encoder)
        f = DreamBoothTrainer(sd, sd.unet, sd.text_encoder, cfg, class_latents=class_latents, generator=generator)
        f.freeze()
        return f

    def lend_base(self, surrogate: DreamBoothTrainer) -> None:
        """The loop starts: a lent f (``lent_trainer``) trains from here on. Called after ``prepare``."""
        if self._lent is None or surrogate.unet is not self._lent[0]:
            return
        with torch.no_grad():  # f's tensors as a copy would hold them (loaded tensors may sit at any offset
            for p in (*surrogate.unet.parameters(), *surrogate.text_encoder.parameters()):  # of a mapped file,
                p.data = p.data.clone()  # and kernels round differently on differently aligned memory); after
                # prepare, which reads the base as loaded
        surrogate.unfreeze()

    def return_base(self, sd) -> None:
        if self._lent is None:
            return
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet, text_encoder = self._lent
        self._lent = None
        for module, cls, sub in ((unet, UNet2DConditionModel, "unet"), (text_encoder, CLIPTextModel, "text_encoder")):
            module.requires_grad_(False)
            module.eval()
            for p in module.parameters():
                p.grad = None
            if _copy_from_safetensors(module, sd.path / sub):
                continue
            fresh = cls.from_pretrained(sd.path, subfolder=sub, local_files_only=True)
            module.load_state_dict(fresh.state_dict())
            del fresh

    def loop_state(self) -> dict[str, Any]:
        """Counters a checkpoint keeps besides the set and the weights (plug-ins add theirs)."""
        return {"pgd_steps_done": self.pgd_steps_done}

    def restore_loop(self, loop: dict[str, Any]) -> None:
        self.pgd_steps_done = loop["pgd_steps_done"]

    _crop_size = 0

    def crop_size(self, images=None) -> int:
        """Side of the square crops the surrogates train on: the working resolution (the working copies'
        short side), as an attacker's DreamBooth ``--resolution`` with ``--center_crop``."""
        if self.ctx.resolution:
            return self.ctx.resolution
        tensors = images.tensors if images is not None else []
        return min((min(t.shape[-2:]) for t in tensors), default=0)

    def clean_set(self, images: ImageSet) -> torch.Tensor:
        """The clean reference set A as square crops (--ref arrives square; the input images stand in
        for it otherwise, centre-cropped)."""
        ctx = self.ctx
        self._crop_size = self.crop_size(images)
        source = ctx.ref if ctx.ref is not None else images
        return square_crops(source, self._crop_size, ctx.device, PIXEL_DTYPE)

    def save_snapshot(self, x: Groups, count: int, unit: str) -> None:
        """Hand the set to the verb's writer after every ``save_every`` units (iterations, or FSMG's steps)."""
        every = getattr(self.opts, "save_every", 0)
        if every and count % every == 0 and self.ctx.snapshot is not None:
            self.ctx.snapshot(f"{unit}-{count:04d}", x.detach().result())

    def iteration(self, sd, learner: DreamBoothTrainer, surrogate: DreamBoothTrainer, x, x0, state: dict):
        """One ASPL iteration: f' ← DB(copy(f), A, n); K PGD steps against f'; f ← DB(f, x, n)."""
        o, ctx = self.opts, self.ctx
        n_f, n_pgd = ctx.iters(o.surrogate_steps), ctx.iters(o.pgd_steps)
        ref_latents, cursors = state["ref"], state["cursors"]
        # f' ← DB(copy(f), A_clean, n): weights copied into a preallocated twin. Each DreamBooth call starts
        # a fresh AdamW, as the released loop's new optimizer per call: the moments are allocated at the call's
        # first step and released after its last, so they never sit through the PGD steps, and f' and f never
        # hold two sets at once.
        learner.copy_from(surrogate)
        learner.unfreeze()
        cursors[0] = self.tune(learner, ref_latents.sample, len(ref_latents), n_f, cursors[0])
        self.end_call(learner)
        learner.freeze()
        x, loss = self.pgd(sd, learner.unet, learner.text_encoder, x, x0, n_pgd, o.eps_m11, o.alpha_m11)
        # f ← DB(f, x, n): the surrogate follows the poisoned learner (on square crops of the working copies).
        poison = _PixelLatents(surrogate, x.detach(), self._crop_size)
        cursors[1] = self.tune(surrogate, poison.sample, len(x), n_f, cursors[1])
        self.end_call(surrogate)
        return x, loss

    def end_call(self, trainer: DreamBoothTrainer) -> None:
        """A DreamBooth call is over: its AdamW state goes (noted in the dtype record first)."""
        self.dtypes.note_trainer(trainer)
        trainer.release_optimizer_state()

    def summary(self, history: list[float]) -> dict[str, Any]:
        out: dict[str, Any] = {"final_pgd_loss": history[-1] if history else None,
                               "clean_reference": "ref" if self.ctx.ref is not None else "input",
                               "pgd_steps": self.pgd_steps_done, "surrogate_weights": self.weights_note(),
                               "dtypes": self.dtype_record()}
        if self._target_latents is not None:
            out["targeted"] = self._target_record
        if len(self.model_ids()) > 1:
            out["ensemble"] = self.model_ids()
        return out

    def weights_note(self) -> str:
        """What the trained weights were, read off the run's dtype record (not off the flags)."""
        trained = self.dtype_record().get("trained_weights", "float32")
        if "bfloat16" in trained:
            return "bf16 weights trained directly (--compat, as released)"
        return f"{trained} master weights"

    @property
    def dtypes(self) -> DtypeLedger:
        """Dtypes seen in this run: trained copies, their optimizer state, compute, perturbation, gradient."""
        if "_dtypes" not in self.__dict__:
            self._dtypes = DtypeLedger()
        return self._dtypes

    def dtype_record(self) -> dict[str, str]:
        """The report's ``dtypes``: the trainers this run made, as they are at its end, plus what PGD saw."""
        for trainer in self.__dict__.get("_trainers", []):
            self.dtypes.note_trainer(trainer)
        sd = self.__dict__.get("_sd")
        if sd is not None:
            self.dtypes.note("frozen_weights", sd.vae.parameters())
        return self.dtypes.record()

    def release_trainers(self) -> None:
        """The run's trainers are done: their dtypes go into the record, and the references go, so their weights
        and AdamW's moments are freed before anything else is loaded (the base read back, the next model)."""
        for trainer in self.__dict__.pop("_trainers", []):
            self.dtypes.note_trainer(trainer)

    def track(self, sd, *trainers: DreamBoothTrainer) -> None:
        """Register the base model and trainers whose dtypes the report records."""
        self._sd = sd
        self.__dict__.setdefault("_trainers", []).extend(t for t in trainers if t not in self._trainers)

    def total_pgd_steps(self) -> int:
        """K: PGD steps of the whole run (every ensemble member's steps count), for CAP's k̂ = K/2."""
        o, ctx = self.opts, self.ctx
        return ctx.iters(o.iterations) * ctx.iters(o.pgd_steps) * max(1, len(self.model_ids()))

    def model_ids(self) -> list[str]:
        return list(getattr(self.opts, "models", None) or [])

    def prepare(self, sd, x0: Groups) -> None:
        """Hook run once before the loop (SimAC selects its timesteps here)."""

    # --- pieces shared with the other members of the family (FSMG, SimAC, MetaCloak, CAP hosts) -----
    def db_config(self) -> DreamBoothConfig:
        o = self.opts
        return DreamBoothConfig(lr=o.lr, prior_weight=o.prior_weight, train_text_encoder=o.train_text_encoder,
                                instance_prompt=o.instance_prompt, class_prompt=o.class_prompt,
                                bf16_weights=self.ctx.compat)

    def class_latents(self, sd) -> LatentCache | None:
        ctx, o = self.ctx, self.opts
        if o.class_images <= 0 or o.prior_weight <= 0:
            return None
        cls = class_images(sd, o.class_prompt, o.class_images, ctx.cache_dir, steps=o.class_image_steps,
                           resolution=ctx.resolution, ctx=ctx)
        return LatentCache.encode(sd.vae, cls.to(ctx.device, ctx.dtype))

    def surrogate_pair(self, sd, clean: torch.Tensor) -> tuple[DreamBoothTrainer, DreamBoothTrainer]:
        """(learner f', persistent surrogate f), each with its own weights and optimizer, made once."""
        class_latents = self.class_latents(sd)
        self._ref_latents = LatentCache.encode(sd.vae, clean)
        self._n_class = len(class_latents) if class_latents is not None else 0
        cfg, gen = self.db_config(), self.ctx.generator
        if getattr(self.opts, "surrogate", "full") == "lora":
            pair = self.lora_pair(sd, cfg, class_latents)
        else:
            unet, te = sd.trainable_copy()
            pair = [DreamBoothTrainer(sd, unet, te, cfg, class_latents=class_latents, generator=gen)]
            if self.lends_base(sd):
                pair.append(self.lent_trainer(sd, cfg, class_latents, gen))
            else:
                unet, te = sd.trainable_copy()
                pair.append(DreamBoothTrainer(sd, unet, te, cfg, class_latents=class_latents, generator=gen))
        self.track(sd, *pair)
        return pair[0], pair[1]

    def lora_pair(self, sd, cfg: DreamBoothConfig, class_latents) -> list[DreamBoothTrainer]:
        """(f', f) as two LoRA adapter sets on the shared base (-o surrogate=lora) [PROP]; aspl-lora
        overrides this with the released single set."""
        if self.model_ids()[1:]:
            from cloak.errors import UsageError

            raise UsageError(f"{self.name}: -o surrogate=lora does not combine with an E-ASPL ensemble (-o models=)")
        from cloak.diffusion.lora_surrogate import lora_trainers

        return lora_trainers(sd, ("learner", "surrogate"), cfg, rank=self.opts.lora_rank,
                             class_latents=class_latents, generator=self.ctx.generator)

    def tune(self, trainer: DreamBoothTrainer, sample, n_images: int, steps: int, cursor: int) -> int:
        """``steps`` DreamBooth steps on one instance image each (+1 class image), as aspl.py does.

        Returns the next cursor: 0 (restart, released behaviour) unless ``persistent_cycling``.
        """
        start = cursor if getattr(self.opts, "persistent_cycling", False) else 0
        for s in range(steps):
            i = (start + s) % n_images
            cls = [(start + s) % self._n_class] if self._n_class else None
            trainer.step(sample([i], self.ctx.generator), cls)
        return start + steps

    def pgd(self, sd, unet, text_encoder, x: Groups, x0: Groups, steps: int, eps: float, alpha: float, bar=None,
            on_step=None):
        """``steps`` PGD ascent steps on the loss of the frozen (unet, text_encoder); whole set per step.

        Each step draws its randomness once (``draw``, bucket by bucket) and hands ``update`` a loss of x
        alone, so a plug-in (CAP) can evaluate several candidate steps on the same draw.
        """
        with torch.no_grad():
            text = encode_prompts(sd.tokenizer, text_encoder, [self.opts.instance_prompt])
        loss_value = float("nan")
        for _ in range(steps):
            draws = [self.draw(sd, part, idx) for part, idx in zip(x.parts, x.indices)]

            def loss_fn(pixels, bucket: int, rows: slice | None = None, draws=draws, copies: int = 1):
                # copies > 1: CAP's candidates stacked candidate-major, one loss per candidate back
                draw = draws[bucket] if rows is None else draws[bucket].rows(rows)
                return self.loss(sd, unet, pixels, text, draw, rows=rows, bucket=bucket, copies=copies)

            x, loss_value = self.update(x, x0, loss_fn, eps, alpha)
            self.pgd_steps_done += 1
            if on_step is not None:
                on_step(x, self.pgd_steps_done)
            if bar is not None:
                bar.advance(1, status=f"loss {loss_value:.4f}")
        return x.detach(), loss_value

    def latent_shape(self, sd, x, pixel_shape: tuple[int, int] | None = None) -> tuple[int, int, int]:
        f = sd.vae_scale_factor
        h, w = pixel_shape or x.shape[-2:]
        return (sd.unet.config.in_channels, h // f, w // f)

    def draw_timesteps(self, sd, x, indices: list[int] | None = None) -> torch.Tensor | None:
        """Timesteps of one PGD step; None = uniform over all T (SimAC restricts them per image)."""
        return None

    def draw(self, sd, x, indices: list[int] | None = None, pixel_shape: tuple[int, int] | None = None
             ) -> FamilyDraw:
        """One draw for the images ``x`` of one bucket (``indices``: their positions in the set);
        ``pixel_shape``: the size the loss sees when a transform changes it (MetaCloak's EoT)."""
        shape = self.latent_shape(sd, x, pixel_shape)
        d = Draw.sample(x.shape[0], shape, sd.noise_scheduler, self.ctx.generator, x.device,
                        timesteps=self.draw_timesteps(sd, x, indices))
        extra = {}
        if self._target_latents is not None:
            extra["step_noise"] = sample_noise((x.shape[0], *shape), self.ctx.generator, x.device)
        return FamilyDraw(d.timesteps, d.noise, d.posterior_noise, extra)

    def loss(self, sd, unet, pixels, text, draw: Draw, rows: slice | None = None, bucket: int = 0,
             copies: int = 1) -> torch.Tensor:
        """L_dn of ``pixels`` (gradient flows through the VAE encoder) on one fixed draw; with a target,
        the targeted loss of protect.md §1. ``copies`` > 1: ``pixels`` holds that many candidates of the
        draw's images stacked candidate-major, each on the same draw, and the loss comes back per candidate."""
        if copies > 1:
            draw = draw.repeat(copies)
        latents = encode_latents_in_loss(sd.vae, pixels, self.ctx.dtype, posterior_noise=draw.posterior_noise)
        scheduler = sd.noise_scheduler
        n = latents.shape[0]
        dt = next(unet.parameters()).dtype  # bf16 under --compat (weights trained in bf16, as released)
        with autocast_for(latents.device, self.ctx.dtype):
            noisy = scheduler.add_noise(latents, draw.noise.to(latents.dtype), draw.timesteps)
            pred = unet(noisy.to(dt), draw.timesteps, text.to(dt).expand(n, *text.shape[1:])).sample
        target = training_target(scheduler, latents, draw.noise.to(latents.dtype), draw.timesteps)
        loss = candidate_mse(pred.float(), target.float(), copies)
        if self._target_latents is None:
            return loss
        # T-ASPL/T-FSMG [C]: pull the model's one-step denoised ẑ_{t−1} towards the target's q(z_tgt, ε, t−1).
        prev = ddpm_prev_sample(scheduler, pred.float(), draw.timesteps, noisy.float(), draw.extra["step_noise"])
        z_tgt = self._target_latents[bucket].float().expand_as(prev)
        t_prev = (draw.timesteps - 1).clamp(min=0)
        # t = 0: q(z_tgt, ε, −1) is z_tgt itself (ᾱ_{−1} = 1, as scheduler.step treats t−1 < 0). The released
        # code's add_noise(…, t−1) indexes ᾱ[−1] = ᾱ_{T−1} there, a 1-in-1000 wrap-around we do not copy.
        tgt_prev = torch.where((draw.timesteps > 0).view(-1, 1, 1, 1),
                               scheduler.add_noise(z_tgt, draw.noise.float(), t_prev), z_tgt)
        return loss - self.opts.target_weight * candidate_mse(prev, tgt_prev, copies)

    def update(self, x: Groups, x0: Groups, loss_fn, eps: float, alpha: float):
        """One PGD ascent step (sign of ∇ₓ loss), projected to the budget per image. Plug-ins override this."""
        loss, grad = self.loss_and_grad(x, loss_fn)
        return x.map(lambda p, g, p0: pgd_step(p.detach(), g, p0, alpha, eps), grad, x0), loss

    def chunks(self, n: int) -> list[slice] | None:
        """Row slices of ``pgd_batch`` images, or None when the whole set goes through at once."""
        return row_chunks(getattr(self.opts, "pgd_batch", 0))(n)

    def loss_and_grad(self, x: Groups, loss_fn) -> tuple[float, Groups]:
        """The step's loss (the mean over the set) and ∇ₓ of it, bucket by bucket and in ``pgd_batch``
        chunks when asked (cloak.adversarial.groups.loss_and_grad)."""
        loss, grad = loss_and_grad(x, loss_fn, self.chunks)
        self.dtypes.note("perturbation", x.parts)
        self.dtypes.note("perturbation_grad", grad.parts)
        return loss, grad

    def loss_value(self, x: Groups, loss_fn) -> float:
        """The step's loss at ``x`` without a gradient (CAP's candidates), pieced like ``loss_and_grad``."""
        return loss_value(x, loss_fn, self.chunks)

    def candidate_values(self, candidates: list[Groups], loss_fn) -> list[float]:
        """The step's loss at each of several candidate sets, in one pass per bucket and ``pgd_batch`` chunk
        (CAP's batched line search; cloak.adversarial.groups.candidate_values)."""
        return candidate_values(candidates, loss_fn, self.chunks)

    # --- T-ASPL / T-FSMG --------------------------------------------------------------------------
    def prepare_target(self, sd, x0: Groups | None) -> None:
        """Encode the target image once per working shape (a posterior sample, as released) when one is given:
        the target is loaded at each bucket's shape, so a uniform set encodes it once, as before."""
        from cloak.adversarial.target import describe, load_target, target_path

        supports = "target_image" in type(self.opts).model_fields
        if not supports:
            if self.ctx.extras.get("target_image"):
                self.ctx.warn(f"{self.name}: --target-image is ignored (this method has no targeted variant)")
            return
        path = target_path(self.ctx, self.opts.target_image)
        if path is None:
            self._target_latents = None
            return
        res = self.ctx.resolution or sd.resolution
        latents = []
        for shape in (x0.shapes if x0 is not None else [(res, res)]):
            pixels = load_target(path, shape).to(self.ctx.device, PIXEL_DTYPE)
            with torch.no_grad():
                latents.append(encode_latents(sd.vae, pixels, self.ctx.generator))
        self._target_latents = latents
        source = "flag" if self.ctx.extras.get("target_image") else "option"
        self._target_record = {**describe(path, source), "weight": self.opts.target_weight}

    # --- E-ASPL -------------------------------------------------------------------------------------
    def _ensemble(self, x0: Groups, clean: torch.Tensor) -> ProtectResult:
        ctx, ids = self.ctx, self.model_ids()
        members = [_Member(mid, role=f"ensemble-{j}") for j, mid in enumerate(ids)]
        pairs: dict[str, tuple[DreamBoothTrainer, DreamBoothTrainer]] = {}
        iterations = ctx.iters(self.opts.iterations)
        x = x0.clone()
        history: list[float] = []
        with ctx.progress.task(f"{self.name or 'aspl'} ensemble ×{len(ids)}", iterations * len(ids)) as bar:
            for it in range(iterations):
                acc = x.map(torch.zeros_like)
                for m in members:
                    with self._resident(m, members, pairs, x0, clean) as (sd, learner, surrogate):
                        x_j, loss = self.iteration(sd, learner, surrogate, x, x0, m.state)
                    acc = acc.map(lambda a, xj: a + xj / len(members), x_j)
                    history.append(loss)
                    bar.advance(1, status=f"{m.id} loss {loss:.4f}")
                x = acc
                self.save_snapshot(x, it + 1, "iteration")
        return ProtectResult(x.detach().result(), summary=self.summary(history))

    @contextmanager
    def _resident(self, m: _Member, members: list[_Member], pairs: dict, x0, clean):
        """Bring model ``m`` (its base model and its surrogate pair) onto the device, park it after.

        Members whose weights have the same shapes share one preallocated (learner, surrogate) pair;
        each member's own f_j then lives in a preallocated CPU/host buffer between turns. The optimizer
        state is dropped when parking: ASPL resets it before every DreamBooth call anyway [Q], so a
        fresh lazily-allocated state is the same thing.
        """
        ctx = self.ctx
        offload = ctx.device.type != "cpu"
        if m.sd is None:
            m.sd = ctx.models.sd(m.id, role=m.role)
        sd = m.sd
        if offload:
            _move_sd(sd, ctx.device)
        if m.arch is None:
            m.arch = _arch_key(sd)
            self._target_latents = None
            self.prepare_target(sd, x0)
            m.target = self._target_latents
            m.class_latents = self.class_latents(sd)
            m.state = {"ref": LatentCache.encode(sd.vae, clean), "cursors": [0, 0]}
        # Shared until every member's architecture is known (conservative); a member found alone in its
        # architecture keeps f_j in its own pair's surrogate and drops the buffer.
        shared = sum(1 for other in members if other.arch == m.arch or other.arch is None) > 1
        if not shared:
            m.weights = None
        if m.arch not in pairs:
            cfg = self.db_config()
            pair = []
            for _ in range(2):
                unet, te = sd.trainable_copy()
                pair.append(DreamBoothTrainer(sd, unet, te, cfg, class_latents=m.class_latents,
                                              generator=ctx.generator))
            pairs[m.arch] = (pair[0], pair[1])
            self.track(sd, *pair)
            fresh = True
        else:
            fresh = False
        learner, surrogate = pairs[m.arch]
        if offload and not fresh:
            for tr in (learner, surrogate):
                _move_modules(tr, ctx.device)
        for tr in (learner, surrogate):
            tr.sd = sd
            tr.class_latents = m.class_latents
        if shared:
            if m.weights is None:  # f_j starts as θ0_j, the member's own base weights
                m.weights = SnapshotPool((surrogate.unet, surrogate.text_encoder), 1)
                m.weights.save(0, sd.unet, sd.text_encoder)
            m.weights.load(0, surrogate.unet, surrogate.text_encoder)
        self._n_class = len(m.class_latents) if m.class_latents is not None else 0
        self._target_latents = m.target
        try:
            yield sd, learner, surrogate
        finally:
            if shared:
                m.weights.save(0, surrogate.unet, surrogate.text_encoder)
            if offload:
                for tr in (learner, surrogate):
                    tr.optimizer.state.clear()
                    _move_modules(tr, "cpu")
                _move_sd(sd, "cpu")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


@dataclass
class _Member:
    """One base model of the E-ASPL ensemble."""

    id: str
    role: str
    sd: Any = None
    arch: str | None = None
    weights: SnapshotPool | None = None  # f_j while another member uses the shared pair
    class_latents: LatentCache | None = None
    target: torch.Tensor | None = None
    state: dict = field(default_factory=dict)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32}


@torch.no_grad()
def _copy_from_safetensors(module: torch.nn.Module, folder) -> bool:
    """Read a module's weights back from its one safetensors file tensor by tensor, straight into the module's
    own storage (no second full copy of the module, unlike ``from_pretrained``; and no mapping of the file,
    whose pages would count in the process's resident memory as ``safe_open``'s do: that mapping was the peak
    of the run). A tensor stored in another dtype is read and converted. False when the folder is laid out
    otherwise."""
    import json
    import struct
    import sys

    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        return False
    state = module.state_dict()
    with open(files[0], "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        if set(header) != set(state) or any(
                list(state[name].shape) != list(info["shape"]) or info["dtype"] not in _SAFETENSORS_DTYPES
                for name, info in header.items()):
            return False  # checked before anything is written: the caller's fallback then starts clean
        base = 8 + size
        for name, info in header.items():
            target = state[name]
            begin, end = info["data_offsets"]
            stored = _SAFETENSORS_DTYPES[info["dtype"]]
            fh.seek(base + begin)
            if (stored == target.dtype and target.device.type == "cpu" and target.is_contiguous()
                    and sys.byteorder == "little" and target.numel() * target.element_size() == end - begin):
                if end > begin and fh.readinto(target.reshape(-1).view(torch.uint8).numpy().data) != end - begin:
                    raise OSError(f"{files[0]}: {name} is cut short")
                continue
            raw = bytearray(fh.read(end - begin))
            target.copy_(torch.frombuffer(raw, dtype=stored).reshape(target.shape) if raw else
                         torch.empty(target.shape, dtype=stored))
    return True


def _arch_key(sd) -> str:
    """Models whose UNet and text-encoder parameters have the same names and shapes share buffers."""
    digest = hashlib.sha1()
    for module in (sd.unet, sd.text_encoder):
        for name, p in module.named_parameters():
            digest.update(f"{name}:{tuple(p.shape)};".encode())
    return digest.hexdigest()[:16]


def _move_modules(trainer: DreamBoothTrainer, device) -> None:
    trainer.unet.to(device)
    trainer.text_encoder.to(device)


def _move_sd(sd, device) -> None:
    # The loaded base model is shared within the run; only E-ASPL moves it, to keep one model resident.
    for module in (sd.vae, sd.unet, sd.text_encoder):
        module.to(device)


class _PixelLatents:
    """Fresh posterior samples of (changing) pixels, in the LatentCache.sample signature: the square
    ``size`` centre crop of each image, as the attacker's DreamBooth trains on."""

    def __init__(self, trainer: DreamBoothTrainer, pixels: Groups, size: int):
        self.trainer, self.pixels, self.size = trainer, pixels, size

    def sample(self, index, generator) -> torch.Tensor:
        crops = [center_crop(self.pixels.image(i), self.size) for i in index]
        return self.trainer.encode_instances(crops[0] if len(crops) == 1 else torch.cat(crops))


__all__ = ["Aspl", "FamilyDraw", "SurrogateOptions", "TargetOptions", "ddpm_prev_sample"]
