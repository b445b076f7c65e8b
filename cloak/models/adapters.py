"""IP-Adapter weights for the zero-shot identity attack: files, cache-only loaders, random stand-ins.

Two adapters (attack.md §4), both in the format diffusers' ``load_ip_adapter`` reads — a state dict
``{"image_proj": {...}, "ip_adapter": {...}}``:

* ``ip-adapter-sd15`` (h94/IP-Adapter): ``models/ip-adapter_sd15.safetensors`` (keys prefixed
  ``image_proj.`` / ``ip_adapter.``): a linear map of the CLIP image embedding to 4 tokens, and the
  decoupled cross-attention K/V (``<k>.to_k_ip``, ``<k>.to_v_ip``, k = 1, 3, 5, … over the UNet's
  attention processors in order). Its image encoder, ``models/image_encoder/`` of the same
  repository (CLIP ViT-H/14), is the catalog id ``ip-adapter-image-encoder`` (cloak.models.encoders).
* ``ip-adapter-faceid-sd15`` (h94/IP-Adapter-FaceID): ``ip-adapter-faceid_sd15.bin`` (a pickled dict,
  read with ``weights_only=True``): an MLP from a 512-d face-recognition embedding to 4 tokens
  (``proj.0``, ``proj.2``, ``norm``), the decoupled K/V, and the FaceID LoRA on every attention
  processor (``<k>.to_{q,k,v,out}_lora.{down,up}``, k = 0, 1, 2, …). diffusers applies that LoRA
  from this file; the repository's separate ``ip-adapter-faceid_sd15_lora.safetensors`` holds the
  same LoRA for other UIs and is not needed.

Weights are read from the cache directory only. The stand-ins (``--tiny``) are written in exactly
these formats and file names, with shapes that fit the built-in tiny UNet, and seeded random values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cloak.errors import ModelUnavailableError, UsageError

IP_ADAPTER_FILE = "models/ip-adapter_sd15.safetensors"
IMAGE_ENCODER_ID = "ip-adapter-image-encoder"
STANDIN_IMAGE_EMBED_DIM = 32  # projection_dim of the tiny-clip-vision stand-in (cloak.models.encoders)
FACEID_FILE = "ip-adapter-faceid_sd15.bin"
FACE_EMBED_DIM = 512  # ArcFace embeddings (insightface buffalo_l in the published recipe; IR-SE50 here)
STANDIN_SEED = 11
VARIANTS = {"ipadapter": "ip-adapter-sd15", "faceid": "ip-adapter-faceid-sd15"}


@dataclass
class IPAdapterWeights:
    variant: str  # ipadapter | faceid
    weight_name: str
    state_dict: dict[str, dict[str, torch.Tensor]]

    @property
    def embed_dim(self) -> int:
        proj = self.state_dict["image_proj"]
        return int(proj["proj.weight"].shape[1] if "proj.weight" in proj else proj["proj.0.weight"].shape[1])

    @property
    def has_lora(self) -> bool:
        return any(k.endswith("to_q_lora.down.weight") for k in self.state_dict["ip_adapter"])


# --- loaders (cache directory only) --------------------------------------------------------------

def _split_prefixed(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head in out:
            out[head][rest] = value
    return out


def _check_format(state: Any, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise ModelUnavailableError(f"{path} is not an IP-Adapter checkpoint (no image_proj / ip_adapter weights)")
    return state


def load_ip_adapter(model_dir: Path) -> IPAdapterWeights:
    """The plain IP-Adapter: image-embedding projection and decoupled K/V (the encoder is separate)."""
    from safetensors.torch import load_file

    path = Path(model_dir) / IP_ADAPTER_FILE
    if not path.is_file():
        raise ModelUnavailableError(f"IP-Adapter weights missing: {path}",
                                    hint="run `cloak models pull ip-adapter-sd15`")
    return IPAdapterWeights("ipadapter", path.name, _check_format(_split_prefixed(load_file(str(path))), path))


def load_image_encoder(models, role: str = "ip-adapter-image-encoder"):
    """IP-Adapter's CLIP vision tower (``image_embeds`` output) and the preprocessing diffusers applies."""
    from transformers import CLIPImageProcessor

    from cloak.models.encoders import load_clip_vision

    _, path, _ = models.resolve(IMAGE_ENCODER_ID, role)

    def build():
        encoder = load_clip_vision(path)
        encoder.requires_grad_(False)
        encoder.eval()
        encoder.to(models.device, dtype=models.dtype)
        size = int(encoder.config.image_size)
        # What diffusers builds when a pipeline has no feature extractor: CLIP resize, centre crop, norm.
        return encoder, CLIPImageProcessor(size=size, crop_size=size)

    return models.memo(("ip-adapter-image-encoder", str(path), str(models.device), str(models.dtype)), build)


