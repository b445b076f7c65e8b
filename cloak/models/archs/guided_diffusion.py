"""OpenAI guided-diffusion UNet (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021)
and the Gaussian-diffusion sampling math that DiffPure-style purifiers need, in plain PyTorch.

Licence facts:
* This file is cloak's own code. It follows the architecture and diffusion math of
  openai/guided-diffusion (``guided_diffusion/unet.py``, ``gaussian_diffusion.py``, ``respace.py``;
  MIT licence, Copyright (c) 2021 OpenAI) closely enough that the published checkpoints load
  strictly, but no upstream code text is copied.
* The published ``256x256_diffusion_uncond.pt`` weights are released by OpenAI with that repository
  (MIT). cloak ships no weights.

What is here:
* ``UNetModel``: the UNet; the defaults of ``build_guided_diffusion`` are the 256² unconditional
  ImageNet model (learned variance: 6 output channels, ε then the variance interpolation values).
* ``GaussianDiffusion``: linear β schedule, optional timestep respacing, ``q_sample``, ancestral
  ``p_sample`` with learned-range variance and ``clip_denoised``, and ``sdedit`` (noise to t*, sample back).
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GUIDED_DIFFUSION_256_UNCOND_CONFIG",
    "GaussianDiffusion",
    "UNetModel",
    "build_guided_diffusion",
    "linear_beta_schedule",
    "load_guided_diffusion",
    "sdedit",
    "space_timesteps",
]

# The published 256x256_diffusion_uncond.pt, from the upstream README's flags
# (--attention_resolutions 32,16,8 --image_size 256 --learn_sigma True --num_channels 256
#  --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_scale_shift_norm True).
# attention_resolutions are downsampling factors: 256/32, 256/16, 256/8.
GUIDED_DIFFUSION_256_UNCOND_CONFIG: dict[str, Any] = {
    "image_size": 256,
    "in_channels": 3,
    "model_channels": 256,
    "out_channels": 6,
    "num_res_blocks": 2,
    "attention_resolutions": (8, 16, 32),
    "dropout": 0.0,
    "channel_mult": (1, 1, 2, 2, 4, 4),
    "num_classes": None,
    "num_heads": 4,
    "num_head_channels": 64,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "use_new_attention_order": False,
}


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups that always normalises in float32 (the model may run in half precision)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin] halves, as the weights expect."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepBlock(nn.Module):
    """Marker base class: a block whose forward also takes the timestep embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands the timestep embedding to the children that take one."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Stride-2 conv (or 2×2 average pool); used only when ``resblock_updown`` is off."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest ×2, optionally followed by a 3×3 conv; used only when ``resblock_updown`` is off."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    With ``use_scale_shift_norm`` the embedding gives a scale and shift applied after the second norm
    (FiLM); otherwise it is added. ``resample='up'|'down'`` makes the block change resolution, both in
    the main path (between the first norm/activation and the first conv) and in the skip path.
    The Sequential layouts are fixed by the checkpoint's key names (in_layers.2, out_layers.3, ...).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        resample: str | None = None,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)),  # block starts as identity
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
        # Resample after the activation but before the conv, so the conv runs at the new resolution.
        h = conv(self._resample(norm_act(x)))
        x = self._resample(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels with one fused 1×1 (Conv1d) qkv projection.

    Head layout of the qkv channels: ``legacy`` (the published checkpoints, QKVAttentionLegacy) splits
    heads first, then q/k/v within each head; the new order splits q/k/v first, then heads.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, legacy_order: bool = True):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.legacy_order = legacy_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # B × 3C × T
        n, d, t = self.num_heads, c // self.num_heads, x.shape[-1]
        if self.legacy_order:
            q, k, v = qkv.reshape(b, n, 3 * d, t).split(d, dim=2)  # each B × n × d × T
        else:
            q, k, v = (z.reshape(b, n, d, t) for z in qkv.chunk(3, dim=1))
        # Upstream scales q and k by d^-1/4 each and softmaxes in float32; SDPA's 1/sqrt(d) is the same
        # product. Compute in float32 for the same reason upstream does: half-precision overflow.
        a = F.scaled_dot_product_attention(
            q.transpose(-1, -2).float(), k.transpose(-1, -2).float(), v.transpose(-1, -2).float()
        ).to(qkv.dtype)
        h = a.transpose(-1, -2).reshape(b, c, t)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


