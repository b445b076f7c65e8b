"""The metric interface.

A metric declares its direction (``lower_better``), its ``range``, its ``mode`` — ``FR`` (full
reference, paired by file name), ``NR`` (no reference), ``SET`` (compares with the reference set as a
whole, e.g. the mean identity embedding) — and returns one value per generated image (``None`` where
undefined), plus an aggregate (the mean of defined values unless the metric says otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from cloak.methods import Method


@dataclass
class ScoreImage:
    name: str  # relative path without suffix (pairs FR metrics with the reference)
    path: str
    rgb: np.ndarray  # uint8 H×W×3


@dataclass
class MetricResult:
    values: list[float | None]
    value: float | None = None  # the aggregate; None = mean of the defined values
    extras: dict[str, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # image index → why it has no value (a per-item error)


class Metric(Method):
    lower_better: ClassVar[bool] = False
    range: ClassVar[tuple[float | None, float | None]] = (None, None)
    mode: ClassVar[str] = "NR"
    needs_ref: ClassVar[bool] = False
    backend: ClassVar[str] = ""

    def compute(self, images: list[ScoreImage], ref: list[ScoreImage] | None) -> MetricResult:
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"lower_better": cls.lower_better, "range": list(cls.range), "mode": cls.mode,
                "needs_ref": cls.needs_ref}


def aggregate(values: list[float | None]) -> dict[str, Any]:
    defined = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not defined:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(defined, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=0)), "n": len(defined)}


def pair_by_name(images: list[ScoreImage], ref: list[ScoreImage], metric: str) -> list[ScoreImage | None]:
    """The reference image with the same relative name, or with the same file stem."""
    from cloak.errors import InputError

    by_name = {r.name: r for r in ref}
    by_stem = {}
    for r in ref:
        by_stem.setdefault(r.name.rsplit("/", 1)[-1], r)
    pairs = [by_name.get(i.name) or by_stem.get(i.name.rsplit("/", 1)[-1]) for i in images]
    if not any(pairs):
        raise InputError(f"{metric} pairs images with the reference by file name, and no name matches "
                         f"(e.g. {images[0].name!r} vs {ref[0].name!r})")
    return pairs
