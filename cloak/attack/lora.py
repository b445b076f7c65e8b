"""DreamBooth with LoRA adapters — the low-rank variant of the attack (attack.md §2).

[C: Anti-DreamBooth train_dreambooth_lora.py]: LoRA on the UNet attention projections
``to_q/to_k/to_v/to_out.0`` (plus ``add_k_proj/add_v_proj`` where the UNet has them), optionally on the
text encoder's ``q/k/v/out_proj`` with the same rank; only the adapter weights train. Loss, batches,
prior preservation, checkpoints and sampling are DreamBooth's (``cloak.attack.dreambooth``).

No LoRA hyper-parameters are published for DLADiff's LoRA transfer test, so cloak's defaults are
[PROP]: rank 4, α = rank, lr 1e-4 (the released script's argparse default is 5e-4), AdamW, batch 1
(+1 class image), 1000 steps, prior preservation with 200 class images (λ = 1), UNet adapters only.

``--save-model DIR`` writes the adapters only — ``DIR/pytorch_lora_weights.safetensors`` in diffusers'
LoRA format (with α in its metadata), loadable with ``pipe.load_lora_weights(DIR)`` on the base model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from pydantic import Field

from cloak.attack.base import AttackResult
from cloak.attack.dreambooth import DreamBooth, DreamBoothOptions
from cloak.diffusion.dreambooth import DreamBoothConfig, DreamBoothTrainer
from cloak.io.images import ImageSet

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_ADDED_KV = ("add_k_proj", "add_v_proj")  # only in UNets with added-KV attention
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_FILE = "pytorch_lora_weights.safetensors"


class LoraOptions(DreamBoothOptions):
    rank: int = Field(4, ge=1, description="LoRA rank (UNet and text encoder)")
    alpha: float | None = Field(None, gt=0, description="LoRA α (update scaled by α/rank); none = rank")
    lr: float = Field(1e-4, gt=0, description="learning rate (AdamW, constant)")
    batch_size: int = Field(1, ge=1, description="instance images per step (as many class images join)")
    train_text_encoder: bool = Field(False, description="also put LoRA adapters on the text encoder")
    checkpoint_every: int = Field(100, ge=0, description="write a resumable checkpoint (adapters + optimizer) to "
                                  "OUTPUT/.checkpoint every N training steps (--resume continues; 0 = never)")


class AdapterTrainer(DreamBoothTrainer):
    """DreamBooth's step, training only ``params`` (the adapters); the base weights stay frozen."""

    def __init__(self, sd, unet, text_encoder, cfg: DreamBoothConfig, *, params: list[torch.nn.Parameter],
                 class_latents, generator: torch.Generator):
        # The adapters are the trained (fp32 master) weights; the base stays frozen in the run's dtype.
        super().__init__(sd, unet, text_encoder, cfg, class_latents=class_latents, generator=generator,
                         params=params)

    def unfreeze(self) -> None:
        for p in self.params:
            p.requires_grad_(True)
        self.unet.train()
        if self.cfg.train_text_encoder:
            self.text_encoder.train()


def add_lora(module: torch.nn.Module, targets: tuple[str, ...], rank: int, alpha: float,
             generator: torch.Generator):
    """Inject LoRA adapters (B = 0, so the model starts unchanged) and return (config, adapter params).

    peft draws the initial A from the global generator; it is redrawn here from the run's generator
    (same distribution, N(0, 1/r²) as peft's "gaussian" init) so a seed fixes the run.
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):  # leave the global generator as it was
        module.add_adapter(config)
    params = [p for name, p in module.named_parameters() if ".lora_" in name]
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) / rank)
    return config, params


def _present(module: torch.nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    leaves = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()}
    return tuple(n for n in names if n in leaves)


class Lora(DreamBooth):
    paper = "Hu et al., LoRA, ICLR 2022; DreamBooth-LoRA as in Anti-DreamBooth train_dreambooth_lora.py"
    implements = ("DreamBooth with prior preservation training only rank-r LoRA adapters on the UNet attention "
                  "(optionally the text encoder); --save-model keeps the adapters as one safetensors file")
    proposals = ("rank", "alpha", "lr", "batch_size", "steps", "class_images", "train_text_encoder")
    notes = ("DLADiff reports a LoRA transfer test without hyper-parameters: every training default here is "
             "[PROP]. The released Anti-DreamBooth LoRA script defaults to lr 5e-4 (-o lr=5e-4). The saved "
             "adapter loads with diffusers: pipe.load_lora_weights(DIR) on the same base model.")

    Options = LoraOptions
    tiny_options = {"class_images": 2, "steps": 2, "num_images": 1, "sample_steps": 2,
                    "prompts": ["a photo of sks person"]}

    def config(self) -> DreamBoothConfig:
        # The adapters train in fp32 (the released LoRA script too); --compat's bf16 weights are a
        # quirk of the full fine-tune only.
        return dataclasses.replace(super().config(), bf16_weights=False)

    def make_trainer(self, sd, unet, text_encoder, cfg, class_latents) -> DreamBoothTrainer:
        return AdapterTrainer(sd, unet, text_encoder, cfg, params=self._adapter_params, class_latents=class_latents,
                              generator=self.ctx.generator)

    def __call__(self, images: ImageSet) -> AttackResult:
        ctx, o = self.ctx, self.opts
        sd = ctx.models.sd(ctx.model, role="base")
        # Copies: the adapters are injected into these modules, never into the shared base model.
        unet, text_encoder = copy.deepcopy(sd.unet), copy.deepcopy(sd.text_encoder)
        alpha = float(o.alpha or o.rank)
        unet_targets = UNET_TARGETS + _present(unet, UNET_ADDED_KV)
        unet_cfg, params = add_lora(unet, unet_targets, o.rank, alpha, ctx.generator)
        te_cfg = None
        if o.train_text_encoder:
            te_cfg, te_params = add_lora(text_encoder, TEXT_TARGETS, o.rank, alpha, ctx.generator)
            params += te_params
        self._adapter_params = params
        result = self.train(images, sd, unet, text_encoder, self.config())
        n_params = sum(p.numel() for p in params)
        result.summary.update({"lora_rank": o.rank, "lora_alpha": alpha, "lora_targets": list(unet_targets),
                               "lora_text_encoder": o.train_text_encoder, "lora_parameters": n_params})
        result.save = lambda target, note: save_lora(target, unet, text_encoder if te_cfg else None, unet_cfg, te_cfg,
                                                     {**note, "lora_rank": o.rank, "lora_alpha": alpha})
        return result


def save_lora(target: Path, unet, text_encoder, unet_cfg, te_cfg, note: dict) -> Path:
    """The adapters alone, in diffusers' LoRA format, written atomically into ``target``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from cloak.io.output import new_model_dir

    with new_model_dir(target) as staging:
        unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        te_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)) if te_cfg else None
        StableDiffusionPipeline.save_lora_weights(
            staging, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers, weight_name=LORA_FILE,
            unet_lora_adapter_metadata=unet_cfg.to_dict(),
            text_encoder_lora_adapter_metadata=te_cfg.to_dict() if te_cfg else None)
        meta = {**note, "format": "diffusers LoRA (load with pipe.load_lora_weights(DIR) on the base model)",
                "file": LORA_FILE}
        (staging / "cloak_model.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return target
