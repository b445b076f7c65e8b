"""A set of images of several shapes as shape buckets, for the methods that optimise a set together.

A group method (ASPL and its family, CAP, DLADiff) keeps one perturbed set. Images of one working shape
are batched through the models together; images of different shapes cannot share a batch. ``Groups``
holds one B_b×3×h×w tensor per bucket (``parts``) and each bucket's positions in the set (``indices``),
so a PGD step can evaluate its loss bucket by bucket and project/step image by image.

A uniform set is one bucket holding the images in set order: every operation then reduces to the
plain batched one, with the same random draws in the same order, so results are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass
class Groups:
    parts: list[torch.Tensor]
    indices: list[list[int]]

    @classmethod
    def of(cls, images, device=None, dtype=None) -> Groups:
        """The buckets of an ImageSet (or of a plain B×3×H×W tensor: one bucket)."""
        if isinstance(images, torch.Tensor):
            return cls([images.to(device, dtype)], [list(range(images.shape[0]))])
        buckets = images.buckets()
        return cls([b.pixels.to(device, dtype) for b in buckets], [list(b.indices) for b in buckets])

    @classmethod
    def from_list(cls, tensors, device=None, dtype=None) -> Groups:
        """Per-image 3×h×w tensors (or one B×3×H×W tensor) grouped by shape, in order of first appearance."""
        if isinstance(tensors, torch.Tensor):
            return cls.of(tensors, device, dtype)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(i)
        return cls([torch.stack([tensors[i] for i in idx]).to(device, dtype) for idx in groups.values()],
                   [list(idx) for idx in groups.values()])

    # --- shape of the set ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(i) for i in self.indices)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [tuple(p.shape[-2:]) for p in self.parts]

    def locate(self, i: int) -> tuple[int, int]:
        """(bucket, row) of image ``i`` of the set."""
        for b, idx in enumerate(self.indices):
            if i in idx:
                return b, idx.index(i)
        raise IndexError(i)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` of the set as a 1×3×h×w view."""
        b, r = self.locate(i)
        return self.parts[b][r:r + 1]

    def images(self) -> list[torch.Tensor]:
        """Per-image 3×h×w views in set order (gradients flow to the parts)."""
        out: list = [None] * len(self)
        for part, idx in zip(self.parts, self.indices):
            for r, i in enumerate(idx):
                out[i] = part[r]
        return out

    def weights(self) -> list[float]:
        """Each bucket's share of the set: the bucket means weighted by these add up to the set's mean."""
        n = len(self)
        return [len(idx) / n for idx in self.indices]

    # --- element-wise ---------------------------------------------------------------------------------
    def map(self, fn: Callable[..., torch.Tensor], *others: Groups) -> Groups:
        """``fn`` applied bucket by bucket (to this set's part and the same bucket of ``others``)."""
        return Groups([fn(p, *(o.parts[b] for o in others)) for b, p in enumerate(self.parts)], self.indices)

    def detach(self) -> Groups:
        return self.map(lambda p: p.detach())

    def clone(self) -> Groups:
        return self.map(lambda p: p.clone())

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.parts)

    def equal(self, other: Groups) -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.parts, other.parts))

    def result(self):
        """What a group method returns: the B×3×H×W tensor of a uniform set, else per-image tensors."""
        if len(self.parts) == 1:
            return self.parts[0]
        return self.images()


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size``×``size`` square of B×3×h×w images (DreamBooth's ``--center_crop``); the
    images themselves when they are that square already. A side shorter than ``size`` keeps its length."""
    h, w = x.shape[-2:]
    sh, sw = min(size, h), min(size, w)
    if (sh, sw) == (h, w):
        return x
    top, left = (h - sh) // 2, (w - sw) // 2
    return x[..., top:top + sh, left:left + sw]


def square_crops(images, size: int, device=None, dtype=None) -> torch.Tensor:
    """Square centre crops of every image of a set (an ImageSet, a tensor or Groups), stacked in set order:
    what a DreamBooth run (the surrogates' training) sees of the working copies."""
    if isinstance(images, torch.Tensor):
        return center_crop(images, size).to(device, dtype)
    tensors = images.images() if isinstance(images, Groups) else images.tensors
    return torch.cat([center_crop(t.unsqueeze(0), size) for t in tensors]).to(device, dtype)


def loss_and_grad(x: Groups, loss_fn, chunks=None, params=None) -> tuple[float, Groups]:
    """The set's mean loss and its gradient per bucket, evaluated bucket by bucket (and in ``chunks(n)`` row
    slices within a bucket when given): ``loss_fn(pixels, bucket, rows)`` returns the mean loss of those
    images (rows None = the whole bucket). Every loss of these methods is a mean of per-image means, so the
    pieces weighted by their share of the set add up to the set's mean, and so do their gradients; each
    piece keeps its images' draws. A uniform set without chunks is one unweighted evaluation.

    ``params``: weights that also receive the gradient of the same loss, added into their ``.grad`` (a joint
    step on images and weights from one backward pass, as CAAT takes)."""
    n = len(x)
    total, grads = 0.0, []
    for b, part in enumerate(x.parts):
        pieces = chunks(part.shape[0]) if chunks is not None else None
        if pieces is None:
            p = part.detach().requires_grad_(True)
            loss = loss_fn(p, b, None)
            if part.shape[0] != n:
                loss = loss * (part.shape[0] / n)
            g = _grad(loss, p, params)
            grads.append(g)
            total += float(loss.detach())
            continue
        bucket_grads = []
        for rows in pieces:
            p = part[rows].detach().requires_grad_(True)
            loss = loss_fn(p, b, rows) * ((rows.stop - rows.start) / n)
            g = _grad(loss, p, params)
            bucket_grads.append(g)
            total += float(loss.detach())
        grads.append(torch.cat(bucket_grads))
    return total, Groups(grads, x.indices)


def _grad(loss: torch.Tensor, pixels: torch.Tensor, params) -> torch.Tensor:
    """∇ of ``loss`` w.r.t. ``pixels``; with ``params``, their gradients are accumulated into ``.grad`` too."""
    if not params:
        return torch.autograd.grad(loss, pixels)[0]
    grads = torch.autograd.grad(loss, [pixels, *params])
    for w, g in zip(params, grads[1:]):
        w.grad = g if w.grad is None else w.grad + g
    return grads[0]


@torch.no_grad()
def loss_value(x: Groups, loss_fn, chunks=None) -> float:
    """The set's mean loss without a gradient, pieced like :func:`loss_and_grad`."""
    n = len(x)
    total = 0.0
    for b, part in enumerate(x.parts):
        pieces = chunks(part.shape[0]) if chunks is not None else None
        if pieces is None:
            value = float(loss_fn(part, b, None))
            total += value if part.shape[0] == n else value * part.shape[0] / n
        else:
            total += sum(float(loss_fn(part[rows], b, rows)) * (rows.stop - rows.start) / n for rows in pieces)
    return total


@torch.no_grad()
def candidate_values(candidates: list[Groups], loss_fn, chunks=None) -> list[float]:
    """The set's mean loss at each of several candidate sets (one step's candidates, on one draw), all of
    them in one pass per bucket (and per ``chunks`` row slice): the candidates' rows are stacked
    candidate-major and ``loss_fn(pixels, bucket, rows, copies=m)`` returns the m candidates' mean losses
    of those rows, each on the rows' own draw. The pieces add up as in :func:`loss_value`."""
    m, n = len(candidates), len(candidates[0])
    totals = [0.0] * m
    for b, part in enumerate(candidates[0].parts):
        pieces = chunks(part.shape[0]) if chunks is not None else None
        for rows in pieces or [None]:
            stacked = torch.cat([c.parts[b] if rows is None else c.parts[b][rows] for c in candidates])
            values = loss_fn(stacked, b, rows, copies=m).tolist() if m > 1 else [float(loss_fn(stacked, b, rows))]
            count = part.shape[0] if rows is None else rows.stop - rows.start
            for j, value in enumerate(values):
                totals[j] += value if count == n else value * count / n
    return totals


def row_chunks(size: int) -> Callable[[int], list[slice] | None]:
    """``chunks`` for :func:`loss_and_grad`: row slices of ``size`` images (a method's ``pgd_batch``), or None
    (the whole bucket at once) when ``size`` is 0 or covers the bucket."""
    def chunks(n: int) -> list[slice] | None:
        return [slice(i, min(i + size, n)) for i in range(0, n, size)] if 0 < size < n else None
    return chunks
