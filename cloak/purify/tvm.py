"""Total-variation minimisation with pixel dropout (Wang et al. 2020 as used in DiffShortcut; purify.md §2).

The image is resized to 64², 2 % of its values are dropped (Bernoulli mask X), and

    Z* = argmin_Z ‖(1−X)⊙(Z−x)‖ + λ·TV₂(Z),   TV₂(Z) = Σ_i ‖Z[i+1,:]−Z[i,:]‖₂ + Σ_j ‖Z[:,j+1]−Z[:,j]‖₂

is solved exactly (to solver tolerance) with the primal-dual hybrid gradient method of Chambolle & Pock
(2011) in torch — the same convex problem the released code hands to cvxpy + MOSEK, without a commercial
solver. Both terms are norms, so each has a closed-form dual projection: onto the unit ball of the dual of
the fidelity norm, and onto λ-balls of the row/column difference groups.

[PROP] default: per-channel TV on each channel's H×W grid and a Frobenius fidelity norm. --compat: the released
form, on the H×(W·C) matrix of the channel-interleaved image ([Q] column differences then mix neighbouring
channels) with the spectral norm as fidelity ([Q] cvxpy's ``norm(matrix, 2)``).

The 64² result is brought back to the working size by two SD ×4 super-resolution steps with a middle resize
(paper: "through two SR steps with a middle resize") [PROP], or bicubic (``-o upsample=bicubic``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from cloak.io.images import to_uint8
from cloak.purify.base import PurifyMethod
from cloak.purify.diffshortcut import SROptions, resize_m11, sr_input_size


def _diff_rows(z: torch.Tensor) -> torch.Tensor:
    return z[:, 1:, :] - z[:, :-1, :]


def _diff_cols(z: torch.Tensor) -> torch.Tensor:
    return z[:, :, 1:] - z[:, :, :-1]


def _diff_rows_t(r: torch.Tensor) -> torch.Tensor:
    """Adjoint of _diff_rows: out[i] = r[i−1] − r[i] (zero outside)."""
    zero = torch.zeros_like(r[:, :1, :])
    return torch.cat([zero, r], dim=1) - torch.cat([r, zero], dim=1)


def _diff_cols_t(c: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(c[:, :, :1])
    return torch.cat([zero, c], dim=2) - torch.cat([c, zero], dim=2)


def _project_groups(v: torch.Tensor, dim: int, radius: float) -> torch.Tensor:
    """Project every vector along ``dim`` onto the ℓ2 ball of ``radius``."""
    norm = v.norm(dim=dim, keepdim=True)
    return v * (radius / norm.clamp_min(radius))


def _project_simplex_ball(s: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Project non-negative values onto {s ≥ 0, Σs ≤ radius} (sorting method)."""
    if float(s.sum()) <= radius:
        return s
    u, _ = torch.sort(s, descending=True)
    css = torch.cumsum(u, 0) - radius
    idx = torch.arange(1, len(u) + 1, dtype=s.dtype, device=s.device)
    rho = int(torch.nonzero(u - css / idx > 0).max())
    theta = css[rho] / (rho + 1)
    return (s - theta).clamp_min(0)


def _project_dual_fidelity(p: torch.Tensor, spectral: bool) -> torch.Tensor:
    """Projection onto the unit ball of the fidelity norm's dual: Frobenius → Frobenius, spectral → nuclear."""
    if not spectral:
        return p / p.norm().clamp_min(1.0)
    u, s, vh = torch.linalg.svd(p[0], full_matrices=False)
    return ((u * _project_simplex_ball(s)) @ vh)[None]


def tv_objective(z: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, lam: float, spectral: bool) -> float:
    fid = keep * (z - x)
    fidelity = torch.linalg.matrix_norm(fid[0], ord=2) if spectral else fid.norm()
    tv = _diff_rows(z).norm(dim=2).sum() + _diff_cols(z).norm(dim=1).sum()
    return float(fidelity + lam * tv)


def solve_tv(x: torch.Tensor, keep: torch.Tensor, lam: float, iterations: int, *, spectral: bool = False,
             progress=None) -> torch.Tensor:
    """min_Z ‖keep⊙(Z−x)‖ + λ·TV₂(Z) over a batch of matrices (B×H×W, one problem) by PDHG.

    Row-difference vectors are grouped over the last dim, column-difference vectors over the middle dim.
    Step sizes τ = σ = 0.99/3 satisfy τσ‖K‖² < 1 (‖K‖² ≤ 1 + 4 + 4 for the mask and the two differences).
    """
    # The problem is small (64×192): intra-op threads only add synchronisation, and LAPACK's SVD of such a
    # matrix runs ~50× slower with two threads on a busy CPU than with one. Restored on exit.
    threads = torch.get_num_threads()
    if x.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _pdhg(x, keep, lam, iterations, spectral, progress)
    finally:
        torch.set_num_threads(threads)


