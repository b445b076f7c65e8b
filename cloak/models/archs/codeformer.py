"""CodeFormer blind face restoration network (Zhou et al., "Towards Robust Blind Face Restoration with
Codebook Lookup Transformer", NeurIPS 2022), rebuilt in plain PyTorch for cloak.

Licence facts:
* This file is cloak's own code. It follows the architecture of sczhou/CodeFormer
  (``basicsr/archs/codeformer_arch.py`` and ``vqgan_arch.py``) closely enough that the published
  ``codeformer.pth`` loads strictly, but no upstream code text is copied.
* The published CodeFormer weights (and the upstream code) are under the S-Lab License 1.0, which
  allows non-commercial use only. cloak ships no weights; a user who pulls ``codeformer.pth`` accepts
  that licence.

Layout of the network (names are the checkpoint's key prefixes):
``encoder`` (VQGAN encoder, 512² → 16²×256) → ``feat_emb`` + ``position_emb`` + ``ft_layers`` (9
pre-norm transformer layers) → ``idx_pred_layer`` (logits over the 1024 codes) → ``quantize``
(codebook lookup) → ``generator`` (VQGAN decoder) with ``fuse_convs_dict`` (controllable feature
transform, weighted by the fidelity weight ``w``) adding encoder features back at 32…256 px.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CODEFORMER_CONFIG",
    "CodeFormer",
    "build_codeformer",
    "load_codeformer",
]

# The published codeformer.pth (inference_codeformer.py builds it with these values).
CODEFORMER_CONFIG: dict[str, Any] = {
    "img_size": 512,
    "nf": 64,
    "ch_mult": (1, 2, 2, 4, 4, 8),
    "res_blocks": 2,
    "attn_resolutions": (16,),
    "codebook_size": 1024,
    "emb_dim": 256,
    "dim_embd": 512,
    "n_head": 8,
    "n_layers": 9,
    "connect_list": ("32", "64", "128", "256"),
}


def _norm(channels: int) -> nn.GroupNorm:
    # VQGAN convention: 32 groups, eps 1e-6 (not PyTorch's default 1e-5).
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm → swish → conv, twice), 1×1 skip when widths differ."""

    def __init__(self, in_ch: int, out_ch: int | None = None):
        super().__init__()
        out_ch = in_ch if out_ch is None else out_ch
        self.norm1 = _norm(in_ch)
        self.conv1 = _conv3(in_ch, out_ch)
        self.norm2 = _norm(out_ch)
        self.conv2 = _conv3(out_ch, out_ch)
        # Only present when the width changes, exactly as in the checkpoint.
        if in_ch != out_ch:
            self.conv_out = nn.Conv2d(in_ch, out_ch, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_out(x) if hasattr(self, "conv_out") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with separate 1×1 q/k/v convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # B×C×H×W → B×1×HW×C (one head)
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        # SDPA's default 1/sqrt(C) scale is the one the network was trained with.
        a = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        a = a.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """Stride-2 3×3 conv; pads one pixel right/bottom only (the VQGAN/taming convention)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """VQGAN encoder as one flat ``blocks`` list (the checkpoint indexes blocks by position).

    ``taps`` maps a resolution to the block index whose output CodeFormer keeps for fusion: the last
    residual block of that resolution.
    """

    def __init__(
        self,
        in_ch: int,
        nf: int,
        emb_dim: int,
        ch_mult: Sequence[int],
        res_blocks: int,
        img_size: int,
        attn_resolutions: Iterable[int],
    ):
        super().__init__()
        attn = set(attn_resolutions)
        blocks: list[nn.Module] = [_conv3(in_ch, nf)]
        self.taps: dict[int, int] = {}
        res, ch = img_size, nf
        for level, mult in enumerate(ch_mult):
            for _ in range(res_blocks):
                blocks.append(ResBlock(ch, nf * mult))
                ch = nf * mult
                self.taps[res] = len(blocks) - 1
                if res in attn:
                    blocks.append(AttnBlock(ch))
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(ch))
                res //= 2
        # Bottleneck: res → attention → res, then project to the codebook dimension.
        blocks += [ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch), _norm(ch), _conv3(ch, emb_dim)]
        self.blocks = nn.ModuleList(blocks)


class Generator(nn.Module):
    """VQGAN decoder as one flat ``blocks`` list.

    ``taps`` maps a resolution to the block index after which CodeFormer fuses encoder features:
    the first residual block of that resolution, except at attention resolutions, where upstream uses
    the last one (its table lists 16 px at index 6, after the second residual block).
    """

    def __init__(
        self,
        nf: int,
        emb_dim: int,
        ch_mult: Sequence[int],
        res_blocks: int,
        img_size: int,
        attn_resolutions: Iterable[int],
        out_ch: int = 3,
    ):
        super().__init__()
        attn = set(attn_resolutions)
        res = img_size // 2 ** (len(ch_mult) - 1)
        ch = nf * ch_mult[-1]
        blocks: list[nn.Module] = [_conv3(emb_dim, ch), ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch)]
        self.taps: dict[int, int] = {}
        for level in reversed(range(len(ch_mult))):
            for i in range(res_blocks):
                blocks.append(ResBlock(ch, nf * ch_mult[level]))
                ch = nf * ch_mult[level]
                if i == 0 or res in attn:
                    self.taps[res] = len(blocks) - 1
                if res in attn:
                    blocks.append(AttnBlock(ch))
            if level != 0:
                blocks.append(Upsample(ch))
                res *= 2
        blocks += [_norm(ch), _conv3(ch, out_ch)]
        self.blocks = nn.ModuleList(blocks)


class VectorQuantizer(nn.Module):
    """The codebook. CodeFormer predicts code indices with its transformer, so only lookup is needed."""

    def __init__(self, codebook_size: int, emb_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, emb_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def lookup(self, indices: Tensor, height: int, width: int) -> Tensor:
        """Codes (B × HW) → features (B × emb_dim × H × W)."""
        z = self.embedding(indices)  # B × HW × C
        return z.transpose(1, 2).reshape(indices.shape[0], -1, height, width)


class TransformerSALayer(nn.Module):
    """Pre-norm self-attention + GELU MLP layer; the positional embedding is added to queries and keys only."""

    def __init__(self, dim: int, n_head: int, dim_mlp: int):
        super().__init__()
        # nn.MultiheadAttention gives the checkpoint's in_proj_weight / out_proj names; sequence-first.
        self.self_attn = nn.MultiheadAttention(dim, n_head, dropout=0.0)
        self.linear1 = nn.Linear(dim, dim_mlp)
        self.linear2 = nn.Linear(dim_mlp, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        y = self.norm1(x)
        qk = y + pos
        x = x + self.self_attn(qk, qk, y, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class FuseSFTBlock(nn.Module):
    """Controllable feature transform: predicts a scale and shift from [encoder, decoder] features and
    adds ``w · (dec · scale + shift)`` to the decoder feature."""

    def __init__(self, channels: int):
        super().__init__()
        self.encode_enc = ResBlock(2 * channels, channels)
        self.scale = nn.Sequential(_conv3(channels, channels), nn.LeakyReLU(0.2, True), _conv3(channels, channels))
        self.shift = nn.Sequential(_conv3(channels, channels), nn.LeakyReLU(0.2, True), _conv3(channels, channels))

    def forward(self, enc: Tensor, dec: Tensor, w: float) -> Tensor:
        cond = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(cond) + self.shift(cond))


def _adain(content: Tensor, style: Tensor, eps: float = 1e-5) -> Tensor:
    """Give ``content`` the per-channel mean and std of ``style`` (unbiased variance, as upstream)."""

    def stats(t: Tensor) -> tuple[Tensor, Tensor]:
        flat = t.flatten(2)
        mean = flat.mean(dim=2)[..., None, None]
        std = (flat.var(dim=2) + eps).sqrt()[..., None, None]
        return mean, std

    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


class CodeFormer(nn.Module):
    """CodeFormer at any size; the defaults are the published ``codeformer.pth`` (see ``CODEFORMER_CONFIG``).

    Args:
        img_size: input/output side in pixels (the transformer's position table fixes it).
        nf: base width of the VQGAN encoder/decoder.
        ch_mult: width multiplier per resolution level, from full size down to the latent grid.
        res_blocks: residual blocks per level.
        attn_resolutions: resolutions (px) with attention blocks; default: the latent grid only.
        codebook_size: number of codes.
        emb_dim: code dimension (encoder output channels).
        dim_embd: transformer width; the MLP is twice as wide.
        n_head: attention heads per transformer layer.
        n_layers: transformer layers.
        connect_list: resolutions (as strings, like the checkpoint's ``fuse_convs_dict`` keys) where
            encoder features are fused back into the decoder.
    """

    def __init__(
        self,
        img_size: int = 512,
        nf: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8),
        res_blocks: int = 2,
        attn_resolutions: Sequence[int] | None = None,
        codebook_size: int = 1024,
        emb_dim: int = 256,
        dim_embd: int = 512,
        n_head: int = 8,
        n_layers: int = 9,
        connect_list: Sequence[str | int] = ("32", "64", "128", "256"),
    ):
        super().__init__()
        latent = img_size // 2 ** (len(ch_mult) - 1)
        if latent * 2 ** (len(ch_mult) - 1) != img_size:
            raise ValueError(f"img_size {img_size} is not divisible by 2**{len(ch_mult) - 1}")
        attn = tuple(attn_resolutions) if attn_resolutions is not None else (latent,)
        self.img_size = img_size
        self.latent_size = latent

        self.encoder = Encoder(3, nf, emb_dim, ch_mult, res_blocks, img_size, attn)
        self.quantize = VectorQuantizer(codebook_size, emb_dim)
        self.generator = Generator(nf, emb_dim, ch_mult, res_blocks, img_size, attn)

        # One learned position vector per latent token (256 for 16×16), shared across the batch.
        self.position_emb = nn.Parameter(torch.zeros(latent * latent, dim_embd))
        self.feat_emb = nn.Linear(emb_dim, dim_embd)
        self.ft_layers = nn.Sequential(*[TransformerSALayer(dim_embd, n_head, 2 * dim_embd) for _ in range(n_layers)])
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(dim_embd), nn.Linear(dim_embd, codebook_size, bias=False))

        # Width at each resolution, from the level that resolution belongs to.
        widths = {img_size // 2**level: nf * mult for level, mult in enumerate(ch_mult)}
        self.connect_list = [str(r) for r in connect_list]
        for r in self.connect_list:
            if int(r) not in widths:
                raise ValueError(f"connect_list entry {r} is not a resolution of this network ({sorted(widths)})")
        self.fuse_convs_dict = nn.ModuleDict({r: FuseSFTBlock(widths[int(r)]) for r in self.connect_list})

    def forward(self, x: Tensor, w: float = 0.5, adain: bool = True) -> Tensor:
        """Restore aligned faces.

        Args:
            x: B×3×S×S aligned faces in [-1, 1], S = ``img_size`` (512 for the published weights).
            w: fidelity weight in [0, 1]: 0 trusts the codebook (quality), 1 the input (fidelity).
                Upstream's command line default is 0.5.
            adain: match the looked-up code features' channel statistics to the encoder's (upstream
                inference passes ``adain=True``).

        Returns:
            B×3×S×S restored faces, nominally in [-1, 1]. Not clamped, like upstream's network output;
            clamp when converting to an image.
        """
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"CodeFormer expects {self.img_size}×{self.img_size} aligned faces, got {tuple(x.shape)}")
        fuse_at = {self.encoder.taps[int(r)]: r for r in self.connect_list}
        enc_feats: dict[str, Tensor] = {}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in fuse_at:
                enc_feats[fuse_at[i]] = x
        lq_feat = x  # B × emb_dim × h × w

        # Transformer predicts a code per latent token; tokens are sequence-first (HW × B × D).
        tokens = self.feat_emb(lq_feat.flatten(2).permute(2, 0, 1))
        pos = self.position_emb.unsqueeze(1)
        for layer in self.ft_layers:
            tokens = layer(tokens, pos)
        logits = self.idx_pred_layer(tokens)  # HW × B × codebook
        # Upstream takes top-1 of softmax(logits); argmax of the logits is the same code.
        codes = logits.argmax(dim=-1).transpose(0, 1)  # B × HW
        h, wd = lq_feat.shape[-2:]
        x = self.quantize.lookup(codes, h, wd)
        if adain:
            x = _adain(x, lq_feat)

        # Upstream detaches the encoder features here (a training-stage choice); values are the same,
        # and keeping the graph lets callers differentiate through the fusion path.
        fuse_after = {self.generator.taps[int(r)]: r for r in self.connect_list}
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if w > 0 and i in fuse_after:
                r = fuse_after[i]
                x = self.fuse_convs_dict[r](enc_feats[r], x, w)
        return x


def build_codeformer(**config: Any) -> CodeFormer:
    """Build a random-weight CodeFormer: the published shape, with any argument of ``CodeFormer`` overridden.

    Example (tiny, for tests): ``build_codeformer(img_size=32, nf=32, ch_mult=(1, 2), codebook_size=16,
    emb_dim=8, dim_embd=32, n_head=2, n_layers=1, connect_list=("32",))``.
    """
    return CodeFormer(**{**CODEFORMER_CONFIG, **config})


def load_codeformer(path: str | os.PathLike[str], device: str | torch.device = "cpu", **config: Any) -> CodeFormer:
    """Load CodeFormer weights strictly and return the network in eval mode, with gradients off for weights.

    Args:
        path: a ``codeformer.pth`` style checkpoint: ``{"params_ema": state_dict}`` (or ``"params"``),
            read with ``weights_only=True`` (no unpickling of arbitrary objects).
        device: where to put the network.
        **config: architecture overrides, for checkpoints of another size (e.g. tiny test models).

    Raises:
        ModelUnavailableError: the file is missing, unreadable, or not a CodeFormer checkpoint of this shape.
    """
    from cloak.errors import ModelUnavailableError

    try:
        ckpt = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:  # missing, corrupt, or not weights-only
        raise ModelUnavailableError(
            f"cannot read CodeFormer weights at {path}: {e}", hint="cloak models pull codeformer"
        ) from e
    state = None
    if isinstance(ckpt, dict):
        # EMA weights are what upstream inference uses; plain "params" is the fallback it also accepts.
        state = ckpt.get("params_ema", ckpt.get("params"))
    if not isinstance(state, dict):
        raise ModelUnavailableError(
            f"{path} is not a CodeFormer checkpoint (no 'params_ema' or 'params' entry)",
            hint="cloak models pull codeformer",
        )
    with torch.device("meta"):  # no time spent on random init that the weights replace
        model = build_codeformer(**config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelUnavailableError(f"{path} does not match the CodeFormer architecture: {e}") from e
    return model.to(device).eval().requires_grad_(False)
