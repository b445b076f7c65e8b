"""Projected gradient steps in [-1, 1] pixel space (protect.md §0)."""

from __future__ import annotations

import torch


def project(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip ``x`` into the ℓ∞ ball of radius ``eps`` around ``x0`` and into [-1, 1]."""
    return (x0 + (x - x0).clamp(-eps, eps)).clamp(-1.0, 1.0)


@torch.no_grad()
def pgd_step(
    x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, alpha: float, eps: float, *, ascent: bool = True
) -> torch.Tensor:
    """``x ← clip(x0 + clip(x ± α·sign(g) − x0, ±ε), −1, 1)``; ascent raises the loss."""
    step = alpha * grad.sign()
    return project(x + step if ascent else x - step, x0, eps)


def random_start(x0: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform random start in the ε-ball (drawn on the CPU generator, so every device agrees)."""
    noise = torch.rand(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    return project(x0 + (noise * 2 - 1) * eps, x0, eps)


def quantize_within_budget(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """8-bit levels of ``x`` that stay within ``eps`` of ``x0`` after rounding.

    Rounding ``(x+1)·127.5`` can step half a level past the budget; clamping the level difference to
    ``floor(eps·127.5)`` keeps ‖δ‖∞ ≤ ε for the saved PNG. Returns a uint8 B×3×H×W tensor.
    """
    q0 = ((x0.detach().float().cpu() + 1) * 127.5).round()
    q = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    levels = float(int(eps * 127.5 + 1e-6))
    q = torch.minimum(torch.maximum(q, q0 - levels), q0 + levels)
    return q.clamp(0, 255).to(torch.uint8)
