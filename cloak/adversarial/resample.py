"""Differentiable resampling with a deterministic gradient on CUDA.

CUDA's backward of an antialiased (or bilinear/bicubic) ``F.interpolate`` and of ``F.grid_sample`` scatters
each output pixel's gradient into its input pixels with atomic adds: the order of the additions changes from
run to run, so the same seed gave different protected bytes on a GPU (seen on an H200 for DLADiff's identity
layer; ``torch.use_deterministic_algorithms(True)`` names ``upsample_bicubic2d_aa_backward_out_cuda``).

Both resamplings used in gradient paths here are linear in the image with weights fixed by the clean image
(the crop boxes and face alignments are taken on the clean photo), so the gradient is the transpose of a
fixed matrix. On CUDA it is computed as a gather with a fixed summation order; on the CPU torch's own
backward is kept (it is deterministic there, and keeps every pinned CPU digest as it was). The forward is
torch's own op on every device, so the forward bytes do not change anywhere.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def _use_adjoint(x: torch.Tensor, deterministic: bool | None) -> bool:
    if deterministic is not None:
        return deterministic and x.requires_grad
    return x.requires_grad and x.device.type != "cpu"


class _FixedLinear(torch.autograd.Function):
    """y = forward(x) for a linear map with fixed weights; the gradient is ``adjoint(grad_y)``."""

    @staticmethod
    def forward(ctx, x, forward, adjoint):
        ctx.adjoint = adjoint
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.adjoint(grad), None, None


# --- resize: separable, so the map is A_h · x · A_wᵀ ---------------------------------------------------------

@lru_cache(maxsize=64)
def _axis_matrix(n_in: int, n_out: int, mode: str, antialias: bool) -> torch.Tensor:
    """The n_out × n_in matrix torch's 1-D resize applies along one axis (read off unit vectors, float64)."""
    unit = torch.eye(n_in, dtype=torch.float64).reshape(1, 1, n_in, n_in)  # column j: e_j along the height
    return F.interpolate(unit, size=(n_out, n_in), mode=mode, align_corners=False, antialias=antialias)[0, 0]


def resize(img: torch.Tensor, size: tuple[int, int], mode: str = "bicubic", antialias: bool = True,
           deterministic: bool | None = None) -> torch.Tensor:
    """``F.interpolate(img, size, mode, align_corners=False, antialias)`` for an N×C×h×w batch, with the gradient
    taken as ``A_hᵀ · g · A_w`` on CUDA (``deterministic=None``; True/False force it either way)."""

    def forward(x):
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)

    if not _use_adjoint(img, deterministic):
        return forward(img)
    (h, w), (oh, ow) = img.shape[-2:], size
    a_h = _axis_matrix(h, oh, mode, antialias).to(img.device, img.dtype)
    a_w = _axis_matrix(w, ow, mode, antialias).to(img.device, img.dtype)

    def adjoint(grad):
        return a_h.T @ grad.to(img.dtype) @ a_w

    return _FixedLinear.apply(img, forward, adjoint)


# --- grid_sample (bilinear, zeros outside, align_corners=True): a sparse map, adjoint by gather ----------------

def _bilinear_taps(grid: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output pixel, the flat input indices of its 4 neighbours and their bilinear weights (0 outside the
    image), as ``grid_sample(..., align_corners=True, padding_mode="zeros")`` takes them. grid: Ho×Wo×2."""
    g = grid.detach().to("cpu", torch.float64).reshape(-1, 2)
    x = (g[:, 0] + 1) / 2 * (w - 1)
    y = (g[:, 1] + 1) / 2 * (h - 1)
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    index, weight = [], []
    for dy, dx, wt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        index.append(torch.where(inside, yi * w + xi, 0).long())
        weight.append(torch.where(inside, wt, 0.0))
    return torch.stack(index, 1), torch.stack(weight, 1)  # (Ho·Wo)×4 each


def _gather_adjoint(index: torch.Tensor, weight: torch.Tensor):
    """The transpose of y[p] = Σ_k weight[p,k]·x[index[p,k]] as a gather: for each input pixel that some output
    reads, its (output, weight) pairs in a fixed order, padded to the largest count with a zero weight."""
    keep = weight.reshape(-1) != 0
    src = index.reshape(-1)[keep]
    out = torch.arange(index.shape[0]).repeat_interleave(index.shape[1])[keep]
    wts = weight.reshape(-1)[keep]
    order = torch.argsort(src * index.shape[0] + out)  # by input pixel, then output pixel: one fixed order
    src, out, wts = src[order], out[order], wts[order]
    pixels, counts = torch.unique_consecutive(src, return_counts=True)
    width = int(counts.max()) if counts.numel() else 1
    slot = torch.arange(src.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    row = torch.repeat_interleave(torch.arange(pixels.numel()), counts)
    reads = torch.full((pixels.numel(), width), index.shape[0], dtype=torch.long)  # padding reads a zero column
    scale = torch.zeros(pixels.numel(), width, dtype=torch.float64)
    reads[row, slot] = out
    scale[row, slot] = wts
    return pixels, reads, scale


def grid_sample(img: torch.Tensor, grid: torch.Tensor, deterministic: bool | None = None) -> torch.Tensor:
    """``F.grid_sample(img, grid, "bilinear", "zeros", align_corners=True)`` for one 1×C×h×w image and a fixed
    1×Ho×Wo×2 grid, with the gradient taken as a gather on CUDA (``deterministic=None``)."""
    grid = grid.to(img.device, img.dtype)

    def forward(x):
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    if not _use_adjoint(img, deterministic):
        return forward(img)
    (c, h, w), (oh, ow) = img.shape[-3:], grid.shape[1:3]
    pixels, reads, scale = _gather_adjoint(*_bilinear_taps(grid[0], h, w))
    pixels, reads, scale = pixels.to(img.device), reads.to(img.device), scale.to(img.device, img.dtype)

    def adjoint(grad):
        grad = grad.to(img.dtype)
        flat = torch.cat([grad.reshape(c, oh * ow), grad.new_zeros(c, 1)], 1)  # the padding column
        out = grad.new_zeros(c, h * w)
        out[:, pixels] = (flat[:, reads] * scale).sum(-1)  # each input pixel written once: no atomics
        return out.reshape(1, c, h, w)

    return _FixedLinear.apply(img, forward, adjoint)


__all__ = ["grid_sample", "resize"]
