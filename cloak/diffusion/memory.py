"""Memory tiers of the fine-tuning family (``--memory``): what ``low`` changes, in one place.

``low`` trades compute for memory, never the algorithm's draws:

* gradient checkpointing in the UNet and the VAE (its encoder carries PGD's gradient to the pixels): the
  activations of each block are recomputed in the backward pass instead of kept — the same gradients;
* attention slicing where attention is not already memory-efficient (torch's SDPA kernels need no
  slicing; older attention processors compute the full attention matrix);
* ``pgd_batch = 1``: one image per UNet pass in a PGD step (same draws, same step);
* ``cap_batch = 1``: CAP's line search evaluates one candidate per UNet pass (same draws, same choice);
* ``surrogate = lora``: LoRA adapters on the shared base instead of full-weight DreamBooth copies
  (cloak.diffusion.lora_surrogate). For ASPL this is the published ``aspl-lora``; for SimAC and the CAP
  hosts it is a [PROP]; methods without that option (FSMG's cached θ_ref, MetaCloak's pool, DLADiff layer 1,
  APDM, whose result *is* the fine-tuned model) keep full weights and get the other two.

Options the user sets (``-o``) win over the tier's.
"""

from __future__ import annotations

from typing import Any

MEMORY_TIERS = ("default", "low")
LOW_OPTIONS: dict[str, Any] = {"pgd_batch": 1, "cap_batch": 1, "surrogate": "lora"}


def tier_options(tier: str, options_cls) -> dict[str, Any]:
    """The method options ``tier`` sets, for the fields this method has."""
    if tier != "low":
        return {}
    fields = getattr(options_cls, "model_fields", {})
    return {k: v for k, v in LOW_OPTIONS.items() if k in fields}


def apply_low_memory(unet, vae) -> dict[str, Any]:
    """Turn on gradient checkpointing (UNet, VAE) and attention slicing where useful; returns what it did.
    Copies made afterwards (``trainable_copy``) inherit both."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    record: dict[str, Any] = {"gradient_checkpointing": []}
    for name, module in (("unet", unet), ("vae", vae)):
        if getattr(module, "_supports_gradient_checkpointing", False):
            module.enable_gradient_checkpointing()
            record["gradient_checkpointing"].append(name)
    processors = getattr(unet, "attn_processors", {})
    if processors and not all(isinstance(p, AttnProcessor2_0) for p in processors.values()):
        unet.set_attention_slice("auto")
        record["attention_slicing"] = "auto"
    else:
        record["attention_slicing"] = "not needed (SDPA attention)"
    return record


__all__ = ["LOW_OPTIONS", "MEMORY_TIERS", "apply_low_memory", "tier_options"]
