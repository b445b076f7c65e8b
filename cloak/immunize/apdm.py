"""APDM — Anti-Personalized Diffusion Models (Lee, Seo, Ko, Park, NeurIPS 2025): DPO loss + L2P schedule.

immunize.md §2–3, following the released KU-VGI/APDM ``protect.py`` with the apdm001–008 settings of
``gen_arguments.py``. Each outer iteration copies the real UNet θ into a scratch twin θ', runs J
simulated personalization steps on θ' (DreamBooth with prior preservation), and after each of them
measures the protection loss (DPO + prior) at the updated θ'; those gradients are summed into θ,
which takes one AdamW step per outer iteration. Only the UNet changes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from cloak.diffusion import LatentCache, denoising_loss, encode_prompts, sample_noise, sample_timesteps
from cloak.diffusion.class_images import class_images
from cloak.diffusion.dpo import dpo_loss, dpo_target, reference_errors, squared_error
from cloak.diffusion.dreambooth import (
    DreamBoothConfig,
    autocast_for,
    copy_params,
    make_adamw,
    reset_optimizer_state,
)
from cloak.diffusion.loss import training_target
from cloak.diffusion.precision import (LOW_PRECISION, DtypeLedger, autocast_dtype, compute_label,
                                       optimizer_state_dtypes)
from cloak.errors import InputError, UsageError
from cloak.immunize.base import Checkpoints, ImmunizeMethod, ImmunizeResult, ShuffledLoader, paired_safe_images
from cloak.io.images import ImageSet
from cloak.methods import MethodOptions

log = logging.getLogger("cloak.immunize")

EVAL_SEED = 1234  # the fixed draws of the start/end evaluation (the same at both ends of training)


class ApdmOptions(MethodOptions):
    iterations: int = Field(800, ge=0, description="outer L2P iterations I (one update of the real UNet each)")
    inner_steps: int = Field(20, ge=1, description="inner steps J per outer iteration (simulated personalization)")
    lr: float = Field(5e-6, gt=0, description="AdamW learning rate of both the real and the scratch UNet")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (β 0.9/0.999, eps 1e-8)")
    batch_size: int = Field(1, ge=1, description="images per draw (instance, class and pair)")
    loss: Literal["dpo", "naive"] = Field(
        "dpo", description="protection loss: dpo (APDM), or naive = −L_dn on the subject, the baseline the paper "
                           "argues against (released --negative_loss), for ablations")
    beta: float = Field(1.0, gt=0, description="DPO β (released experiments: 1)")
    dpo_reduce: Literal["element", "sample"] = Field(
        "element", description="log-sigmoid per latent element (released code) or per sample after summing Δ "
                               "over C,H,W (Diffusion-DPO style)")
    relu_bound: float | None = Field(None, description="naive loss only: hinge ReLU(b − L_dn) instead of −L_dn")
    l2p_pure: bool = Field(
        False, description="transfer only ∇L_prot to the real model; the released code (default) does not zero "
                           "θ'.grad after the personalization step, so it transfers ∇L_db + ∇L_prot")
    grad_accum: Literal["sum", "mean"] = Field("sum", description="sum the J transferred gradients, or average them")
    unfreeze: list[str] | None = Field(
        None, description="transfer gradients only to parameters whose name contains one of these (comma list)")
    prior_weight: float = Field(1.0, ge=0, description="prior-preservation weight λ in both paths")
    protect_prior: bool = Field(True, description="add λ·L_dn(class) to the protection path (released in_ppl)")
    class_images: int = Field(200, ge=0, description="class images for prior preservation (0 = no prior)")
    class_image_steps: int = Field(50, ge=1, description="sampling steps used to make the class images")
    safe_image_steps: int = Field(50, ge=1, description="sampling steps used to make the paired safe set when "
                                                        "--safe is not given")
    instance_prompt: str = Field("a photo of sks person", description="the subject prompt c")
    class_prompt: str = Field("a photo of person", description="the class prompt c_cls")
    autocast: bool = Field(True, description="bf16 autocast on CUDA (fp32 master weights)")
    gradient_checkpointing: bool = Field(True, description="gradient checkpointing of the scratch UNet on CUDA")
    eval_timesteps: int = Field(8, ge=1, description="timesteps per image of the fixed-draw start/end evaluation")

    @field_validator("unfreeze", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()] or None
        return value


def shell_mangled(prompt: str) -> str:
    """The prompt as the released run.sh delivers it: spaces → ``_`` and literal quote characters
    (gen_arguments.py quotes it, the unquoted ``$args`` expansion keeps the quotes) [Q]."""
    return '"' + prompt.replace(" ", "_") + '"'


@torch.no_grad()
def transfer_gradients(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``θ.grad += θ'.grad`` for every parameter that has a gradient (released: skip those without).

    A missing θ.grad takes θ'.grad's tensor itself, as the released code does: θ'.grad is reset to
    None before backward writes it again, so the two never alias a live buffer.
    """
    adds_dst, adds_src = [], []
    for d, s in zip(dst, src):
        if s.grad is None:
            continue
        if d.grad is None:
            d.grad = s.grad
        else:
            adds_dst.append(d.grad)
            adds_src.append(s.grad)
    if adds_dst:
        torch._foreach_add_(adds_dst, adds_src)


