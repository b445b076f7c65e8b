"""Identity-encoder attacks: differentiable face crops and a multi-encoder cosine loss.

Used by DLADiff layer 2 (protect.md §9): the protected image's face region, cut out at the clean image's
detector box and resized (differentiably) to each encoder's input size, should embed far from the clean
image's face under every encoder at once. An encoder with its own alignment (``face_view``, e.g. dlib-resnet's
5-point chip) fixes its crop on the clean images and resamples the protected ones there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cloak.adversarial.resample import resize


@dataclass(frozen=True)
class Region:
    """A pixel box ``(x1, y1, x2, y2)`` (end-exclusive) of one image; ``None`` = the whole image."""

    box: tuple[int, int, int, int] | None
    source: str  # "face" (detector box) or "image" (no face found)


def square_box(box, height: int, width: int, margin: float = 0.0) -> tuple[int, int, int, int]:
    """A square pixel box around a detector box (side = longer side × (1 + margin)), kept inside the image.

    Squaring keeps the face's aspect ratio when it is resized to an encoder's square input [PROP].
    """
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    side = max(x2 - x1, y2 - y1) * (1.0 + margin)
    side = int(round(min(max(side, 2.0), height, width)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = int(round(cx - side / 2))
    top = int(round(cy - side / 2))
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return left, top, left + side, top + side


def crop_resize(x, regions: list[Region], size: int) -> torch.Tensor:
    """Each image's region resized to ``size``² (bicubic, antialiased), differentiable in ``x``.

    ``x``: a B×3×H×W tensor or a sequence of 3×h×w images of different shapes (each region is in its own
    image's pixels)."""
    out = []
    for i, region in enumerate(regions):
        img = x[i].unsqueeze(0)
        if region.box is not None:
            x1, y1, x2, y2 = region.box
            img = img[:, :, y1:y2, x1:x2]
        if img.shape[-2:] != (size, size):
            img = resize(img, (size, size), mode="bicubic", antialias=True)  # deterministic gradient on CUDA
        out.append(img)
    return torch.cat(out).clamp(-1, 1)


def face_view(encoder, clean: torch.Tensor, regions: list[Region]):
    """The function x → the encoder's input crops of x: its own alignment if it has one, else the regions."""
    if hasattr(encoder, "face_view"):
        return encoder.face_view(clean, regions)

    def view(x: torch.Tensor) -> torch.Tensor:
        return crop_resize(x, regions, encoder.input_size)

    view.sources = [region.source for region in regions]
    return view


class IdentityLoss:
    """Σ over encoders of the mean cosine similarity between the images' and the clean images' embeddings.

    The clean embeddings are computed once, on the same crops. Minimising the loss moves every encoder's
    embedding of every image away from its clean counterpart.
    """

    def __init__(self, encoders, regions: list[Region], clean):
        self.encoders = list(encoders)
        self.regions = list(regions)
        self.views = [face_view(enc, clean, self.regions) for enc in self.encoders]
        with torch.no_grad():
            self.reference = [F.normalize(enc(view(clean)).float(), dim=-1)
                              for enc, view in zip(self.encoders, self.views)]

    def embeddings(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per encoder, the raw embeddings (B×D) of the images' crops."""
        return [enc(view(x)).float() for enc, view in zip(self.encoders, self.views)]

    def similarities(self, x) -> list[torch.Tensor]:
        """Per encoder, the per-image cosine similarity (B,) to the clean embedding."""
        return [(F.normalize(emb, dim=-1) * ref).sum(-1) for emb, ref in zip(self.embeddings(x), self.reference)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([s.mean() for s in self.similarities(x)]).sum()
