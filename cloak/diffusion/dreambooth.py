"""DreamBooth with prior preservation — the one fine-tuning loop that ASPL, FSMG, SimAC, MetaCloak,
DLADiff, APDM and ``attack dreambooth`` share (protect.md §0, attack.md §1).

One step: ``L = L_dn(θ, x_inst, c_inst) + λ·L_dn(θ, x_cls, c_cls)`` on one concatenated batch with
independent (t, ε) per sample, AdamW (β 0.9/0.999, wd 1e-2, eps 1e-8), grad-norm clip 1.0, UNet and
optionally the text encoder trained.

Precision (cloak.diffusion.precision): the trained weights and AdamW's state stay fp32 ("master"),
whatever ``--dtype`` the base model was loaded in, and compute runs under autocast (to ``--dtype`` when it
is bf16/fp16, bf16 on CUDA otherwise), so tiny learning rates (5e-7) really move the weights.
``bf16_weights=True`` (``--compat``) reproduces the released Anti-DreamBooth code, which trains bf16
weights directly and loses most updates to rounding [Q].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cloak.diffusion.loss import LatentCache, denoising_loss, encode_latents, encode_prompts
from cloak.diffusion.precision import autocast_dtype, autocast_for, to_master


@dataclass
class DreamBoothConfig:
    lr: float = 5e-7
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    prior_weight: float = 1.0
    train_text_encoder: bool = True
    instance_prompt: str = "a photo of sks person"
    class_prompt: str = "a photo of person"
    bf16_weights: bool = False  # [Q] --compat: train bf16 weights as the released code does


def make_adamw(params, cfg: DreamBoothConfig) -> torch.optim.Optimizer:
    """AdamW, fused where the build supports it (several times faster per step, on CPU too)."""
    params = list(params)
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero AdamW's moments and step counts in place: a fresh optimizer without reallocating."""
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()


