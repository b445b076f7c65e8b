"""A LoRA surrogate for the fine-tuning family: rank-r adapters on the run's own base model instead of
full-weight DreamBooth copies (``-o surrogate=lora``, on by ``--memory low``).

Full-weight ASPL holds f (the loaded UNet and text encoder, trained in place) and its copy f', plus, during
a DreamBooth call, the trained model's gradients and AdamW moments: five UNet + text-encoder-sized fp32
buffers at the peak. Here every trainer owns one named adapter set injected in place
into the base UNet (and text encoder when it trains) — the attention projections ``to_q/to_k/to_v/to_out.0``
(+ ``add_k_proj/add_v_proj``), as Anti-DreamBooth's ``attacks/aspl_lora.py`` and its LoRA DreamBooth do —
so a surrogate costs megabytes. The base weights stay frozen and shared; only the active adapter set acts
in a forward pass. Adapters start as LoRA does (B = 0, A ~ N(0, 1/r²) drawn from the run's generator), so
a fresh surrogate is exactly the base model.

The adapters are removed (the original modules put back) before the next method call that makes new
ones on the same model, and by :func:`remove_lora`.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import Field

from cloak.diffusion.dreambooth import DreamBoothConfig, DreamBoothTrainer
from cloak.methods import MethodOptions

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_ADDED_KV = ("add_k_proj", "add_v_proj")  # only in UNets with added-KV attention
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_ATTR = "_cloak_lora_adapters"  # the adapter names a model carries, set on the SDModel


class LoraSurrogateOptions(MethodOptions):
    """``surrogate``: full-weight DreamBooth copies (published) or LoRA adapters (memory tier)."""

    surrogate: Literal["full", "lora"] = Field(
        "full", description="surrogate weights: full DreamBooth copies, or rank-r LoRA adapters on the shared base "
                            "(megabytes instead of UNet copies; ASPL's published LoRA variant is aspl-lora; for "
                            "the other methods a [PROP] memory tier, on with --memory low)")
    lora_rank: int = Field(4, ge=1, description="LoRA rank of the surrogate's adapters (-o surrogate=lora)")


def _present(module: torch.nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    leaves = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()}
    return tuple(n for n in names if n in leaves)


def remove_lora(sd) -> None:
    """Put the original modules back in ``sd``'s UNet and text encoder (after :func:`lora_trainers`)."""
    if not getattr(sd, _ATTR, None):
        return
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    for module in (sd.unet, sd.text_encoder):
        recurse_remove_peft_layers(module)
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in module.__dict__:
                delattr(module, attr)
        if hasattr(module, "_hf_peft_config_loaded"):
            module._hf_peft_config_loaded = False
        module.requires_grad_(False)
        module.eval()
    setattr(sd, _ATTR, [])


def _add(module: torch.nn.Module, name: str, targets: tuple[str, ...], rank: int,
         generator: torch.Generator) -> list[torch.nn.Parameter]:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator: leave it as it was
        # peft's own injection (not the diffusers/transformers wrappers, which want other peft versions).
        with warnings.catch_warnings():  # "multiple adapters in the model": intended, one set per trainer
            warnings.simplefilter("ignore")
            inject_adapter_in_model(config, module, adapter_name=name)
    params = [p for n, p in module.named_parameters() if f".lora_A.{name}." in n or f".lora_B.{name}." in n]
    with torch.no_grad():
        for n, p in module.named_parameters():
            if f".lora_A.{name}." in n:  # A ~ N(0, 1/r²) from the run's generator (B = 0: starts as the base)
                p.copy_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) / rank)
    return params


def _activate(module: torch.nn.Module, name: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.set_adapter(name)  # also marks only this set trainable; the trainer sets requires_grad after


class LoraTrainer(DreamBoothTrainer):
    """DreamBooth steps on one named adapter set of the shared base model (``unet`` is ``sd.unet``)."""

    def __init__(self, sd, name: str, params: list[torch.nn.Parameter], cfg: DreamBoothConfig, *,
                 class_latents, generator: torch.Generator):
        self.adapter = name
        _activate(sd.unet, name)
        if cfg.train_text_encoder:
            _activate(sd.text_encoder, name)
        super().__init__(sd, sd.unet, sd.text_encoder, cfg, class_latents=class_latents, generator=generator,
                         params=params)

    def activate(self) -> None:
        _activate(self.unet, self.adapter)
        if self.cfg.train_text_encoder:
            _activate(self.text_encoder, self.adapter)

    def step(self, instance_latents: torch.Tensor, class_index=None) -> float:
        self.unfreeze()  # several trainers share the modules: make this one's adapters act, and train
        return super().step(instance_latents, class_index)

    def freeze(self) -> None:
        self.activate()
        for p in self.params:
            p.requires_grad_(False)
        self.unet.eval()
        self.text_encoder.eval()

    def unfreeze(self) -> None:
        self.activate()
        for p in self.params:
            p.requires_grad_(True)
        self.unet.train()
        self.text_encoder.train(self.cfg.train_text_encoder)

    def copy_from(self, other: DreamBoothTrainer) -> None:
        if other is not self:
            torch._foreach_copy_([p.data for p in self.params], [p.detach() for p in other.params])


def lora_trainers(sd, names: tuple[str, ...], cfg: DreamBoothConfig, *, rank: int, class_latents,
                  generator: torch.Generator) -> list[LoraTrainer]:
    """One :class:`LoraTrainer` per name, each with its own adapter set on ``sd``'s UNet (+ text encoder when
    ``cfg.train_text_encoder``); adapters a previous call left on ``sd`` are removed first."""
    remove_lora(sd)
    unet_targets = UNET_TARGETS + _present(sd.unet, UNET_ADDED_KV)
    sets = []
    for name in names:
        params = _add(sd.unet, name, unet_targets, rank, generator)
        if cfg.train_text_encoder:
            params += _add(sd.text_encoder, name, _present(sd.text_encoder, TEXT_TARGETS), rank, generator)
        sets.append((name, params))
    setattr(sd, _ATTR, list(names))
    return [LoraTrainer(sd, name, params, cfg, class_latents=class_latents, generator=generator)
            for name, params in sets]


def adapter_megabytes(trainers) -> float:
    """Bytes of the adapters (weights only) of some trainers, in MiB."""
    seen = {id(p): p for t in trainers for p in t.params}
    return sum(p.numel() * p.element_size() for p in seen.values()) / 2**20


__all__ = ["LoraSurrogateOptions", "LoraTrainer", "adapter_megabytes", "lora_trainers", "remove_lora"]
