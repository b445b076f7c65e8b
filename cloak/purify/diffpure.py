"""Pixel-space diffusion purifiers on OpenAI's guided-diffusion 256² unconditional ImageNet model.

* ``diffpure`` (Nie et al. ICML'22; purify.md §3): SDEdit — diffuse to t*, ancestral sampling back to 0.
* ``ddspure`` (Carlini et al. 2022, denoised smoothing; §5): t* from the noise level, ᾱ_t* = 1/(1+σ²).
* ``gridpure`` (Zhao et al. 2312.00084; §6): iterative small-step DiffPure on overlapping 256² tiles,
  averaged, blended with the previous iterate.

``--effort`` scales the number of sampling steps, not the noise level: the 1000-step process is respaced
to ``effort·1000`` steps (guided-diffusion's ``timestep_respacing``, which keeps ᾱ at the kept steps) and t*
is the kept step whose ᾱ is nearest the target. At effort 1 the run is exactly the specified one.

``--compat`` reproduces DiffShortcut's released runs (``defenses/pdiffp.py``, ``ddspure.py``, ``gridpure.py``)
for every option left at its default: [Q] images enter the model in [0,1] instead of [-1,1], a 250-step
respacing, and the wrapper's indexing (noise at step t, ``p_sample`` from t down to 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from cloak.methods import MethodOptions
from cloak.purify.base import PurifyMethod

T_TOTAL = 1000


@dataclass
class Plan:
    """One SDEdit pass on a (respaced) process: noise at step index ``k``, then sample back."""

    diffusion: object  # GaussianDiffusion
    k: int  # 0-based index into the respaced process
    released_indexing: bool  # DiffShortcut wrapper: q_sample at k, p_sample k..1 (else DiffPure: k..0)

    @property
    def timestep(self) -> int:
        """The original (1000-step) timestep whose noise level is used."""
        return int(self.diffusion.timestep_map[self.k])

    @property
    def steps(self) -> int:
        return self.k if self.released_indexing else self.k + 1


class PixelDiffusionPurifier(PurifyMethod):
    """Shared machinery: the model, schedules, resizing and one SDEdit pass."""

    uses_models: ClassVar[bool] = True
    # DiffShortcut's released values, used under --compat for options left at their defaults.
    compat_values: ClassVar[dict] = {}

    def prepare(self) -> None:
        from cloak.models.guided import guided_unet

        self.unet = guided_unet(self.ctx.models)
        self.size = int(self.unet.image_size)
        self._diffusions: dict[int, object] = {}

    def opt(self, name: str):
        """An option's value; under --compat, DiffShortcut's value for options not set by the user."""
        if self.ctx.compat and name in self.compat_values and name not in self.opts.model_fields_set:
            return self.compat_values[name]
        return getattr(self.opts, name)

    @property
    def unit_input(self) -> bool:
        """[Q] DiffShortcut's wrapper feeds [0,1] images to a model trained on [-1,1]."""
        return self.ctx.compat

    def diffusion(self, steps: int):
        from cloak.models.archs.guided_diffusion import GaussianDiffusion, space_timesteps

        if steps not in self._diffusions:
            self._diffusions[steps] = GaussianDiffusion() if steps >= T_TOTAL else \
                GaussianDiffusion(use_timesteps=space_timesteps(T_TOTAL, str(steps)))
        return self._diffusions[steps]

    def plan(self, abar: float, base_steps: int) -> Plan:
        """The pass whose noise level is nearest ᾱ = ``abar``, on ``effort·base_steps`` sampling steps."""
        diffusion = self.diffusion(self.ctx.iters(base_steps))
        k = int((diffusion.alphas_cumprod - abar).abs().argmin())
        return Plan(diffusion, k, released_indexing=self.ctx.compat)

    def plan_t(self, t: int, base_steps: int) -> Plan:
        """The pass DiffPure calls "t steps" on a ``base_steps`` process (ᾱ of step index t−1; t under compat)."""
        table = self.diffusion(base_steps).alphas_cumprod
        index = min(t, base_steps - 1) if self.ctx.compat else max(t - 1, 0)
        return self.plan(float(table[index]), base_steps)

    def sdedit(self, x: torch.Tensor, plan: Plan, progress=None) -> torch.Tensor:
        """One purification pass of a batch of model-sized images in [-1,1]."""
        model_dtype = next(self.unet.parameters()).dtype
        h = (x + 1) / 2 if self.unit_input else x
        h = h.to(self.ctx.device, model_dtype)
        d, gen = plan.diffusion, self.ctx.generator
        if plan.released_indexing:
            h = d.q_sample(h, plan.k, generator=gen)
            for i, t in enumerate(range(plan.k, 0, -1), start=1):
                h = d.p_sample(self.unet, h, t, generator=gen, clip_denoised=True)
                if progress:
                    progress(i, plan.k)
        else:
            h = d.sdedit(self.unet, h, plan.k + 1, gen, clip_denoised=True, progress=progress)
        h = h.float()
        return h * 2 - 1 if self.unit_input else h

    def resized_pass(self, x: torch.Tensor, plan: Plan, name: str) -> torch.Tensor:
        """The whole image resized to the model's size, one pass, resized back."""
        with self.ctx.progress.task(name, plan.steps) as bar:
            y = self.sdedit(self.resize(x, self.size, self.size), plan, progress=lambda done, total: bar.advance(1))
        return self.resize(y, *x.shape[-2:])

    @staticmethod
    def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if x.shape[-2:] == (height, width):
            return x
        return F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------ DiffPure