class DreamBoothTrainer:
    """Fine-tunes ``unet`` (+ ``text_encoder``) in place; the caller owns (and may copy) the modules.

    ``params``: train only these (adapters); the modules' other weights stay frozen in their dtype.
    """

    def __init__(self, sd, unet, text_encoder, cfg: DreamBoothConfig, *, class_latents: LatentCache | None,
                 generator: torch.Generator, params: list[torch.nn.Parameter] | None = None):
        self.sd = sd
        self.unet = unet
        self.text_encoder = text_encoder
        self.cfg = cfg
        self.class_latents = class_latents
        self.generator = generator
        if cfg.bf16_weights and params is None:
            unet.to(dtype=torch.bfloat16)
            text_encoder.to(dtype=torch.bfloat16)
        # The base model's dtype is the run's --dtype: compute is autocast to it, weights stay master.
        self.run_dtype = sd.unet.dtype
        self.compute_dtype = autocast_dtype(next(unet.parameters()).device, self.run_dtype)
        if params is None:
            unet.requires_grad_(True)
            unet.train()
            text_encoder.requires_grad_(cfg.train_text_encoder)
            text_encoder.train(cfg.train_text_encoder)
            params = list(unet.parameters())
            if cfg.train_text_encoder:
                params += list(text_encoder.parameters())
        else:
            unet.requires_grad_(False)
            text_encoder.requires_grad_(False)
            unet.train()
            text_encoder.train(cfg.train_text_encoder)
            for p in params:
                p.requires_grad_(True)
        to_master(params, cfg.bf16_weights)
        self.params = params
        self.optimizer = make_adamw(params, cfg)
        self._frozen_prompts: torch.Tensor | None = None
        self.last_loss = float("nan")

    def _prompt_states(self, n_inst: int, n_cls: int) -> torch.Tensor:
        prompts = [self.cfg.instance_prompt] * n_inst + [self.cfg.class_prompt] * n_cls
        if self.cfg.train_text_encoder:
            return encode_prompts(self.sd.tokenizer, self.text_encoder, prompts)
        if self._frozen_prompts is None or self._frozen_prompts.shape[0] != len(prompts):
            with torch.no_grad():
                self._frozen_prompts = encode_prompts(self.sd.tokenizer, self.text_encoder, prompts)
        return self._frozen_prompts

    def step(self, instance_latents: torch.Tensor, class_index: torch.Tensor | list[int] | None = None) -> float:
        """One optimizer step on the given instance latents and class images ``class_index``."""
        latents = [instance_latents]
        n_cls = 0
        use_prior = self.class_latents is not None and class_index is not None and self.cfg.prior_weight > 0
        if use_prior:
            cls = self.class_latents.sample(class_index, self.generator)
            latents.append(cls)
            n_cls = cls.shape[0]
        # fp32 latents into fp32 master weights under autocast; bf16 only for --compat's bf16 weights.
        batch = torch.cat([z.to(self.params[0].dtype) for z in latents])
        n_inst = instance_latents.shape[0]
        with autocast_for(batch.device, self.run_dtype):
            states = self._prompt_states(n_inst, n_cls).to(batch.dtype)
            per_image = denoising_loss(self.unet, self.sd.noise_scheduler, batch, states, self.generator,
                                       reduction="none")
        loss = per_image[:n_inst].mean()
        if use_prior:
            loss = loss + self.cfg.prior_weight * per_image[n_inst:].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        # Free the weight gradients now, not at the next step: between steps (PGD, the other trainer's steps)
        # they would hold a third full copy of the weights for nothing.
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = float(loss.detach())
        return self.last_loss

    @torch.no_grad()
    def encode_instances(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of (possibly changing) instance images: a fresh posterior sample each call."""
        return encode_latents(self.sd.vae, pixels, self.generator)

    def reset_optimizer(self) -> None:
        """A fresh AdamW state (moments and step counts zeroed in place)."""
        reset_optimizer_state(self.optimizer)

    def release_optimizer_state(self) -> None:
        """Drop AdamW's moments and step counts; the next step allocates them afresh (zeros, step 0: what a
        reset gives, and what a new optimizer per call gives in the released loops). For callers whose
        optimizer starts over at every call (ASPL's f' and f): between calls the moments would hold two
        weight-sized buffers through the PGD steps for nothing."""
        self.optimizer.state.clear()

    def copy_from(self, other: DreamBoothTrainer) -> None:
        """These weights ← ``other``'s, in place (ASPL's f' ← copy(f)); adapter trainers copy their adapters."""
        copy_params(other.unet, self.unet)
        copy_params(other.text_encoder, self.text_encoder)

    def freeze(self) -> None:
        """Switch weight gradients off (PGD against this model needs gradients for the image only)."""
        self.unet.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.unet.eval()
        self.text_encoder.eval()

    def unfreeze(self) -> None:
        self.unet.requires_grad_(True)
        self.unet.train()
        if self.cfg.train_text_encoder:
            self.text_encoder.requires_grad_(True)
            self.text_encoder.train()


class ParamBuffer:
    """A preallocated copy of a module's parameters: snapshot/restore without ``deepcopy`` in a loop."""

    def __init__(self, *modules: torch.nn.Module):
        self.tensors = [p.detach().clone() for m in modules for p in m.parameters()]

    @torch.no_grad()
    def save(self, *modules: torch.nn.Module) -> None:
        torch._foreach_copy_(self.tensors, [p.detach() for m in modules for p in m.parameters()])

    @torch.no_grad()
    def load(self, *modules: torch.nn.Module) -> None:
        torch._foreach_copy_([p.data for m in modules for p in m.parameters()], self.tensors)


@torch.no_grad()
def copy_params(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy ``src``'s weights into ``dst`` (same architecture) in place."""
    torch._foreach_copy_([p.data for p in dst.parameters()], [p.detach() for p in src.parameters()])
