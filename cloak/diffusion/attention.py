"""Record a UNet's cross-attention maps (softmax over text tokens), differentiably.

While a :class:`CrossAttentionRecorder` is active, the cross-attention layers (``attn2``) of the chosen
UNet parts compute attention explicitly (the SDPA kernels never materialise the probabilities) and keep
``softmax(QKᵀ·scale)`` of every call whose spatial size is ``resolution``². :meth:`maps` returns them
averaged over heads and layers: B × resolution² × tokens. Layers at other sizes and all self-attention
keep their original processors. On exit the original processors are restored, so a shared UNet is left
as it was.

This is the attention-store recipe of Anti-Diffusion (whulizheng/Anti-Diffusion ``Defense/antidiffusion.py``:
cross maps of size 16×16 from down and up blocks, averaged over heads and layers), written for diffusers'
attention-processor interface. [Q] The released store keeps only the second half of the batch·heads axis
(a classifier-free-guidance leftover: with one image per call it drops half the heads); cloak keeps all
heads unless ``compat_half_heads`` is set.
"""

from __future__ import annotations

import torch

PLACES = ("down", "mid", "up")


def default_resolution(latent_size: int) -> int:
    """16 for SD at 512 px (latent 64): the map size Anti-Diffusion reads, scaled with the latent."""
    return max(1, latent_size // 4)


class _RecordingProcessor:
    """Explicit attention for one cross-attention layer; records the probabilities at the chosen size."""

    def __init__(self, original, recorder: CrossAttentionRecorder):
        self.original = original
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        rec = self.recorder
        if (encoder_hidden_states is None or hidden_states.ndim != 3
                or hidden_states.shape[1] != rec.positions or attn.spatial_norm is not None):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch, _, _ = hidden_states.shape
        residual = hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)  # (B·h)×HW×T
        rec._record(probs.view(batch, attn.heads, *probs.shape[1:]))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class CrossAttentionRecorder:
    """Context manager recording cross-attention maps of ``unet`` at ``resolution``² positions.

    ``places`` picks the UNet parts (Anti-Diffusion: down and up, no mid). Call :meth:`reset` before each
    forward pass whose maps you want, then :meth:`maps`.
    """

    def __init__(self, unet, resolution: int, places: tuple[str, ...] = ("down", "up"), *,
                 compat_half_heads: bool = False):
        bad = [p for p in places if p not in PLACES]
        if bad:
            raise ValueError(f"unknown UNet place(s) {bad}; valid: {PLACES}")
        self.unet = unet
        self.resolution = int(resolution)
        # Spatial positions of the layers to record: resolution² for square latents; a caller running
        # non-square images sets the (h/k)·(w/k) of the level whose short side is ``resolution``.
        self.positions = self.resolution * self.resolution
        self.places = tuple(places)
        self.compat_half_heads = compat_half_heads
        self._saved = None
        self._maps: list[torch.Tensor] = []

    def _wanted(self, name: str) -> bool:
        if ".attn2." not in name:
            return False
        part = name.split(".", 1)[0]
        return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(part) in self.places

    def __enter__(self) -> CrossAttentionRecorder:
        self._saved = dict(self.unet.attn_processors)
        wanted = {name: _RecordingProcessor(proc, self) if self._wanted(name) else proc
                  for name, proc in self._saved.items()}
        if not any(isinstance(p, _RecordingProcessor) for p in wanted.values()):
            raise ValueError(f"the UNet has no cross-attention layers in {self.places}")
        self.unet.set_attn_processor(wanted)
        self._maps = []
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None
        self._maps = []

    def reset(self) -> None:
        self._maps = []

    def _record(self, probs: torch.Tensor) -> None:
        """``probs``: B × heads × HW × T."""
        if self.compat_half_heads:  # [Q] Anti-Diffusion's attn[h // 2:] with one image per call
            probs = probs[:, probs.shape[1] // 2:]
        self._maps.append(probs.float().mean(1))

    def maps(self) -> torch.Tensor:
        """B × resolution² × T: mean over heads, then over the recorded layers."""
        if not self._maps:
            raise RuntimeError(f"no cross-attention map of size {self.resolution}×{self.resolution} "
                               f"({self.positions} positions) was recorded "
                               f"(UNet parts {self.places}); choose a resolution the UNet attends at")
        return torch.stack(self._maps).mean(0)