class DiffPure(PixelDiffusionPurifier):
    paper = "Nie et al., Diffusion Models for Adversarial Purification (DiffPure), ICML 2022"
    implements = ("SDEdit with guided-diffusion 256x256_diffusion_uncond: noise to t*, ancestral p_sample to 0 with "
                  "clip_denoised, image resized to 256² and back [PROP]; --compat: DiffShortcut pdiffp.py (9 tiles "
                  "256²/stride 128, t=100 of 250 respaced steps, [0,1] input)")
    proposals: ClassVar[tuple[str, ...]] = ("t", "tiles")
    compat_values: ClassVar[dict] = {"t": 100, "respacing": 250, "tiles": True}

    class Options(MethodOptions):
        t: int = Field(100, ge=0, le=T_TOTAL, description="diffusion steps t* on the (respaced) process [PROP]")
        respacing: int = Field(T_TOTAL, ge=1, le=T_TOTAL, description="steps of the process t counts on")
        tiles: bool = Field(False, description="purify 256² tiles (stride 128, averaged) at full size instead of "
                                               "the whole image resized to 256² [PROP: false]")

    tiny_options: ClassVar[dict] = {"t": 20}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        plan = self.plan_t(self.opt("t"), self.opt("respacing"))
        x = image.float()
        if self.opt("tiles"):
            y = tile_pass(self, x, plan, corner=False)
        else:
            y = self.resized_pass(x, plan, "diffpure")
        self.record = {"t_star": plan.timestep, "sampling_steps": plan.steps}
        return y


# ------------------------------------------------------------------------------------------------ DDSPure


class DDSPure(PixelDiffusionPurifier):
    paper = "Carlini et al., (Certified!!) Adversarial Robustness for Free!, 2022 (diffusion denoised smoothing)"
    implements = ("one SDEdit pass at t* with ᾱ_t* = 1/(1+σ²) (nearest step of the 1000-step linear schedule), "
                  "σ = 2r/255 [PROP], 256² and back; --compat: DiffShortcut ddspure.py (σ = r/255 [Q], t* applied "
                  "to a 250-step respacing [Q], [0,1] input [Q])")
    proposals: ClassVar[tuple[str, ...]] = ("sigma",)

    class Options(MethodOptions):
        radius: float = Field(11.0, gt=0, description="perturbation radius r in 0–255 units")
        sigma: float | None = Field(None, gt=0, description="noise std in [-1,1] units; default 2r/255 [PROP]")

    tiny_options: ClassVar[dict] = {}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        o = self.opts
        if self.ctx.compat and o.sigma is None:
            # [Q] ddspure.py: σ = r/255 (a [0,1]-units std for a [-1,1] model) and t* taken from the 1000-step
            # table but used as an index into its 250-step respaced diffusion.
            sigma = o.radius / 255
            t_star = nearest_t(self.diffusion(T_TOTAL).alphas_cumprod, 1 / (1 + sigma**2))
            table = self.diffusion(250).alphas_cumprod
            plan = self.plan(float(table[min(t_star, 249)]), 250)
        else:
            sigma = o.sigma if o.sigma is not None else 2 * o.radius / 255
            plan = self.plan(1 / (1 + sigma**2), T_TOTAL)
        x = image.float()
        y = self.resized_pass(x, plan, "ddspure")
        self.record = {"sigma": round(sigma, 6), "t_star": plan.timestep, "sampling_steps": plan.steps}
        return y


def nearest_t(alphas_cumprod: torch.Tensor, abar: float) -> int:
    """ddspure.py's get_opt_t: the 1-based t whose ᾱ is nearest, clipped to [1, T]."""
    table = alphas_cumprod
    if abar > float(table[0]):
        return 1
    if abar <= float(table[-1]):
        return len(table)
    return int((table - abar).abs().argmin()) + 1


