"""The protect interface: a method maps an ImageSet to perturbed pixels within an ℓ∞ budget."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from cloak.adversarial import to_m11
from cloak.adversarial.groups import Groups
from cloak.diffusion.checkpoint import LoopCheckpoint
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

    @classmethod
    def needs_model(cls, opts) -> bool:
        """Whether these options use the diffusion model (no: it is not loaded; images keep their own size)."""
        return True

    # More settings that decide a checkpointed loop's result (a plug-in's own options), for its fingerprint.
    identity_extra: dict[str, Any] = {}

    def budget_m11(self) -> float:
        return self.opts.eps_m11

    def __call__(self, images: ImageSet) -> ProtectResult:
        raise NotImplementedError

    # --- checkpoint / resume of a group method's outer loop (issue 14 item 3) ---------------------------
    def loop_checkpoint(self, x0: Groups, unit: str) -> LoopCheckpoint:
        """The checkpoint of this run's outer loop in ``ctx.extras["state_dir"]`` (disabled without one),
        fingerprinted by everything that decides the result, so ``--resume`` with other settings fails."""
        ctx = self.ctx
        ref = getattr(ctx, "ref", None)
        identity = {"method": self.name or type(self).__name__, "options": self.opts.model_dump(mode="json"),
                    "model": str(ctx.model), "seed": ctx.seed, "effort": ctx.effort, "compat": ctx.compat,
                    "dtype": str(ctx.dtype), "resolution": ctx.resolution, "images": tensors_digest(x0.images()),
                    "ref": tensors_digest(ref.tensors) if ref is not None else None,
                    "target_image": str(ctx.extras.get("target_image")), **self.identity_extra}
        return LoopCheckpoint.for_run(ctx, identity, unit)


def tensors_digest(tensors) -> str:
    """sha256 over the shapes and values of a sequence of tensors."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().float().cpu().contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def weights_of(params) -> list[torch.Tensor]:
    """The values of a trainer's parameters, for a checkpoint."""
    return [p.detach() for p in params]


@torch.no_grad()
def load_weights(params, saved: list[torch.Tensor]) -> None:
    """Put checkpointed values back into a trainer's parameters, in place."""
    if len(saved) != len(params):
        from cloak.errors import UsageError

        raise UsageError("the checkpoint does not match this model (parameter count differs)")
    for p, t in zip(params, saved):
        p.copy_(t.to(p.device, p.dtype))


def restore_groups(saved: list[torch.Tensor], like: Groups) -> Groups:
    """A checkpointed set back on ``like``'s device and dtype, with its buckets."""
    return Groups([t.to(p.device, p.dtype) for t, p in zip(saved, like.parts)], like.indices)