def _pdhg(x, keep, lam, iterations, spectral, progress):
    tau = sigma = 0.99 / 3.0
    z = x.clone()
    z_bar = z.clone()
    p = torch.zeros_like(x)  # dual of the fidelity term
    q_r = torch.zeros_like(_diff_rows(x))  # duals of the TV groups
    q_c = torch.zeros_like(_diff_cols(x))
    kx = keep * x
    for i in range(iterations):
        p = _project_dual_fidelity(p + sigma * (keep * z_bar - kx), spectral)
        q_r = _project_groups(q_r + sigma * _diff_rows(z_bar), dim=2, radius=lam)
        q_c = _project_groups(q_c + sigma * _diff_cols(z_bar), dim=1, radius=lam)
        z_new = z - tau * (keep * p + _diff_rows_t(q_r) + _diff_cols_t(q_c))
        z_bar = 2 * z_new - z
        z = z_new
        if progress is not None:
            progress(i + 1)
    return z


class TVM(PurifyMethod):
    paper = "Wang et al. 2020 TV minimisation as a purifier; DiffShortcut App. C.1 (TVM baseline)"
    implements = ("resize to 64², drop 2 % of values (Bernoulli), min ‖(1−X)⊙(Z−x)‖ + 0.01·TV₂(Z) solved exactly "
                  "by PDHG in torch (released: cvxpy + MOSEK), then 64→256 SD×4, resize to ¼, SD×4 [PROP]")
    proposals: ClassVar[tuple[str, ...]] = ("layout", "solver_iterations", "upsample", "prompt")
    notes: ClassVar[str] = ("[Q] the released code keeps the 64² result; cloak returns the input size, so under "
                            "--compat the result is upsampled too (bicubic unless -o upsample=sr is given).")
    uses_models: ClassVar[bool] = True

    class Options(SROptions):
        size: int = Field(64, ge=4, description="side of the square the problem is solved at")
        drop: float = Field(0.02, ge=0, lt=1, description="probability of dropping each pixel value (mask X)")
        tv_weight: float = Field(0.01, ge=0, description="λ, weight of the TV term (pixels in [0,1])")
        layout: Literal["channels", "interleaved"] | None = Field(
            None, description="channels: TV per channel on H×W and Frobenius fidelity [PROP]; interleaved: the "
                              "released H×(W·C) matrix with spectral-norm fidelity [Q] (default under --compat)")
        solver_iterations: int = Field(1000, ge=1, description="PDHG iterations (scaled by --effort) [PROP]")
        upsample: Literal["sr", "bicubic"] | None = Field(
            None, description="back to the input size: two SD ×4 steps with a middle resize [PROP], or bicubic "
                              "(default under --compat)")
        prompt: str = Field("A photo of a person", description="upscaler prompt (not given by the paper) [PROP]")

    tiny_options: ClassVar[dict] = {"size": 16, "sr_steps": 2}

    @property
    def spectral(self) -> bool:
        layout = self.opts.layout or ("interleaved" if self.ctx.compat else "channels")
        return layout == "interleaved"

    @property
    def upsample(self) -> str:
        return self.opts.upsample or ("bicubic" if self.ctx.compat else "sr")

    def prepare(self) -> None:
        from cloak.models.restoration import upscaler

        self.pipe = upscaler(self.ctx.models) if self.upsample == "sr" else None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        o, ctx = self.opts, self.ctx
        h, w = image.shape[-2:]
        # The released code: PIL resize with ANTIALIAS (= LANCZOS) of the 8-bit image, values in [0, 1].
        small = Image.fromarray(to_uint8(image[0].float())).resize((o.size, o.size), Image.LANCZOS)
        x = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)  # H×W×C
        dropped = torch.rand(x.shape, generator=ctx.generator) < o.drop
        keep = (~dropped).float()
        if self.spectral:
            # The released matrix: H × (W·C), channels interleaved along each row.
            xm, km = x.reshape(1, o.size, -1), keep.reshape(1, o.size, -1)
        else:
            xm, km = x.permute(2, 0, 1).contiguous(), keep.permute(2, 0, 1).contiguous()
        xm, km = xm.double(), km.double()
        iterations = ctx.iters(o.solver_iterations)
        with ctx.progress.task("tvm", iterations) as bar:
            z = solve_tv(xm, km, o.tv_weight, iterations, spectral=self.spectral, progress=lambda i: bar.advance(1))
        self.record = {"tv_objective_input": round(tv_objective(xm, xm, km, o.tv_weight, self.spectral), 6),
                       "tv_objective": round(tv_objective(z, xm, km, o.tv_weight, self.spectral), 6),
                       "dropped_fraction": round(float(dropped.float().mean()), 5)}
        z = z.reshape(o.size, o.size, 3) if self.spectral else z.permute(1, 2, 0)
        y = (z.float().clamp(0, 1) * 2 - 1).permute(2, 0, 1).unsqueeze(0)
        if self.pipe is None:
            return resize_m11(y, w, h)
        return resize_m11(self._sr_twice(y, w, h), w, h)

    def _sr_twice(self, y: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """64 → 256 (SR) → resize to ¼ of the working size → ×4 (SR): 64→256→128→512 for 512² images."""
        from cloak.models.restoration import upscale4

        o = self.opts
        kw = dict(steps=self.ctx.iters(o.sr_steps), guidance=o.sr_guidance, noise_level=o.sr_noise_level,
                  generator=self.ctx.generator)
        first = upscale4(self.pipe, Image.fromarray(to_uint8(y[0])), o.prompt, **kw)
        lw, lh = sr_input_size(w, h)
        middle = Image.fromarray(to_uint8(resize_m11(first, lw, lh)[0]))
        return upscale4(self.pipe, middle, o.prompt, **kw)