def load_faceid(model_dir: Path) -> IPAdapterWeights:
    """IP-Adapter-FaceID: the ArcFace-embedding MLP, decoupled K/V and the UNet LoRA, from one file."""
    path = Path(model_dir) / FACEID_FILE
    if not path.is_file():
        raise ModelUnavailableError(f"IP-Adapter-FaceID weights missing: {path}",
                                    hint="run `cloak models pull ip-adapter-faceid-sd15`")
    state = _check_format(torch.load(path, map_location="cpu", weights_only=True), path)
    weights = IPAdapterWeights("faceid", path.name, state)
    if "norm.weight" not in state["image_proj"] or not weights.has_lora:
        raise ModelUnavailableError(f"{path} is not an IP-Adapter-FaceID checkpoint (no MLP projection or LoRA)")
    return weights


def load(models, variant: str, role: str = "ip-adapter") -> tuple[IPAdapterWeights, str, bool]:
    """Resolve the variant's catalog id (its stand-in under --tiny) and load it once per run."""
    model_id, path, stand_in = models.resolve(VARIANTS[variant], role)
    loader = load_faceid if variant == "faceid" else load_ip_adapter
    return models.memo(("ip-adapter", str(path)), lambda: loader(path)), model_id, stand_in


# --- shapes ---------------------------------------------------------------------------------------

def attention_layout(unet) -> list[tuple[str, int, int | None]]:
    """(processor name, hidden size, cross-attention dim or None) per attention processor, in the
    order diffusers numbers them when it loads IP-Adapter weights: LoRA keys count every processor
    (0, 1, 2, …), the decoupled K/V keys count 1, 3, 5, … over the cross-attention ones."""
    cfg = unet.config
    out = []
    for name in unet.attn_processors:
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        out.append((name, int(hidden), None if name.endswith("attn1.processor") else int(cfg.cross_attention_dim)))
    return out


def check_fits(weights: IPAdapterWeights, unet, model_id: str, base_id: str) -> None:
    """A clear error when the adapter was made for another UNet (e.g. an SD 1.5 adapter on SD 2.1)."""
    ip = weights.state_dict["ip_adapter"]
    problems = []
    layout = attention_layout(unet)
    for key_id, (name, hidden, cross) in zip(_kv_ids(layout), layout):
        if cross is None:
            continue
        found = ip.get(f"{key_id}.to_k_ip.weight")
        if found is None or tuple(found.shape) != (hidden, cross):
            problems.append(f"{name}: expects K/V {hidden}×{cross}, adapter has "
                            f"{'nothing' if found is None else '×'.join(map(str, found.shape))}")
            break
    if problems:
        raise UsageError(f"adapter {model_id} does not fit the UNet of {base_id} ({problems[0]})",
                         hint="the SD 1.5 adapters need an SD 1.x base model: --model sd15")


# --- stand-ins ------------------------------------------------------------------------------------

def _unet_for_shape(shape_name: str):
    """An empty (meta-device) UNet with the built-in model's architecture (same arguments as tiny.py)."""
    from diffusers import UNet2DConditionModel

    from cloak.models.tiny import SHAPES

    shape = SHAPES[shape_name]
    n = len(shape.unet_channels)
    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=shape.resolution // 8, in_channels=4, out_channels=4, layers_per_block=shape.layers_per_block,
            block_out_channels=shape.unet_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            cross_attention_dim=shape.cross_dim, attention_head_dim=shape.heads,
            use_linear_projection=shape.linear_projection, norm_num_groups=32,
        )


