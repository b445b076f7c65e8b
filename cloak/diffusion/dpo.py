"""Direct Protective Optimization (DPO), the preference loss of APDM (immunize.md §2).

A Diffusion-DPO-style loss in which the *safe* image of a pair is preferred over the subject's
image, both under the subject prompt, measured against a frozen reference model (the original base)::

    e(θ, z) = (target − f_θ(z_t, t, c))²                       elementwise
    Δ = [e(θ, z_s) − e(θ_ref, z_s)] − [e(θ, z_u) − e(θ_ref, z_u)]
    L_DPO = mean(−log σ(−β·Δ))

Minimizing it pushes Δ < 0: relative to the reference, the model denoises the safe image better and
the subject worse. At θ = θ_ref, Δ = 0 and L_DPO = log 2 exactly, whatever the draw.

Both pair members share one timestep and one noise draw (the comparison is then between images,
not between draws).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from cloak.diffusion.loss import training_target

LOG2 = math.log(2.0)


def squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise ``(target − pred)²`` in fp32 (bf16 autocast outputs are upcast first)."""
    return (pred.float() - target.float()).pow(2)


def dpo_loss(
    err_model_safe: torch.Tensor,
    err_ref_safe: torch.Tensor,
    err_model_unsafe: torch.Tensor,
    err_ref_unsafe: torch.Tensor,
    *,
    beta: float = 1.0,
    reduce: Literal["element", "sample"] = "element",
) -> torch.Tensor:
    """L_DPO from the four elementwise error maps (B×C×H×W each); the reference errors carry no grad.

    ``reduce="element"`` applies the log-sigmoid to every latent element, as the released APDM code
    does [Q: default = code behaviour]; ``"sample"`` sums Δ over C, H, W first, as Diffusion-DPO
    does with its per-sample error [PROP option].
    """
    delta = (err_model_safe - err_ref_safe) - (err_model_unsafe - err_ref_unsafe)
    if reduce == "sample":
        delta = delta.flatten(1).sum(1)
    elif reduce != "element":
        raise ValueError(f"reduce must be 'element' or 'sample', got {reduce!r}")
    return -F.logsigmoid(-beta * delta).mean()


def dpo_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, *,
               epsilon_only: bool) -> torch.Tensor:
    """What the DPO errors compare against.

    The released code always uses ε here, also for v-prediction models [Q, ``epsilon_only``]; by
    default the model's own training target (ε or v) is used, as in its DreamBooth branch [PROP].
    """
    if epsilon_only:
        return noise
    return training_target(scheduler, latents, noise, timesteps)


@torch.no_grad()
def reference_errors(ref_unet, noisy: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
                     target: torch.Tensor) -> torch.Tensor:
    """Elementwise errors of the frozen reference model (no graph is built)."""
    dtype = ref_unet.dtype
    pred = ref_unet(noisy.to(dtype), timesteps, states.to(dtype)).sample
    return squared_error(pred, target)
