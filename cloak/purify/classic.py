"""Rule-based purifiers: Gaussian filter and JPEG (purify.md §2)."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from pydantic import Field

from cloak.io.images import pil_to_tensor, to_uint8
from cloak.methods import MethodOptions
from cloak.purify.base import PurifyMethod


def gaussian_kernel1d(kernel: int, sigma: float) -> torch.Tensor:
    x = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def gaussian_blur(image: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders (OpenCV's default border)."""
    k = gaussian_kernel1d(kernel, sigma).to(image)
    c = image.shape[1]
    pad = kernel // 2
    x = F.pad(image, (pad, pad, pad, pad), mode="reflect") if min(image.shape[-2:]) > pad else \
        F.pad(image, (pad, pad, pad, pad), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, kernel, 1), groups=c)


class Gaussian(PurifyMethod):
    paper = "Gaussian filtering as in Anti-DreamBooth / DiffShortcut App. C.1 ('kernel size 5')"
    implements = "kernel 5 with OpenCV's σ rule (1.1) [PROP]; --compat: PIL GaussianBlur(radius=5) as released"
    proposals = ("sigma",)

    class Options(MethodOptions):
        kernel: int = Field(5, ge=1, description="kernel size (odd)")
        sigma: float | None = Field(None, gt=0, description="σ; default 0.3((k−1)/2−1)+0.8 (OpenCV rule) = 1.1 for k=5")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.ctx.compat:
            # [Q] the released script passes 5 as PIL's radius, which PIL treats as σ (a much stronger blur).
            pil = Image.fromarray(to_uint8(image[0]))
            return pil_to_tensor(pil.filter(ImageFilter.GaussianBlur(radius=self.opts.kernel))).unsqueeze(0)
        k = self.opts.kernel if self.opts.kernel % 2 else self.opts.kernel + 1
        sigma = self.opts.sigma or 0.3 * ((k - 1) / 2 - 1) + 0.8
        return gaussian_blur(image.float(), k, sigma).clamp(-1, 1)


class Jpeg(PurifyMethod):
    paper = "JPEG compression as in MetaCloak / DiffShortcut App. C.1"
    implements = "PIL JPEG encode at the given quality, decoded back"

    class Options(MethodOptions):
        quality: int = Field(75, ge=1, le=100, description="JPEG quality")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        buf = io.BytesIO()
        Image.fromarray(to_uint8(image[0])).save(buf, format="JPEG", quality=self.opts.quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            return pil_to_tensor(decoded.convert("RGB")).unsqueeze(0)
