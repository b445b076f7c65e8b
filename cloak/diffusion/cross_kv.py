"""The cross-attention key/value projections of a UNet as trainable weights, for the length of a block.

Custom Diffusion (Kumari et al., CVPR 2023) fine-tunes only ``attn2.to_k`` and ``attn2.to_v``: the maps from
the text embedding to each cross-attention layer's keys and values. CAAT trains the same weights. The UNet
is usually the run's shared, loaded model (another method or a second API call in the same process may use
it next), so :class:`TrainableCrossKV` gives each projection a private fp32 copy of its weight while the
block runs and puts the loaded tensor itself back on exit — whatever happens inside, nothing leaks.
"""

from __future__ import annotations

import torch

from cloak.diffusion.precision import MASTER_DTYPE


def cross_attention_kv(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, weight) of every cross-attention layer's ``to_k`` and ``to_v`` projection, in module order."""
    out = []
    for name, module in unet.named_modules():
        if not getattr(module, "is_cross_attention", False) or not hasattr(module, "to_k"):
            continue
        for proj in ("to_k", "to_v"):
            out.append((f"{name}.{proj}.weight", getattr(module, proj).weight))
    return out


class TrainableCrossKV:
    """``with TrainableCrossKV(unet) as kv``: ``kv.params`` are the K/V weights, now fp32 copies that
    require grad (the rest of the UNet stays frozen, in its own dtype); on exit each parameter holds its
    loaded tensor again (the same storage, so the same bytes) and has no gradient."""

    def __init__(self, unet: torch.nn.Module):
        self.named = cross_attention_kv(unet)
        if not self.named:
            raise ValueError("this UNet has no cross-attention layers with to_k/to_v projections")
        self.params = [p for _, p in self.named]
        self._loaded: list[torch.Tensor] = []

    def __enter__(self) -> TrainableCrossKV:
        self._loaded = [p.data for p in self.params]
        with torch.no_grad():
            for p in self.params:
                p.data = p.data.to(MASTER_DTYPE, copy=True)
                p.requires_grad_(True)
        return self

    def __exit__(self, *exc) -> None:
        for p, loaded in zip(self.params, self._loaded):
            p.requires_grad_(False)
            p.grad = None
            p.data = loaded
        self._loaded = []

    @torch.no_grad()
    def relative_change(self) -> float:
        """‖W − W₀‖ / ‖W₀‖ over all K/V weights together (Frobenius), W₀ the loaded weights."""
        if not self._loaded:
            return 0.0
        num = sum(float((p.float() - w.float()).pow(2).sum()) for p, w in zip(self.params, self._loaded))
        den = sum(float(w.float().pow(2).sum()) for w in self._loaded)
        return (num / den) ** 0.5 if den else 0.0

    def count(self) -> int:
        return sum(p.numel() for p in self.params)