class Apdm(ImmunizeMethod):
    paper = "Lee, Seo, Ko, Park, Perturb a Model, Not an Image (APDM), NeurIPS 2025 (arXiv 2511.01307)"
    implements = ("DPO loss + L2P dual-path schedule per KU-VGI/APDM protect.py with the apdm001-008 settings "
                  "(SD 1.5, 800 x 20, lr 5e-6, beta 1, prior weight 1); fp32 master weights")
    Options = ApdmOptions
    steps_option = "iterations"
    default_model = "sd15"
    proposals: ClassVar[tuple[str, ...]] = ("safe_image_steps", "autocast", "gradient_checkpointing",
                                            "eval_timesteps")
    notes: ClassVar[str] = (
        "Paired safe set from --safe (image i pairs with subject image i, both in natural-sort order [PROP]; "
        "released: unsorted os.listdir); without it, one image per subject image is generated from the class "
        "prompt by the base model and cached [PROP]. Defaults follow the released code where the spec says so: "
        "per-element log-sigmoid and un-zeroed scratch gradients (-o l2p_pure=true for the pure variant). "
        "--compat: ε target in DPO also for v-prediction models, and the shell-mangled prompts of run.sh.")
    tiny_options: ClassVar[dict] = {"class_images": 2, "class_image_steps": 2, "safe_image_steps": 2,
                                    "iterations": 2, "inner_steps": 2}

    # --- the run -----------------------------------------------------------------------------------
    def __call__(self, subject: ImageSet, safe: ImageSet | None = None,
                 checkpoints: Checkpoints | None = None) -> ImmunizeResult:
        ctx, o = self.ctx, self.opts
        safe_paths = self.setup(subject, safe)
        theta, opt, ref = self.theta, self.opt, self.sd.unet
        total, inner = ctx.iters(o.iterations), ctx.iters(o.inner_steps)
        start, history, eval_start, earlier_seconds = 0, [], None, 0.0
        loaded = checkpoints.load() if checkpoints is not None and checkpoints.resume else None
        if loaded is not None:
            state = self.restore(loaded)
            start, history, eval_start = state["iteration"], state["history"], state["eval_start"]
            earlier_seconds = state["train_seconds"]
            log.info("resuming APDM at outer iteration %d of %d from %s", start, total, checkpoints.path)
        if eval_start is None:
            eval_start = self.evaluate(theta, ref)

        clock = time.perf_counter()
        with ctx.progress.task("apdm" if not start else f"apdm (resumed at {start})", total - start) as bar:
            for i in range(start, total):
                opt.zero_grad(set_to_none=True)
                sums = self.accumulate(inner)
                if o.grad_accum == "mean":
                    torch._foreach_div_([p.grad for p in self.dst if p.grad is not None], float(inner))
                opt.step()  # one update of the real model per outer iteration
                db, prot, main = (sums / inner).tolist()
                history.append({"db": db, "prot": prot, o.loss: main})
                bar.advance(1, status=f"{o.loss} {main:.4f} db {db:.4f}")
                if checkpoints is not None and checkpoints.due(i + 1, total):
                    seconds = earlier_seconds + time.perf_counter() - clock
                    checkpoints.save(*self.snapshot(i + 1, history, eval_start, seconds))
        seconds = time.perf_counter() - clock
        done = total - start
        theta.requires_grad_(False)
        theta.eval()
        eval_end = self.evaluate(theta, ref)
        summary: dict[str, Any] = {
            "loss": o.loss, "iterations": total, "inner_steps": inner, "resumed_from": start or None,
            "loss_start": history[0] if history else None, "loss_end": history[-1] if history else None,
            "loss_note": "means over the J inner steps of the first / last outer iteration: db = personalization "
                         "loss on θ', prot = protection loss (incl. prior), dpo/naive = its main term",
            "eval_start": eval_start, "eval_end": eval_end,
            "eval_note": "fixed draws (same t, ε at start and end) on the real UNet: dpo = L_DPO against the base "
                         "(log 2 at the start with an fp32 base), dpo_margin = mean −Δ (> 0: against the base, the "
                         "subject's error rose more than the safe images'), subject_dn / safe_dn = L_dn with the "
                         "instance prompt, class_dn = L_dn of class images with the class prompt (general "
                         "generation)",
            "train_seconds": round(seconds, 3), "train_seconds_total": round(earlier_seconds + seconds, 3),
            "seconds_per_outer_iteration": round(seconds / done, 4) if done else None,
            "checkpoints_written": checkpoints.saved if checkpoints is not None else 0,
            "safe_set": "given" if safe is not None else "generated",
            "prompts": {"instance": self.instance_prompt, "class": self.class_prompt},
            "history": {k: [round(h[k], 6) for h in history] for k in (history[0] if history else {})},
            **peak_memory(ctx.device),
            "dtypes": self.dtype_record(),
        }
        return ImmunizeResult(theta, summary, safe_paths)

    def setup(self, subject: ImageSet, safe: ImageSet | None) -> list[str]:
        """Data, prompts, the three UNets and both optimizers; returns the safe image paired with each
        subject image."""
        ctx, o = self.ctx, self.opts
        cuda = ctx.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        sd = self.sd = ctx.models.sd(ctx.model, role="base")
        self.scheduler = sd.noise_scheduler
        safe_paths = self.prepare_data(sd, subject, safe)
        # θ_ref is the loaded base UNet itself: frozen, never modified (a shared object), so no third copy.
        # θ and θ' are fp32 master copies; θ' is allocated once and refilled by copy_params.
        self.theta = copy.deepcopy(sd.unet).float().requires_grad_(True)
        self.scratch = copy.deepcopy(self.theta)
        self.theta.train()
        self.scratch.train()
        if cuda and o.gradient_checkpointing:
            self.scratch.enable_gradient_checkpointing()
        cfg = DreamBoothConfig(lr=o.lr, weight_decay=o.weight_decay)
        self.opt = make_adamw(self.theta.parameters(), cfg)
        self.opt_scratch = make_adamw(self.scratch.parameters(), cfg)
        mask = self.transfer_mask(self.theta)
        self.dst = [p for p, keep in zip(self.theta.parameters(), mask) if keep]
        self.src = [p for p, keep in zip(self.scratch.parameters(), mask) if keep]
        # A low-precision --dtype always autocasts (θ_ref is the base UNet in that dtype; θ, θ' are fp32 masters).
        low = ctx.dtype in LOW_PRECISION
        self.autocast = autocast_for(ctx.device, ctx.dtype) if o.autocast or low else contextlib.nullcontext()
        self.compute_dtype = autocast_dtype(ctx.device, ctx.dtype) if o.autocast or low else None
        return safe_paths

    def accumulate(self, inner: int) -> torch.Tensor:
        """One L2P outer iteration up to the update: θ' ← θ, then ``inner`` personalization steps on θ',
        each followed by the protection loss at the updated θ', whose gradients are added to θ.grad.

        Returns the summed (L_db, L_prot, main term) over the inner steps.
        """
        o, scratch, opt_scratch = self.opts, self.scratch, self.opt_scratch
        copy_params(self.theta, scratch)  # θ' ← θ, no deepcopy in the loop
        reset_optimizer_state(opt_scratch)  # a fresh inner AdamW, without reallocating its state
        sums = torch.zeros(3, device=self.ctx.device)
        for _ in range(inner):
            # personalization path: what an attacker would do, one step on θ'
            opt_scratch.zero_grad(set_to_none=True)
            l_db = self.personalization_loss(scratch)
            l_db.backward()
            opt_scratch.step()
            if o.l2p_pure:
                opt_scratch.zero_grad(set_to_none=True)
            # protection path at the updated θ'. Released code: θ'.grad still holds ∇L_db here, so
            # ∇L_db(θ'_{j-1}) + ∇L_prot(θ'_j) is transferred [Q, kept as the default per the spec].
            l_prot, l_main = self.protection_loss(scratch, self.sd.unet)
            l_prot.backward()
            transfer_gradients(self.dst, self.src)
            sums += torch.stack([l_db.detach(), l_prot.detach(), l_main.detach()]).float()
        return sums

    # --- data ----------------------------------------------------------------------------------
    def prepare_data(self, sd, subject: ImageSet, safe: ImageSet | None) -> list[str]:
        """Encode subject, safe and class images once (fresh posterior samples are drawn from the cache)."""
        ctx, o = self.ctx, self.opts
        if ctx.compat:  # [Q] prompts as the released shell glue delivers them
            self.instance_prompt, self.class_prompt = shell_mangled(o.instance_prompt), shell_mangled(o.class_prompt)
        else:
            self.instance_prompt, self.class_prompt = o.instance_prompt, o.class_prompt
        resolution = ctx.resolution or sd.resolution
        if safe is not None:
            if len(safe) != len(subject):
                raise InputError(f"the paired safe set has {len(safe)} images but the subject has {len(subject)}: "
                                 "image i of --safe pairs with image i of the subject")
            safe_pixels, safe_paths = safe.pixels, [str(item.path) for item in safe.items]
        else:
            safe_pixels, paths = paired_safe_images(sd, self.class_prompt, len(subject), ctx.cache_dir,
                                                    steps=o.safe_image_steps, resolution=resolution)
            safe_paths = [str(p) for p in paths]

        def encode(pixels: torch.Tensor) -> LatentCache:
            return LatentCache.encode(sd.vae, pixels.to(ctx.device, sd.vae.dtype))

        self.subject, self.safe = encode(subject.pixels), encode(safe_pixels)
        self.classes = None
        if o.class_images > 0 and o.prior_weight > 0:
            cls = class_images(sd, self.class_prompt, o.class_images, ctx.cache_dir, steps=o.class_image_steps,
                               resolution=resolution, ctx=ctx)
            self.classes = encode(cls)
        with torch.no_grad():  # the text encoder is frozen: encode both prompts once
            self.c = encode_prompts(sd.tokenizer, sd.text_encoder, [self.instance_prompt]).float()
            self.c_cls = encode_prompts(sd.tokenizer, sd.text_encoder, [self.class_prompt]).float()
        gen = ctx.generator
        self.instance_loader = ShuffledLoader(len(self.subject), gen)
        self.pair_loader = ShuffledLoader(len(self.subject), gen)
        self.class_loader = ShuffledLoader(len(self.classes), gen) if self.classes is not None else None
        return safe_paths

    def transfer_mask(self, theta) -> list[bool]:
        names = [name for name, _ in theta.named_parameters()]
        if not self.opts.unfreeze:
            return [True] * len(names)
        mask = [any(part in name for part in self.opts.unfreeze) for name in names]
        if not any(mask):
            raise UsageError(f"unfreeze={','.join(self.opts.unfreeze)} matches no UNet parameter",
                             hint="use sub-module names such as up_blocks, mid_block, attn2")
        return mask

    # --- the two paths ---------------------------------------------------------------------------
    def dtype_record(self) -> dict[str, str]:
        """Which tensors ran in which dtype, read off the tensors themselves."""
        ledger = DtypeLedger()
        ledger.note("frozen_weights", self.sd.unet.parameters())
        ledger.note("trained_weights", self.theta.parameters())
        ledger.note("trained_optimizer_state", optimizer_state_dtypes(self.opt))
        ledger.note("scratch_weights", self.scratch.parameters())
        ledger.note("compute", compute_label(self.compute_dtype, self.theta.parameters()))
        return ledger.record()

    def _states(self, prompt: torch.Tensor, n: int) -> torch.Tensor:
        return prompt.expand(n, *prompt.shape[1:])

    def personalization_loss(self, unet) -> torch.Tensor:
        """DreamBooth on θ': ``L_dn(x_u, c) + λ·L_dn(x_cls, c_cls)``, one t shared by both halves [C]."""
        ctx, o, gen = self.ctx, self.opts, self.ctx.generator
        b = o.batch_size
        t = sample_timesteps(b, self.scheduler.config.num_train_timesteps, gen, ctx.device)
        latents = [self.subject.sample(self.instance_loader.take(b), gen)]
        states, steps = [self._states(self.c, b)], [t]
        if self.classes is not None:
            latents.append(self.classes.sample(self.class_loader.take(b), gen))
            states.append(self._states(self.c_cls, b))
            steps.append(t)
        with self.autocast:
            per = denoising_loss(unet, self.scheduler, torch.cat(latents).float(), torch.cat(states), gen,
                                 timesteps=torch.cat(steps), reduction="none")
        loss = per[:b].mean()
        if self.classes is not None:
            loss = loss + o.prior_weight * per[b:].mean()
        return loss

    def protection_loss(self, unet, ref) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_prot, its main term): L_DPO (or the naive loss) at θ', plus λ·L_dn(x_cls, c_cls).

        The model's forward passes of the pair and the prior image run as one batch.
        """
        ctx, o, gen = self.ctx, self.opts, self.ctx.generator
        b, sched = o.batch_size, self.scheduler
        total_t = sched.config.num_train_timesteps
        inputs, steps, states, n_main = [], [], [], 0
        if o.loss == "dpo":
            pair = self.pair_loader.take(b)
            z_u, z_s = self.subject.sample(pair, gen).float(), self.safe.sample(pair, gen).float()
            noise = sample_noise(z_u.shape, gen, ctx.device)  # one (t, ε) shared by the pair
            t = sample_timesteps(b, total_t, gen, ctx.device)
            noisy = torch.cat([sched.add_noise(z_u, noise, t), sched.add_noise(z_s, noise, t)])
            target = torch.cat([dpo_target(sched, z_u, noise, t, epsilon_only=ctx.compat),
                                dpo_target(sched, z_s, noise, t, epsilon_only=ctx.compat)])
            inputs.append(noisy)
            steps += [t, t]
            states.append(self._states(self.c, 2 * b))
            n_main = 2 * b
        else:
            z = self.subject.sample(self.instance_loader.take(b), gen).float()
            noise = sample_noise(z.shape, gen, ctx.device)
            t = sample_timesteps(b, total_t, gen, ctx.device)
            inputs.append(sched.add_noise(z, noise, t))
            target = training_target(sched, z, noise, t)
            steps.append(t)
            states.append(self._states(self.c, b))
            n_main = b
        prior = self.classes is not None and o.protect_prior
        if prior:
            z_c = self.classes.sample(self.class_loader.take(b), gen).float()
            noise_c = sample_noise(z_c.shape, gen, ctx.device)
            # released: the prior term reuses the t of the (naive-loss) instance draw; a fresh t for DPO
            t_c = t if o.loss == "naive" else sample_timesteps(b, total_t, gen, ctx.device)
            inputs.append(sched.add_noise(z_c, noise_c, t_c))
            steps.append(t_c)
            states.append(self._states(self.c_cls, b))
        with self.autocast:
            pred = unet(torch.cat(inputs), torch.cat(steps), torch.cat(states)).sample
            if o.loss == "dpo":
                err_ref = reference_errors(ref, noisy, torch.cat([t, t]), states[0], target)
        if o.loss == "dpo":
            err = squared_error(pred[:n_main], target)
            main = dpo_loss(err[b:], err_ref[b:], err[:b], err_ref[:b], beta=o.beta, reduce=o.dpo_reduce)
        else:
            l_dn = squared_error(pred[:n_main], target).mean()
            main = -l_dn if not o.relu_bound else F.relu(o.relu_bound - l_dn)
        loss = main
        if prior:
            target_c = training_target(sched, z_c, noise_c, t_c)
            loss = loss + o.prior_weight * squared_error(pred[n_main:], target_c).mean()
        return loss, main

    # --- fixed-draw evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, unet, ref) -> dict[str, float | None]:
        """L_DPO against the base, and L_dn of subject / safe / class images, on fixed draws."""
        ctx, o, sched = self.ctx, self.opts, self.scheduler
        gen = torch.Generator("cpu").manual_seed(EVAL_SEED)
        total_t = sched.config.num_train_timesteps
        grid = torch.linspace(0, total_t - 1, o.eval_timesteps).round().long().to(ctx.device)
        k = len(grid)
        t2 = torch.cat([grid, grid])
        dpo, margin, subject_dn, safe_dn = [], [], [], []
        for i in range(len(self.subject)):
            z_u = self.subject.sample([i], gen).float().expand(k, -1, -1, -1)
            z_s = self.safe.sample([i], gen).float().expand(k, -1, -1, -1)
            noise = sample_noise(z_u.shape, gen, ctx.device)
            noisy = torch.cat([sched.add_noise(z_u, noise, grid), sched.add_noise(z_s, noise, grid)])
            z = torch.cat([z_u, z_s])
            noise2 = torch.cat([noise, noise])
            target = dpo_target(sched, z, noise2, t2, epsilon_only=ctx.compat)
            states = self._states(self.c, 2 * k)
            with self.autocast:
                pred = unet(noisy, t2, states).sample
                err_ref = reference_errors(ref, noisy, t2, states, target)
            err = squared_error(pred, target)
            dpo.append(float(dpo_loss(err[k:], err_ref[k:], err[:k], err_ref[:k], beta=o.beta, reduce=o.dpo_reduce)))
            margin.append(float(((err[:k] - err_ref[:k]) - (err[k:] - err_ref[k:])).mean()))
            dn = squared_error(pred, training_target(sched, z, noise2, t2)).flatten(1).mean(1)
            subject_dn.append(float(dn[:k].mean()))
            safe_dn.append(float(dn[k:].mean()))
        class_dn = None
        if self.classes is not None:
            values = []
            for i in range(min(len(self.classes), 4)):
                z_c = self.classes.sample([i], gen).float().expand(k, -1, -1, -1)
                noise = sample_noise(z_c.shape, gen, ctx.device)
                with self.autocast:
                    pred = unet(sched.add_noise(z_c, noise, grid), grid, self._states(self.c_cls, k)).sample
                values.append(float(squared_error(pred, training_target(sched, z_c, noise, grid)).mean()))
            class_dn = sum(values) / len(values)

        def mean(xs: list[float]) -> float:
            return round(sum(xs) / len(xs), 6)

        return {"dpo": mean(dpo), "dpo_margin": mean(margin), "subject_dn": mean(subject_dn), "safe_dn": mean(safe_dn),
                "class_dn": round(class_dn, 6) if class_dn is not None else None}

    # --- checkpoints -----------------------------------------------------------------------------
    def snapshot(self, iteration: int, history: list, eval_start: dict, seconds: float):
        """Everything a resumed run needs to continue bit for bit: θ, AdamW state, RNG, data order."""
        theta, opt = self.theta, self.opt
        tensors = {f"unet.{k}": v for k, v in theta.state_dict().items()}
        for index, param in enumerate(theta.parameters()):
            for name, value in opt.state.get(param, {}).items():
                tensors[f"adam.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        tensors["rng.generator"] = self.ctx.generator.get_state()
        loaders = {"instance": self.instance_loader.state(), "pair": self.pair_loader.state(),
                   "class": self.class_loader.state() if self.class_loader is not None else None}
        state = {"iteration": iteration, "history": history, "eval_start": eval_start, "loaders": loaders,
                 "train_seconds": seconds}
        return tensors, state

    def restore(self, loaded) -> dict[str, Any]:
        tensors, state = loaded
        theta, opt = self.theta, self.opt
        theta.load_state_dict({k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")})
        opt_state = opt.state_dict()
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, name = key.split(".", 2)
                per_param.setdefault(int(index), {})[name] = value
        opt_state["state"] = per_param
        opt.load_state_dict(opt_state)
        self.ctx.generator.set_state(tensors["rng.generator"])
        self.instance_loader.restore(state["loaders"]["instance"])
        self.pair_loader.restore(state["loaders"]["pair"])
        if self.class_loader is not None:
            self.class_loader.restore(state["loaders"]["class"])
        return state


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory of the run, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
    try:
        import resource

        return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return {}
