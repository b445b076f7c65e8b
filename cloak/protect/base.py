"""The protect interface: a method maps an ImageSet to perturbed pixels within an ℓ∞ budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from cloak.adversarial import to_m11
from cloak.io.images import ImageSet
from cloak.methods import Method, MethodOptions


class BudgetOptions(MethodOptions):
    """ℓ∞ budget ``eps`` and step ``alpha``, both in ``unit`` (m11 = [-1,1], 01 = [0,1], 255 = levels)."""

    eps: float = Field(0.05, ge=0, description="ℓ∞ budget", json_schema_extra={"unit": "unit"})
    alpha: float = Field(0.005, ge=0, description="PGD step size", json_schema_extra={"unit": "unit"})
    unit: Literal["m11", "01", "255"] = Field("m11", description="unit of eps and alpha")

    @property
    def eps_m11(self) -> float:
        return to_m11(self.eps, self.unit)

    @property
    def alpha_m11(self) -> float:
        return to_m11(self.alpha, self.unit)


@dataclass
class ProtectResult:
    """A method's perturbed working copies, in [-1, 1], in the order of the ImageSet it was given.

    ``pixels`` is either one B×3×H×W tensor (a set of one shape) or a list of per-image 3×h×w tensors, each
    at its image's working size (a mixed-shape set); :func:`per_image` turns either into the list. The
    pipeline brings each one back to its photo's own size and rounds it within the budget.
    """

    pixels: torch.Tensor | list[torch.Tensor]
    records: list[dict[str, Any]] = field(default_factory=list)  # per-image figures
    summary: dict[str, Any] = field(default_factory=dict)


def per_image(pixels: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """A result's pixels as one 3×h×w tensor per image (a B×3×H×W tensor is split along B)."""
    if isinstance(pixels, torch.Tensor):
        if pixels.dim() != 4:
            raise ValueError(f"expected B×3×H×W pixels, got shape {tuple(pixels.shape)}")
        return list(pixels.unbind(0))
    return list(pixels)


class ProtectMethod(Method):
    # Group methods optimise the whole set together (their result for an image depends on the others).
    group: ClassVar[bool] = True
    # Whether the method uses the clean reference set (--ref): same identity, not the images to protect.
    uses_ref: ClassVar[bool] = False
    # Name of the option that --steps sets (the method's main iteration count).
    steps_option: ClassVar[str | None] = None
    # Model used when --model is not given (VerbRun reads it); each method states its paper's base model.
    default_model: ClassVar[str] = "sd21-base"

    def budget_m11(self) -> float:
        return self.opts.eps_m11

    def __call__(self, images: ImageSet) -> ProtectResult:
        raise NotImplementedError