# ------------------------------------------------------------------------------------------------ GrIDPure


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """{0, stride, …, length−tile} ∪ {length−tile}: GrIDPure's window corners along one axis."""
    starts = list(range(0, length - tile + 1, stride))
    if length - tile not in starts:
        starts.append(length - tile)
    return starts


def tile_pass(method: PixelDiffusionPurifier, x: torch.Tensor, plan: Plan, *, corner: bool,
              progress=None) -> torch.Tensor:
    """Purify model-sized overlapping tiles (stride half a tile) in one batch and average the overlaps.

    With ``corner``, one extra tile made of the four corner quarter-tiles is purified too and its quarters
    are averaged back into the corners (the official GrIDPure code). Images smaller than a tile are enlarged
    first and shrunk back after.
    """
    x = x.float().cpu()  # tiles are cut and merged on the CPU; only sdedit runs on the device
    h0, w0 = x.shape[-2:]
    tile = method.size
    if min(h0, w0) < tile:
        f = tile / min(h0, w0)
        x = method.resize(x, max(tile, round(h0 * f)), max(tile, round(w0 * f)))
    h, w = x.shape[-2:]
    stride, half = tile // 2, tile // 2
    boxes = [(top, left) for top in tile_starts(h, tile, stride) for left in tile_starts(w, tile, stride)]
    batch = [x[0, :, top:top + tile, left:left + tile] for top, left in boxes]
    corners = [(0, 0), (0, w - half), (h - half, 0), (h - half, w - half)]
    if corner:
        quarters = [x[0, :, top:top + half, left:left + half] for top, left in corners]
        batch.append(torch.cat([torch.cat(quarters[:2], dim=2), torch.cat(quarters[2:], dim=2)], dim=1))
    out = method.sdedit(torch.stack(batch), plan, progress).cpu()
    total = torch.zeros_like(x[0])
    weight = torch.zeros_like(x[0])
    for (top, left), y in zip(boxes, out):
        total[:, top:top + tile, left:left + tile] += y
        weight[:, top:top + tile, left:left + tile] += 1
    if corner:
        y = out[-1]
        for (top, left), (qt, ql) in zip(corners, [(0, 0), (0, half), (half, 0), (half, half)]):
            total[:, top:top + half, left:left + half] += y[:, qt:qt + half, ql:ql + half]
            weight[:, top:top + half, left:left + half] += 1
    merged = (total / weight).unsqueeze(0)
    return method.resize(merged, h0, w0)


class GrIDPure(PixelDiffusionPurifier):
    paper = "Zhao et al., Can Protective Perturbation Safeguard Personal Data from Being Exploited by Stable " \
            "Diffusion? (GrIDPure), CVPR 2024, arXiv 2312.00084; DiffShortcut Alg. 2"
    implements = ("N iterations of: 256² tiles (stride 128) + corner tile, each DiffPure(t), averaged, then "
                  "x ← (1−γ)·x̃ + γ·x, as ZhengyueZhao/GrIDPure gridpure.py (t=10/1000, N=20, γ=0.1); "
                  "--compat: DiffShortcut gridpure.py (t=10 of 250 steps, N=10, no corner tile, [0,1] input)")
    notes: ClassVar[str] = ("The official code round-trips each iterate through 8-bit PIL images; cloak keeps "
                            "floats between iterations.")
    compat_values: ClassVar[dict] = {"t": 10, "respacing": 250, "iterations": 10, "corner_tile": False}

    class Options(MethodOptions):
        t: int = Field(10, ge=0, le=T_TOTAL, description="DiffPure steps per tile on the (respaced) process")
        respacing: int = Field(T_TOTAL, ge=1, le=T_TOTAL, description="steps of the process t counts on")
        iterations: int = Field(20, ge=1, description="purification iterations N (scaled by --effort)")
        gamma: float = Field(0.1, ge=0, le=1, description="weight of the previous iterate in the moving average")
        corner_tile: bool = Field(True, description="also purify the tile made of the four corners (official code)")

    tiny_options: ClassVar[dict] = {"iterations": 2}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        plan = self.plan_t(self.opt("t"), self.opt("respacing"))
        gamma = self.opts.gamma
        iterations = self.ctx.iters(self.opt("iterations"))
        x = image.float().cpu()
        with self.ctx.progress.task("gridpure", iterations) as bar:
            for _ in range(iterations):
                purified = tile_pass(self, x, plan, corner=self.opt("corner_tile"))
                x = ((1 - gamma) * purified + gamma * x).clamp(-1, 1)
                bar.advance(1)
        self.record = {"t_star": plan.timestep, "sampling_steps": plan.steps, "iterations": iterations}
        return x
