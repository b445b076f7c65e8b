"""Bring a perturbation found on a working copy back to the photo's own size, within the budget.

The method perturbs a working copy (short side at the model's resolution, padded to the latent grid, or
squashed to a square). The output is the photo itself plus the perturbation: δ_work = x_adv − x_work,
the padding dropped, δ resampled to the photo's pixel size, clipped to ±ε there, added to the photo as
read from disk, and rounded to 8 bits within ε (:func:`cloak.adversarial.quantize_within_budget`).
Everything at native size happens on the CPU, in row strips for the add-and-round, so a 24-megapixel
photo never reaches the accelerator and holds one float copy of δ plus two 8-bit images in memory.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cloak.adversarial import quantize_within_budget
from cloak.io.images import Placement

RESAMPLING = ("bicubic (torch.nn.functional.interpolate, align_corners=False; antialiased only where the photo "
              "is smaller than its working copy)")
STRIP_ROWS = 512  # rows per add-and-round strip: bounds the float temporaries at native size


def native_delta(delta_work: torch.Tensor, placement: Placement) -> torch.Tensor:
    """δ on the working copy (3×h×w) → δ on the photo (3×H×W, float32, CPU): padding dropped, resampled."""
    left, top, _, _ = placement.pad
    cw, ch = placement.content
    d = delta_work.detach().float().cpu()[:, top:top + ch, left:left + cw]
    nw, nh = placement.native
    if (cw, ch) == (nw, nh):
        return d.contiguous()
    shrink = nw < cw or nh < ch  # upsampling needs no antialias; shrinking a δ without it would alias
    return F.interpolate(d[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=shrink)[0]


def levels(x: torch.Tensor) -> torch.Tensor:
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def apply_native(adv_work: torch.Tensor, clean_work: torch.Tensor, placement: Placement, photo: np.ndarray,
                 eps_m11: float | None) -> np.ndarray:
    """The protected photo (uint8 H×W×3) from a method's working-copy result and the photo's 8-bit pixels."""
    delta = native_delta(adv_work.detach().float().cpu() - clean_work.detach().float().cpu(), placement)
    if eps_m11 is not None:
        delta.clamp_(-eps_m11, eps_m11)  # bicubic overshoots; the budget holds at native size
    h = photo.shape[0]
    if delta.shape[-2:] != photo.shape[:2]:
        raise ValueError(f"perturbation {tuple(delta.shape[-2:])} does not match the photo {photo.shape[:2]}")
    out = np.empty_like(photo)
    for y in range(0, h, STRIP_ROWS):
        x0 = torch.from_numpy(photo[y:y + STRIP_ROWS].copy()).permute(2, 0, 1).float()
        x0 = x0.div_(127.5).sub_(1.0)
        x = x0 + delta[:, y:y + STRIP_ROWS]
        q = quantize_within_budget(x[None], x0[None], eps_m11)[0] if eps_m11 is not None else levels(x)
        out[y:y + STRIP_ROWS] = q.permute(1, 2, 0).numpy()
    return out


def figures(written: np.ndarray, reference: np.ndarray) -> dict:
    """‖δ‖∞ in 8-bit levels and PSNR (dB, None when identical) of a written image against its reference.

    Summed in strips of rows, so a large photo needs no full-size float copy of the difference.
    """
    linf, squares = 0, 0
    for y in range(0, written.shape[0], STRIP_ROWS):
        diff = written[y:y + STRIP_ROWS].astype(np.int32) - reference[y:y + STRIP_ROWS].astype(np.int32)
        if diff.size:
            linf = max(linf, int(np.abs(diff).max()))
            squares += int(np.square(diff).sum(dtype=np.int64))
    mse = squares / max(1, written.size) / 255.0**2
    return {"linf_255": float(linf), "psnr": round(10 * float(np.log10(1.0 / mse)), 3) if mse > 0 else None}
