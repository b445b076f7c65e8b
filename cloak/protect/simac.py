"""SimAC — adaptive timestep selection + feature interference on top of ASPL (Wang et al. CVPR'24).

protect.md §6. Before the ASPL loop, each image gets its own set of timesteps T_i by a greedy search on
the base model: repeatedly score 5 random timesteps by the size of ∇ₓL_dn, cut a window around the
least useful one, and step a scratch copy of the image along the most useful one, until at most 100
timesteps remain. In the ASPL loop (same N, n, K, lr) every PGD step draws image i's timestep from T_i
and adds λ·MSE(F(x), F(x_clean)) to the ascended loss, F being the residual-branch outputs of the ResNet
blocks of the UNet's last up-block (64×64 latents on SD).

[Q] The released code adds the feature term as ``.detach().item()``: a constant, no gradient. The
default here carries its gradient (the paper's intent) [PROP]; ``--compat`` adds the detached value.

[Q] The released clean branch encodes ``data_tensor``, the images as they were at the start of each PGD call
(already perturbed from the second iteration on), not the original photos. ``feature_anchor`` picks:
``clean`` (the original images, the paper's "clean" features) is the default [PROP]; ``pgd_start`` is the
released behaviour and the default under ``--compat``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from cloak.adversarial import pgd_step
from cloak.adversarial.groups import Groups
from cloak.diffusion import (
    Draw, LatentCache, denoising_loss, encode_latents_in_loss, encode_prompts, sample_noise,
)
from cloak.diffusion.dreambooth import autocast_for
from cloak.diffusion.lora_surrogate import LoraSurrogateOptions
from cloak.diffusion.loss import tile_rows
from cloak.protect.aspl import Aspl, SurrogateOptions, candidate_mse, pgd_batch_field, save_every_field


class FeatureTap:
    """Records the residual-branch output (``conv2``, before the shortcut add) of ResNet blocks."""

    def __init__(self, resnets):
        self.modules = [r.conv2 for r in resnets]
        self.outputs: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> FeatureTap:
        self.outputs = []
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def _hook(self, module, inputs, output) -> None:
        self.outputs.append(output)

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def features(self) -> torch.Tensor:
        return torch.cat([f.float().flatten(1) for f in self.outputs], dim=1)


class Simac(Aspl):
    paper = "Wang et al., SimAC: A Simple Anti-Customization Method for Protecting Face Privacy, CVPR 2024 " \
            "(arXiv 2312.07865)"
    implements = ("SimAC per somuchtome/SimAC attacks/time_feature.py: greedy per-image timestep selection + "
                  "feature interference on ASPL; the feature term carries its gradient unless --compat")
    uses_ref = True
    steps_option = "iterations"
    proposals: ClassVar[tuple[str, ...]] = ("feature_weight", "feature_anchor")

    class Options(SurrogateOptions, LoraSurrogateOptions):
        eps: float = Field(16 / 255, ge=0, description="ℓ∞ budget (released: 16/255 in [-1,1] = 8/255 in [0,1])",
                           json_schema_extra={"unit": "unit"})
        alpha: float = Field(0.005, ge=0, description="PGD step size", json_schema_extra={"unit": "unit"})
        iterations: int = Field(50, ge=0, description="outer ASPL iterations N")
        surrogate_steps: int = Field(3, ge=0, description="DreamBooth steps per surrogate update (n)")
        pgd_steps: int = Field(6, ge=0, description="PGD steps per iteration (K)")
        pgd_batch: int = pgd_batch_field()
        save_every: int = save_every_field()
        persistent_cycling: bool = Field(False, description="continue the image index across surrogate calls "
                                                            "(released code restarts at 0) [PROP option]")
        select_rounds: int = Field(50, ge=0, description="greedy timestep-selection rounds at most (max_steps)")
        select_candidates: int = Field(5, ge=1, description="timesteps scored per selection round")
        delta_t: int = Field(20, ge=0, description="the removed timestep is clamped to [δt, T−δt]")
        window: int = Field(20, ge=1, description="half-width of the removed window (hard-coded 20 in code)")
        min_timesteps: int = Field(100, ge=1, description="selection stops at this many remaining timesteps")
        feature_weight: float = Field(1.0, ge=0, description="λ of the feature-interference term "
                                                             "(gradient-carrying [PROP]; detached under --compat)")
        feature_anchor: Literal["clean", "pgd_start"] | None = Field(
            None, description="clean branch of the feature term: clean = the original images [PROP]; pgd_start = "
                              "the images at the start of each PGD call (released code); default clean, pgd_start "
                              "under --compat")

    tiny_options: ClassVar[dict] = {"class_images": 2, "iterations": 2, "surrogate_steps": 1, "pgd_steps": 2,
                                    "select_rounds": 2, "select_candidates": 2}
    notes: ClassVar[str] = ("Clean reference set (set A) from --ref; without it the input images stand in. CAP "
                            "reports SimAC at eps 0.05 (m11). Images whose selection ends with more than "
                            "min_timesteps left keep what remains (the released code would drop them and "
                            "misalign the list) [PROP].")

    timestep_sets: list[torch.Tensor] | None = None

    # --- 1. adaptive greedy time-interval selection ------------------------------------------------
    def prepare(self, sd, x0: Groups) -> None:
        self._clean_latents = [LatentCache.encode(sd.vae, part) for part in x0.parts]
        self.timestep_sets, self._select_rounds = self.select_timesteps(sd, x0)

    def select_timesteps(self, sd, x0: Groups | torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """Per image: the timesteps left after the greedy search, on the frozen base model.

        Selection is per image; on a set of several shapes each round scores the candidates bucket by
        bucket (one draw per bucket, as one batch per shape), the images of a uniform set in one batch."""
        ctx, o = self.ctx, self.opts
        x0 = Groups.of(x0) if isinstance(x0, torch.Tensor) else x0
        gen = ctx.generator
        total = sd.noise_scheduler.config.num_train_timesteps
        with torch.no_grad():
            text = encode_prompts(sd.tokenizer, sd.text_encoder, [o.instance_prompt])
        n = len(x0)
        keep = torch.ones(n, total, dtype=torch.bool)
        scratch = x0.detach().clone()
        rounds = ctx.iters(o.select_rounds)
        done = 0
        with ctx.progress.task("simac timestep selection", rounds) as bar:
            for _ in range(rounds):
                active = [i for i in range(n) if int(keep[i].sum()) > o.min_timesteps]
                if not active:
                    break
                done += 1
                position = {i: a for a, i in enumerate(active)}
                # Per bucket: the rows of its active images and their positions in ``active``.
                pieces = [(b, [r for r, i in enumerate(idx) if i in position], [position[i] for i in idx
                                                                               if i in position])
                          for b, idx in enumerate(x0.indices)]
                pieces = [(b, rows, pos) for b, rows, pos in pieces if rows]
                cands = torch.stack([self._pick(keep[i], o.select_candidates, gen) for i in active])  # A×C
                scores = torch.zeros(len(active), cands.shape[1])
                for c in range(cands.shape[1]):
                    for b, rows, pos in pieces:
                        g = self._grad(sd, text, scratch.parts[b][rows], cands[pos, c])[1]
                        scores[pos, c] = g.abs().flatten(1).sum(1).float().cpu()
                # First occurrence on ties, as the released strict comparisons pick.
                t_min = cands.gather(1, scores.argmin(1, keepdim=True)).squeeze(1)
                t_max = cands.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
                t_min = t_min.clamp(o.delta_t, total - o.delta_t)
                for row, i in enumerate(active):
                    lo, hi = max(0, int(t_min[row]) - o.window), min(total, int(t_min[row]) + o.window)
                    keep[i, lo:hi] = False
                # Step the scratch copy along the most useful timestep (the copy is discarded afterwards).
                for b, rows, pos in pieces:
                    x, grad = self._grad(sd, text, scratch.parts[b][rows], t_max[pos])
                    scratch.parts[b][rows] = pgd_step(x, grad, x0.parts[b][rows], o.alpha_m11, o.eps_m11)
                bar.advance(1, status=f"{min(int(keep[i].sum()) for i in active)} timesteps left")
        sets = [keep[i].nonzero().flatten() for i in range(n)]
        unfinished = sum(1 for s in sets if len(s) > o.min_timesteps)
        if unfinished and ctx.compat:
            ctx.warn(f"simac: {unfinished} image(s) ended selection with more than {o.min_timesteps} timesteps; "
                     "the released code would raise an IndexError here, cloak keeps their remaining set")
        return sets, done

    @staticmethod
    def _pick(mask: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
        pool = mask.nonzero().flatten()
        return pool[torch.randint(len(pool), (k,), generator=gen)]

    def _grad(self, sd, text, x: torch.Tensor, timesteps: torch.Tensor):
        """(x, ∇ₓ L_dn(θ0, x; t)) with every image's loss its own mean, on a fresh draw."""
        x = x.detach().requires_grad_(True)
        d = Draw.sample(x.shape[0], self.latent_shape(sd, x), sd.noise_scheduler, self.ctx.generator, x.device,
                        timesteps=timesteps.to(x.device))
        latents = encode_latents_in_loss(sd.vae, x, self.ctx.dtype, posterior_noise=d.posterior_noise)
        with autocast_for(latents.device, self.ctx.dtype):
            per_image = denoising_loss(sd.unet, sd.noise_scheduler, latents, text.to(latents.dtype),
                                       self.ctx.generator, timesteps=d.timesteps, noise=d.noise, reduction="none")
        (grad,) = torch.autograd.grad(per_image.sum(), x)
        return x.detach(), grad

    # --- 2. ASPL loop with the selected timesteps and the feature term ------------------------------
    def feature_anchor(self) -> str:
        return self.opts.feature_anchor or ("pgd_start" if self.ctx.compat else "clean")

    def pgd(self, sd, unet, text_encoder, x: Groups, x0: Groups, steps: int, eps: float, alpha: float, bar=None,
            on_step=None):
        if self.opts.feature_weight and self.feature_anchor() == "pgd_start":
            # Released: the clean branch encodes the images as they enter this PGD call.
            with torch.no_grad():
                self._clean_latents = [LatentCache.encode(sd.vae, part.detach()) for part in x.parts]
        return super().pgd(sd, unet, text_encoder, x, x0, steps, eps, alpha, bar=bar, on_step=on_step)

    def draw_timesteps(self, sd, x, indices: list[int] | None = None) -> torch.Tensor | None:
        if self.timestep_sets is None:
            return None
        gen = self.ctx.generator
        sets = self.timestep_sets if indices is None else [self.timestep_sets[i] for i in indices]
        return torch.stack([s[torch.randint(len(s), (1,), generator=gen)][0] for s in sets])

    def draw(self, sd, x, indices: list[int] | None = None, pixel_shape=None):
        d = super().draw(sd, x, indices, pixel_shape)
        # The clean branch re-encodes the clean image with its own posterior sample.
        d.extra["clean_posterior_noise"] = sample_noise(d.posterior_noise.shape, self.ctx.generator, x.device)
        return d

    def loss(self, sd, unet, pixels, text, draw, rows: slice | None = None, bucket: int = 0,
             copies: int = 1) -> torch.Tensor:
        lam = self.opts.feature_weight
        if lam == 0:
            return super().loss(sd, unet, pixels, text, draw, rows, bucket, copies)
        resnets = unet.up_blocks[-1].resnets  # up_blocks[3] on SD: the 64×64-latent up-block
        with FeatureTap(resnets) as tap:
            loss = super().loss(sd, unet, pixels, text, draw, rows, bucket, copies)
        feats = tap.features()
        with torch.no_grad(), FeatureTap(resnets) as clean_tap:
            cache = self._clean_latents[bucket]  # the clean images of this shape bucket
            mean, std = (cache.mean, cache.std) if rows is None else (cache.mean[rows], cache.std[rows])
            z = (mean + std * draw.extra["clean_posterior_noise"].to(mean.dtype)) * cache.scaling
            dt = next(unet.parameters()).dtype
            with autocast_for(z.device, self.ctx.dtype):
                noisy = sd.noise_scheduler.add_noise(z, draw.noise.to(z.dtype), draw.timesteps)
                unet(noisy.to(dt), draw.timesteps, text.to(dt).expand(z.shape[0], *text.shape[1:]))
        # The clean branch does not depend on the candidate: one pass on the draw's images serves all copies.
        clean_feats = clean_tap.features()
        term = candidate_mse(feats, tile_rows(clean_feats, copies) if copies > 1 else clean_feats, copies)
        self._last_feature_loss = float(term.detach().reshape(-1)[-1])
        if self.ctx.compat:
            # [Q] released: `loss + target_loss.detach().item()` — the value joins, the gradient does not.
            return loss + lam * term.detach()
        return loss + lam * term

    def summary(self, history: list[float]) -> dict[str, Any]:
        out = super().summary(history)
        sizes = [len(s) for s in self.timestep_sets or []]
        out["timestep_selection"] = {"rounds": getattr(self, "_select_rounds", 0), "remaining": sizes,
                                     "min_timesteps": self.opts.min_timesteps}
        out["feature_term"] = {"weight": self.opts.feature_weight,
                               "gradient": not self.ctx.compat, "anchor": self.feature_anchor(),
                               "last_value": getattr(self, "_last_feature_loss", None)}
        return out

