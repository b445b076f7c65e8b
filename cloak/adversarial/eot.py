"""Differentiable transforms for Expectation over Transformation (EoT).

A perturbation optimised through random transforms survives them when an attacker applies them
(MetaCloak, protect.md §7: resize → centre-crop → Gaussian blur with random σ → random horizontal
flip). Every transform here is built from differentiable tensor ops, so ∇ₓ flows through it.

Randomness is split from application: ``Compose.sample(n, generator)`` draws the parameters of one
realisation from the explicit CPU generator, ``Compose.apply(x, params)`` applies them. A PGD step
can therefore evaluate its loss several times on the same realisation (as it does with a fixed
diffusion draw), and a seed gives the same transforms on every device.

Defaults follow torchvision (σ ~ U(0.1, 2.0), reflect padding, kernel weights exp(−x²/2σ²)
normalised); torchvision draws one σ and one flip decision per call on a batched tensor, which
``per_image=False`` reproduces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


def gaussian_kernel1d(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Normalised 1-D Gaussian weights, one row per σ (``sigma``: shape (n,)) → (n, kernel_size)."""
    half = (kernel_size - 1) * 0.5
    grid = torch.linspace(-half, half, kernel_size, dtype=torch.float32, device=sigma.device)
    pdf = torch.exp(-0.5 * (grid[None, :] / sigma[:, None].float()) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float | torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (torchvision's ``gaussian_blur``), differentiable.

    ``sigma``: a float for the whole batch or a tensor of shape (B,) with one σ per image.
    """
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if kernel_size == 1:
        return x
    b, c, h, w = x.shape
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    if sig.numel() == 1:
        sig = sig.expand(b)
    k = gaussian_kernel1d(kernel_size, sig).to(x.dtype)  # (B, K)
    pad = kernel_size // 2
    # One group per (image, channel): images with different σ blur in one conv call.
    weight = k.repeat_interleave(c, dim=0)  # (B·C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weight[:, None, None, :], groups=b * c)
    y = F.conv2d(y, weight[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def hflip(x: torch.Tensor, mask: torch.Tensor | bool) -> torch.Tensor:
    """Mirror the images where ``mask`` is true (a bool, or a bool tensor of shape (B,))."""
    if isinstance(mask, bool):
        return x.flip(-1) if mask else x
    mask = mask.to(x.device).reshape(-1, 1, 1, 1)
    return torch.where(mask, x.flip(-1), x)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (bilinear, antialiased when shrinking) and centre-crop a square.

    The identity when ``x`` is already ``size``×``size`` (as torchvision's resize returns its input).
    """
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box (top, left, height, width) of each image (``boxes``: B×4, fractions of H and W) and
    resize it back to ``size``×``size``, bilinear, through a differentiable sampling grid."""
    b = x.shape[0]
    boxes = boxes.to(x.device, torch.float32)
    top, left, bh, bw = boxes.unbind(1)
    # affine_grid maps output [-1,1] to input [-1,1]: scale by the box size, shift to the box centre.
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = bw
    theta[:, 0, 2] = 2 * left + bw - 1
    theta[:, 1, 1] = bh
    theta[:, 1, 2] = 2 * top + bh - 1
    grid = F.affine_grid(theta, (b, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


# --- random transforms: parameters drawn from an explicit generator, applied separately ----------


@dataclass
class GaussianBlur:
    """Blur with σ ~ U(sigma) (torchvision ``GaussianBlur`` defaults: σ ∈ [0.1, 2.0])."""

    kernel_size: int = 7
    sigma: tuple[float, float] = (0.1, 2.0)
    per_image: bool = False

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        lo, hi = self.sigma
        u = torch.rand(n if self.per_image else 1, generator=generator, dtype=torch.float32)
        return lo + (hi - lo) * u

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(x, self.kernel_size, params)


@dataclass
class RandomHFlip:
    """Mirror with probability ``p``."""

    p: float = 0.5
    per_image: bool = False

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(n if self.per_image else 1, generator=generator, dtype=torch.float32) < self.p

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if params.numel() == 1:
            return hflip(x, bool(params.item()))
        return hflip(x, params)


@dataclass
class ResizeCrop:
    """Deterministic resize of the short side to ``size`` and centre crop (no parameters)."""

    size: int

    def sample(self, n: int, generator: torch.Generator) -> None:
        return None

    def apply(self, x: torch.Tensor, params: Any) -> torch.Tensor:
        return resize_center_crop(x, self.size)


@dataclass
class RandomResizedCrop:
    """A random crop of area fraction ~ U(scale) and aspect ~ log-U(ratio), resized to ``size``."""

    size: int
    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    per_image: bool = True

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        m = n if self.per_image else 1
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(m, generator=generator)
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * torch.rand(
            m, generator=generator)
        aspect = torch.exp(log_r)
        bw = torch.sqrt(area * aspect).clamp(max=1.0)
        bh = torch.sqrt(area / aspect).clamp(max=1.0)
        top = (1 - bh) * torch.rand(m, generator=generator)
        left = (1 - bw) * torch.rand(m, generator=generator)
        boxes = torch.stack([top, left, bh, bw], dim=1)
        return boxes.expand(n, 4) if m == 1 else boxes

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return crop_resize(x, params, self.size)


@dataclass
class Compose:
    """A transform pipeline applied in order; ``sample`` draws one realisation of every step."""

    steps: list = field(default_factory=list)

    def sample(self, n: int, generator: torch.Generator) -> list:
        return [t.sample(n, generator) for t in self.steps]

    def apply(self, x: torch.Tensor, params: list) -> torch.Tensor:
        for t, p in zip(self.steps, params):
            x = t.apply(x, p)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], generator))


def metacloak_transforms(size: int, *, blur_kernel: int = 7, blur_sigma: tuple[float, float] = (0.1, 2.0),
                         hflip_p: float = 0.5, blur: bool = True, flip: bool = True) -> Compose:
    """MetaCloak's defence pipeline [C: metacloak.py ``all_trans``]: Resize → CenterCrop → GaussianBlur →
    RandomHorizontalFlip; the final [0,255]→[-1,1] normalisation is not needed, cloak works in [-1,1]
    and blur/flip are linear, so the order of scaling does not matter."""
    steps: list = [ResizeCrop(size)]
    if blur:
        steps.append(GaussianBlur(blur_kernel, blur_sigma))
    if flip:
        steps.append(RandomHFlip(hflip_p))
    return Compose(steps)