def _zeroed(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters (upstream's init for output convs; loaded weights replace it)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class UNetModel(nn.Module):
    """The guided-diffusion UNet (2-D only).

    Args:
        image_size: nominal input size (kept for reference; the network is fully convolutional).
        in_channels: input channels.
        model_channels: base width; the timestep MLP is 4× this.
        out_channels: 3 for fixed variance, 6 when the variance is learned (ε, then v in [-1, 1]).
        num_res_blocks: residual blocks per level on the way down (one more per level on the way up).
        attention_resolutions: downsampling factors (1, 2, 4, …) at which attention blocks are used.
        dropout: dropout in residual blocks.
        channel_mult: width multiplier per level.
        conv_resample: learned convs in the plain up/down layers (when ``resblock_updown`` is off).
        num_classes: class-conditional when set (adds ``label_emb``).
        num_heads: heads per attention block when ``num_head_channels`` is -1.
        num_head_channels: fixed width per head (overrides ``num_heads``).
        num_heads_upsample: heads on the way up; -1 means ``num_heads``.
        use_scale_shift_norm: FiLM-style timestep conditioning in residual blocks.
        resblock_updown: resample with residual blocks instead of plain up/down layers.
        use_new_attention_order: split q/k/v before heads (False for the published 256² models).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attn_ds = set(attention_resolutions)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        emb_ch = 4 * model_channels

        def res(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(cin, emb_ch, dropout, cout, use_scale_shift_norm=use_scale_shift_norm, resample=resample)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, legacy_order=not use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_ch)

        # Way down. `skips` records each input block's output width, consumed in reverse on the way up.
        ch = first_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, "down") if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skips.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        # Way up: one block per skip, i.e. num_res_blocks + 1 per level; the last of a level upsamples.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, "up") if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), _zeroed(nn.Conv2d(first_ch, out_channels, 3, padding=1)))

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from noisy images.

        Args:
            x: B×C×H×W noisy images in [-1, 1] units; H, W divisible by 2**(levels-1).
            timesteps: B timesteps of the original 1000-step process (respaced samplers map theirs).
            y: B class labels, only for class-conditional models.

        Returns:
            B×out_channels×H×W: ε prediction, followed by the variance values when learned.
        """
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass y if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        dtype = self.input_blocks[0][0].weight.dtype
        h = x.to(dtype)
        emb = emb.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)


def build_guided_diffusion(**config: Any) -> UNetModel:
    """Build a random-weight UNet: the published 256² unconditional shape, with any argument overridden.

    Example (tiny, for tests): ``build_guided_diffusion(image_size=16, model_channels=32, channel_mult=(1, 2),
    num_res_blocks=1, attention_resolutions=(2,), num_head_channels=16)``.
    """
    return UNetModel(**{**GUIDED_DIFFUSION_256_UNCOND_CONFIG, **config})


def load_guided_diffusion(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", **config: Any
) -> UNetModel:
    """Load a guided-diffusion checkpoint (a plain state dict) strictly; eval mode, weight gradients off.

    Args:
        path: e.g. ``256x256_diffusion_uncond.pt``, read with ``weights_only=True``.
        device: where to put the network.
        **config: architecture overrides for checkpoints of another shape (e.g. tiny test models).

    Raises:
        ModelUnavailableError: the file is missing, unreadable, or does not match the architecture.
    """
    from cloak.errors import ModelUnavailableError

    hint = "cloak models pull guided-diffusion-256-uncond"
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:  # missing, corrupt, or not weights-only
        raise ModelUnavailableError(f"cannot read guided-diffusion weights at {path}: {e}", hint=hint) from e
    if not isinstance(state, dict):
        raise ModelUnavailableError(f"{path} is not a guided-diffusion state dict", hint=hint)
    with torch.device("meta"):  # skip the random init that the weights replace
        model = build_guided_diffusion(**config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelUnavailableError(f"{path} does not match the guided-diffusion architecture: {e}") from e
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Diffusion math
# --------------------------------------------------------------------------------------------------


def linear_beta_schedule(num_timesteps: int = 1000) -> Tensor:
    """Ho et al.'s linear β schedule, stretched so any step count spans the same 1000-step range (float64)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Pick the timesteps to keep when respacing, as guided-diffusion's ``timestep_respacing`` does.

    ``section_counts`` splits the process into equal sections and keeps that many evenly spread steps in
    each ("250" keeps 250 of 1000, including 0 and 999); ``"ddimN"`` keeps every k-th step from 0 for the
    integer stride k that gives exactly N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[4:])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"no integer stride gives exactly {want} of {num_timesteps} steps")
        section_counts = [int(s) for s in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    n = len(section_counts)
    base, extra = divmod(num_timesteps, n)
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = base + (1 if i < extra else 0)  # earlier sections absorb the remainder
        if count > size:
            raise ValueError(f"cannot keep {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Python's round (half to even) matches upstream's choice of steps.
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))


class GaussianDiffusion:
    """DDPM forward process and ancestral sampler for ε-predicting models, optionally respaced.

    Tables are float64 (as upstream, for accuracy) and indexed by the sampler's own step index
    t ∈ [0, num_timesteps); t = 0 is the first noising step. With respacing, the kept original
    timesteps get new βs computed from their ᾱ values, so ᾱ at a kept step is unchanged, and the
    model is called with the original timestep (``timestep_map``).

    Args:
        betas: the base process's βs (default: linear, 1000 steps).
        use_timesteps: original timesteps to keep (e.g. ``space_timesteps(1000, "250")``); None keeps all.
    """

    def __init__(self, betas: Tensor | Sequence[float] | None = None, use_timesteps: Iterable[int] | None = None):
        base = linear_beta_schedule(1000) if betas is None else torch.as_tensor(betas, dtype=torch.float64)
        if base.ndim != 1 or not bool(((base > 0) & (base <= 1)).all()):
            raise ValueError("betas must be a 1-D sequence in (0, 1]")
        self.original_num_steps = len(base)
        if use_timesteps is None:
            self.timestep_map = torch.arange(len(base))
            betas64 = base
        else:
            kept = sorted(set(int(t) for t in use_timesteps))
            if not kept or kept[0] < 0 or kept[-1] >= len(base):
                raise ValueError(f"use_timesteps must lie in [0, {len(base)})")
            abar = torch.cumprod(1.0 - base, dim=0)[kept]
            prev = torch.cat([abar.new_ones(1), abar[:-1]])
            betas64 = 1.0 - abar / prev  # the β that makes one respaced step span the skipped ones
            self.timestep_map = torch.tensor(kept)
        self.betas = betas64
        self.num_timesteps = len(betas64)

        alphas = 1.0 - betas64
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([alphas.new_ones(1), self.alphas_cumprod[:-1]])
        ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas64 * (1.0 - ac_prev) / (1.0 - ac)
        # The variance is 0 at t = 0; its log is clipped by reusing the t = 1 value there.
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([pv[1:2], pv[1:]]) if len(pv) > 1 else pv.clamp_min(1e-20)
        )
        self.posterior_mean_coef1 = betas64 * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)
        self.log_betas = betas64.log()
        # Fixed-large variance, for models without learned variance (3 output channels).
        self.fixed_large_log_variance = torch.log(torch.cat([pv[1:2], betas64[1:]]) if len(pv) > 1 else betas64)

    @classmethod
    def respaced(cls, section_counts: str | int | Sequence[int], betas: Tensor | None = None) -> GaussianDiffusion:
        """Shortcut: ``GaussianDiffusion.respaced("250")`` is the 1000-step linear process kept at 250 steps."""
        base = linear_beta_schedule(1000) if betas is None else betas
        return cls(base, space_timesteps(len(base), section_counts))

    @staticmethod
    def _at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """Per-sample table values at step t, shaped to broadcast against ``like`` (float32 on its device)."""
        vals = table[t.cpu()].to(device=like.device, dtype=torch.float32)
        return vals.view(-1, *([1] * (like.ndim - 1)))

    def _steps(self, t: int | Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.long)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def q_sample(
        self, x0: Tensor, t: int | Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I); t counts from 0 (= one noising step)."""
        t = self._steps(t, x0)
        if noise is None:
            noise = _randn_like(x0, generator)
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def model_output(self, model: Callable[..., Tensor], x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        """Call the network with the original-process timestep that step t stands for."""
        return model(x, self.timestep_map[t.cpu()].to(x.device), **model_kwargs)

    def p_mean_variance(
        self, model: Callable[..., Tensor], x: Tensor, t: int | Tensor, clip_denoised: bool = True, **model_kwargs: Any
    ) -> dict[str, Tensor]:
        """Mean, log-variance and predicted x_0 of p(x_{t-1} | x_t) for an ε-predicting model.

        A 2C-channel output is [ε, v] with learned-range variance: log σ² = ((v+1)/2)·log β_t
        + (1 − (v+1)/2)·log β̃_t (β̃ = posterior variance). A C-channel output uses the fixed-large variance.
        """
        t = self._steps(t, x)
        out = self.model_output(model, x, t, **model_kwargs)
        c = x.shape[1]
        if out.shape[1] == 2 * c:
            eps, v = out.split(c, dim=1)
            frac = (v + 1) / 2
            log_var = frac * self._at(self.log_betas, t, x) + (1 - frac) * self._at(
                self.posterior_log_variance_clipped, t, x
            )
        elif out.shape[1] == c:
            eps = out
            log_var = self._at(self.fixed_large_log_variance, t, x).expand_as(x)
        else:
            raise ValueError(f"model returned {out.shape[1]} channels for a {c}-channel input")
        x0 = (
            self._at(self.sqrt_recip_alphas_cumprod, t, x) * x - self._at(self.sqrt_recipm1_alphas_cumprod, t, x) * eps
        )
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = self._at(self.posterior_mean_coef1, t, x) * x0 + self._at(self.posterior_mean_coef2, t, x) * x
        return {"mean": mean, "log_variance": log_var, "pred_xstart": x0}

    def p_sample(
        self,
        model: Callable[..., Tensor],
        x: Tensor,
        t: int | Tensor,
        generator: torch.Generator | None = None,
        clip_denoised: bool = True,
        **model_kwargs: Any,
    ) -> Tensor:
        """One ancestral step x_t → x_{t-1}; no noise is added at t = 0 (the last step returns the mean)."""
        t = self._steps(t, x)
        p = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, **model_kwargs)
        if not bool((t != 0).any()):
            return p["mean"]
        nonzero = (t != 0).to(device=x.device, dtype=p["mean"].dtype).view(-1, *([1] * (x.ndim - 1)))
        return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * _randn_like(x, generator)

    def sdedit(
        self,
        model: Callable[..., Tensor],
        x: Tensor,
        t_star: int,
        generator: torch.Generator | None = None,
        clip_denoised: bool = True,
        progress: Callable[[int, int], None] | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """SDEdit / DiffPure: noise x to t* steps, then sample back to step 0.

        ``t_star`` counts steps of this (possibly respaced) process, like DiffPure's ``t``: x is diffused
        with ᾱ at index t*−1, then ``p_sample`` runs at t*−1, …, 0. t* = 0 returns x unchanged.
        Gradients flow if the caller enables them (adaptive attacks differentiate through this).

        Args:
            model: the UNet (called as ``model(x, timesteps, **model_kwargs)``).
            x: B×C×H×W images in [-1, 1].
            t_star: number of noising steps, 0 ≤ t* ≤ ``num_timesteps``.
            generator: source of all noise (seeded runs repeat exactly on the same device).
            clip_denoised: clamp each x_0 prediction to [-1, 1], as DiffPure does.
            progress: called with (steps done, total) after each sampling step.
        """
        if not 0 <= t_star <= self.num_timesteps:
            raise ValueError(f"t_star must be in [0, {self.num_timesteps}], got {t_star}")
        if t_star == 0:
            return x
        h = self.q_sample(x, t_star - 1, generator=generator)
        for done, t in enumerate(reversed(range(t_star)), start=1):
            h = self.p_sample(model, h, t, generator=generator, clip_denoised=clip_denoised, **model_kwargs)
            if progress is not None:
                progress(done, t_star)
        return h


def sdedit(
    model: Callable[..., Tensor],
    x: Tensor,
    t_star: int,
    generator: torch.Generator | None = None,
    *,
    diffusion: GaussianDiffusion | None = None,
    clip_denoised: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """SDEdit with ``diffusion`` (default: the 1000-step linear process); see ``GaussianDiffusion.sdedit``."""
    diffusion = diffusion if diffusion is not None else GaussianDiffusion()
    return diffusion.sdedit(model, x, t_star, generator, clip_denoised=clip_denoised, progress=progress)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (so a CPU generator gives the
    same noise whatever device x is on), then moved to x."""
    device = generator.device if generator is not None else x.device
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    return torch.randn(x.shape, generator=generator, device=device, dtype=dtype).to(x.device)
