"""Full-reference pixel metrics: PSNR, SSIM, ℓ∞ (paired with the reference by file name).

Images are compared as 8-bit RGB in [0, 1], pixel for pixel, at their own sizes: a pair of different sizes
is a per-item error naming both, unless ``--align`` says how to bring the reference to the image's size
(``resize``: bicubic to the same size; ``crop``: scale to cover and centre-crop, as ``--fit crop`` made
its square).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cloak.score.base import Metric, MetricResult, ScoreImage, pair_by_name


def _as_float(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) / 255.0


ALIGNS = ("none", "resize", "crop")


class SizeMismatch(ValueError):
    """A pair of images of different sizes that no ``--align`` was asked for."""


def _matched(img: ScoreImage, ref: ScoreImage, align: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """The image and its reference at one size, or :class:`SizeMismatch` naming both sizes."""
    r = ref.rgb
    h, w = img.rgb.shape[:2]
    if r.shape[:2] != (h, w):
        if align == "resize":
            r = np.asarray(Image.fromarray(r).resize((w, h), Image.BICUBIC, reducing_gap=None))
        elif align == "crop":
            pil = Image.fromarray(r)
            scale = max(w / pil.width, h / pil.height)
            nw, nh = max(w, round(pil.width * scale)), max(h, round(pil.height * scale))
            pil = pil.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
            left, top = (nw - w) // 2, (nh - h) // 2
            r = np.asarray(pil.crop((left, top, left + w, top + h)))
        else:
            raise SizeMismatch(f"{img.path} is {w}×{h} but its reference {ref.path} is {r.shape[1]}×{r.shape[0]}; "
                               f"pass --align resize (or crop) to compare them")
    return _as_float(img.rgb), _as_float(r)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """'valid' separable filtering of an H×W array."""
    from scipy.signal import convolve2d

    return convolve2d(convolve2d(img, window[None, :], mode="valid"), window[:, None], mode="valid")


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over RGB channels (Wang et al. 2004: 11×11 Gaussian σ 1.5, K1 0.01, K2 0.03, L = 1)."""
    window = _gaussian_window()
    c1, c2 = 0.01**2, 0.03**2
    if min(a.shape[:2]) < 11:
        raise ValueError("ssim needs images of at least 11×11 pixels")
    values = []
    for ch in range(a.shape[2]):
        x, y = a[:, :, ch], b[:, :, ch]
        mx, my = _filter(x, window), _filter(y, window)
        sxx = _filter(x * x, window) - mx**2
        syy = _filter(y * y, window) - my**2
        sxy = _filter(x * y, window) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        values.append(s.mean())
    return float(np.mean(values))


class _FullRef(Metric):
    mode = "FR"
    needs_ref = True

    def one(self, a: np.ndarray, b: np.ndarray) -> float:
        raise NotImplementedError

    def compute(self, images: list[ScoreImage], ref: list[ScoreImage] | None) -> MetricResult:
        pairs = pair_by_name(images, ref or [], self.name)
        values: list[float | None] = []
        errors: dict[int, str] = {}
        for i, (img, r) in enumerate(zip(images, pairs)):
            try:
                pair = None if r is None else _matched(img, r, self.ctx.extras.get("align", "none"))
                values.append(None if pair is None else self.one(*pair))
            except SizeMismatch as exc:
                values.append(None)
                errors[i] = str(exc)
        unpaired = sum(r is None for r in pairs)
        return MetricResult(values, extras={"unpaired": unpaired} if unpaired else {}, errors=errors)


class Psnr(_FullRef):
    paper = "peak signal-to-noise ratio, 8-bit RGB"
    implements = "10·log10(1/MSE) on [0,1] RGB; identical images give +inf (reported as null in JSON)"
    lower_better = False
    range = (0.0, None)

    def one(self, a, b):
        value = psnr(a, b)
        return None if value == float("inf") else value


class Ssim(_FullRef):
    paper = "Wang et al., 2004"
    implements = "Gaussian-window SSIM (11, σ 1.5), mean over RGB channels"
    lower_better = False
    range = (-1.0, 1.0)

    def one(self, a, b):
        return ssim(a, b)


class Linf(_FullRef):
    paper = "ℓ∞ distance"
    implements = "max |a−b| in 8-bit levels (a protection budget check: ≤ ε·255)"
    lower_better = True
    range = (0.0, 255.0)

    def one(self, a, b):
        return float(np.abs(np.round(a * 255) - np.round(b * 255)).max())