def _rand(gen: torch.Generator, *shape: int, std: float | None = None) -> torch.Tensor:
    """Gaussian weights; by default with a Linear layer's scale 1/√fan_in, so the image tokens of a
    stand-in weigh in the attention about as much as the text tokens do."""
    return torch.randn(shape, generator=gen) * (shape[-1] ** -0.5 if std is None else std)


def _kv_ids(layout) -> list[int | None]:
    ids, next_id = [], 1
    for _, _, cross in layout:
        ids.append(next_id if cross is not None else None)
        next_id += 2 if cross is not None else 0
    return ids


def _decoupled_kv(gen: torch.Generator, layout, lora_rank: int | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for lora_id, (kv_id, (_, hidden, cross)) in enumerate(zip(_kv_ids(layout), layout)):
        if lora_rank:
            ctx_dim = cross or hidden
            for proj, (d_in, d_out) in {"to_q": (hidden, hidden), "to_k": (ctx_dim, hidden),
                                        "to_v": (ctx_dim, hidden), "to_out": (hidden, hidden)}.items():
                out[f"{lora_id}.{proj}_lora.down.weight"] = _rand(gen, lora_rank, d_in)
                out[f"{lora_id}.{proj}_lora.up.weight"] = _rand(gen, d_out, lora_rank, std=0.02)  # a small delta
        if cross is not None:
            out[f"{kv_id}.to_k_ip.weight"] = _rand(gen, hidden, cross)
            out[f"{kv_id}.to_v_ip.weight"] = _rand(gen, hidden, cross)
    return out


def write_standin_ip_adapter(target: Path, shape_name: str = "tiny-sd",
                             embed_dim: int = STANDIN_IMAGE_EMBED_DIM) -> None:
    """Random IP-Adapter in the h94/IP-Adapter layout, fitting ``shape_name`` and the stand-in encoder."""
    from safetensors.torch import save_file

    unet = _unet_for_shape(shape_name)
    cross = int(unet.config.cross_attention_dim)
    gen = torch.Generator().manual_seed(STANDIN_SEED)
    flat = {"image_proj.proj.weight": _rand(gen, 4 * cross, embed_dim), "image_proj.proj.bias": torch.zeros(4 * cross),
            "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    flat.update({f"ip_adapter.{k}": v for k, v in _decoupled_kv(gen, attention_layout(unet), None).items()})
    (Path(target) / IP_ADAPTER_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(Path(target) / IP_ADAPTER_FILE))


def write_standin_faceid(target: Path, shape_name: str = "tiny-sd", lora_rank: int = 4) -> None:
    """Random IP-Adapter-FaceID (MLP 512→2·512→4 tokens, K/V, LoRA) as one ``.bin`` fitting ``shape_name``."""
    unet = _unet_for_shape(shape_name)
    cross = int(unet.config.cross_attention_dim)
    mid = 2 * FACE_EMBED_DIM  # the published MLP's hidden width (mult 2)
    gen = torch.Generator().manual_seed(STANDIN_SEED + 1)
    image_proj = {"proj.0.weight": _rand(gen, mid, FACE_EMBED_DIM), "proj.0.bias": torch.zeros(mid),
                  "proj.2.weight": _rand(gen, 4 * cross, mid), "proj.2.bias": torch.zeros(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    state = {"image_proj": image_proj, "ip_adapter": _decoupled_kv(gen, attention_layout(unet), lora_rank)}
    Path(target).mkdir(parents=True, exist_ok=True)
    torch.save(state, Path(target) / FACEID_FILE)


def build_standin_ip_adapter(target: Path) -> None:
    write_standin_ip_adapter(target, "tiny-sd")


def build_standin_faceid(target: Path) -> None:
    write_standin_faceid(target, "tiny-sd")
