"""Which tensor is kept in which dtype, for every method that trains a copy of a diffusion model.

``--dtype bf16`` loads the base models in bf16 (half the memory, faster matmuls). It must not bring back
Anti-DreamBooth's lost-update bug (protect.md §0 [Q]): an AdamW step at lr 5e-7 is far below half a
bf16 ulp of a typical weight, so a bf16 weight keeps its value and the surrogate never learns; PGD
steps of α = 5e-3 on bf16 pixels (ulp 2⁻⁷ near ±1) round away the same way. So under a low-precision
``--dtype``:

* frozen base weights (VAE, the UNet and text encoder that are only read): the run's dtype;
* trained copies (DreamBooth surrogates, LoRA adapters, APDM's θ): fp32 master weights, fp32 AdamW state;
* compute: forward and backward under ``torch.autocast`` to the run's dtype (CPU and CUDA);
* perturbations and their gradients: fp32.

``--compat`` alone reproduces the released bf16 training (the trained weights themselves in bf16).
The report's ``dtypes`` record is read off the tensors that ran, not off the flags (:func:`observed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
PIXEL_DTYPE = torch.float32  # perturbations and their gradients, whatever --dtype says
MASTER_DTYPE = torch.float32  # weights an optimizer updates, unless --compat trains bf16 as released


def autocast_dtype(device: torch.device | str, run_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype compute is autocast to: the run's ``--dtype`` when it is a low precision (any device);
    bf16 on CUDA otherwise (ARCHITECTURE §7: fp32 weights, bf16 compute); None = plain fp32."""
    if run_dtype in LOW_PRECISION:
        return run_dtype
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return None


def autocast_for(device: torch.device | str, run_dtype: torch.dtype | None = None):
    """``torch.autocast`` to :func:`autocast_dtype`, or a no-op context."""
    dtype = autocast_dtype(device, run_dtype)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def master_dtype(bf16_weights: bool = False) -> torch.dtype:
    return torch.bfloat16 if bf16_weights else MASTER_DTYPE


@torch.no_grad()
def to_master(params: Iterable[torch.nn.Parameter], bf16_weights: bool = False) -> None:
    """Cast trained parameters in place to their master dtype (the Parameter objects stay the same, so an
    optimizer built before or after sees them)."""
    dtype = master_dtype(bf16_weights)
    for p in params:
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "none"


def names(tensors: Iterable[torch.Tensor]) -> str | None:
    """The dtype of some tensors by name ("float32"), "a+b" if they differ, None if there are none."""
    seen = sorted({name(t.dtype) for t in tensors})
    return "+".join(seen) if seen else None


def optimizer_state_dtypes(optimizer: torch.optim.Optimizer) -> str | None:
    """Dtype of the optimizer's moment tensors (not the scalar step counts); None before its first step."""
    return names(v for state in optimizer.state.values() for k, v in state.items()
                 if torch.is_tensor(v) and k != "step" and v.dim())


class DtypeLedger:
    """Dtypes seen while the run went: ``note(role, tensors)`` adds, ``record()`` is the report's entry."""

    def __init__(self):
        self.seen: dict[str, set[str]] = {}

    def note(self, role: str, value) -> None:
        if value is None:
            return
        if isinstance(value, torch.dtype):
            found = {name(value)}
        elif isinstance(value, str):
            found = set(value.split("+"))
        elif torch.is_tensor(value):
            found = {name(value.dtype)}
        else:
            found = {name(t.dtype) for t in value}
        self.seen.setdefault(role, set()).update(found)

    def note_trainer(self, trainer, prefix: str = "trained") -> None:
        """A trainer's weights, optimizer state and compute, as they are now."""
        self.note(f"{prefix}_weights", names(trainer.params))
        self.note(f"{prefix}_optimizer_state", optimizer_state_dtypes(trainer.optimizer))
        self.note("compute", compute_label(trainer.compute_dtype, trainer.params))

    def record(self) -> dict[str, str]:
        return {role: "+".join(sorted(found)) for role, found in sorted(self.seen.items())}


def compute_label(autocast: torch.dtype | None, weights: Iterable[torch.Tensor]) -> str:
    """How the forward/backward ran: ``"bfloat16 autocast"``, or the weights' own dtype without autocast."""
    if autocast is not None:
        return f"{name(autocast)} autocast"
    return names(weights) or "float32"


__all__ = ["DtypeLedger", "LOW_PRECISION", "MASTER_DTYPE", "PIXEL_DTYPE", "autocast_dtype", "autocast_for",
           "compute_label", "master_dtype", "name", "names", "optimizer_state_dtypes", "to_master"]
