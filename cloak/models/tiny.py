"""Built-in random-weight Stable Diffusion models.

``tiny-sd`` (and ``tiny-sd-v``, its v-prediction twin) has the SD architecture — VAE factor 8, a
four-block cross-attention UNet, a CLIP text encoder and a real byte-level CLIP tokenizer — at toy
width, with weights drawn from a fixed seed. It is written with ``save_pretrained`` into the cache on
first use so every verb loads it through ``from_pretrained`` exactly like real weights. It protects
nothing and measures nothing; reports made with it say so.

``mid-sd`` and ``sd21-shaped`` are random models used by ``benchmarks/``: the second has the exact
tensor shapes of Stable Diffusion 2.1-base, to measure real-size speed and memory without weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

TINY_SEED = 20240501

# CLIP's byte→unicode table: every byte gets a printable character, so a vocabulary of the 256
# characters (plus their end-of-word forms) tokenizes any text without merges.


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@dataclass(frozen=True)
class Shape:
    name: str
    unet_channels: tuple[int, ...]
    layers_per_block: int
    # Attention heads per UNet block: diffusers' ``attention_head_dim`` argument, which its UNet reads as the
    # head count (SD 2.1-base's config says [5, 10, 20, 20]: 64 channels per head).
    heads: int | tuple[int, ...]
    cross_dim: int
    vae_channels: tuple[int, ...]
    te_hidden: int
    te_layers: int
    te_heads: int
    resolution: int
    linear_projection: bool = True
    vae_layers: int = 1


SHAPES = {
    "tiny-sd": Shape("tiny-sd", (32, 32, 64, 64), 1, 8, 32, (32, 32, 32, 32), 32, 2, 4, 64),
    # 64 channels per head, as SD 2.1. Before build version 2 it had 32 heads of 2–8 channels: CPU attention
    # then took a third of an ASPL iteration, about 17× its cost at SD's head width, and benchmarks on it
    # measured that artefact (cloak/models/cache.py BUILD_VERSIONS rebuilds older caches).
    "mid-sd": Shape("mid-sd", (64, 128, 256, 256), 2, (1, 2, 4, 4), 256, (32, 64, 64, 64), 256, 4, 4, 128),
    # Exact SD 2.1-base tensor shapes (stabilityai/stable-diffusion-2-1-base configs).
    "sd21-shaped": Shape(
        "sd21-shaped", (320, 640, 1280, 1280), 2, (5, 10, 20, 20), 1024, (128, 256, 512, 512), 1024, 23, 16, 512,
        vae_layers=2,
    ),
}


def _tokenizer_files(directory: Path) -> None:
    chars = list(_bytes_to_unicode().values())
    vocab = {}
    for token in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[token] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>"}), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
                    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>"}), encoding="utf-8")


def build_pipeline_dir(shape_name: str, target: Path, *, prediction_type: str = "epsilon") -> Path:
    """Write a random-weight SD model directory (diffusers layout) for ``shape_name`` at ``target``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cloak.io.output import apply_umask, publish_dir, staging_dir
    from cloak.models.handle import quiet_libraries

    quiet_libraries()
    shape = SHAPES[shape_name]
    torch.manual_seed(TINY_SEED)
    n = len(shape.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=shape.resolution // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=shape.layers_per_block,
        block_out_channels=shape.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=shape.cross_dim,
        attention_head_dim=shape.heads,
        use_linear_projection=shape.linear_projection,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(shape.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(shape.vae_channels),
        block_out_channels=shape.vae_channels,
        layers_per_block=shape.vae_layers,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=shape.resolution,
    )
    with tempfile.TemporaryDirectory() as tmp:
        _tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    if shape_name == "sd21-shaped":
        vocab_size = 49408  # the real CLIP vocabulary size, for exact embedding shapes
    else:
        vocab_size = len(tokenizer)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=shape.te_hidden,
            intermediate_size=shape.te_hidden * 4,
            num_attention_heads=shape.te_heads,
            num_hidden_layers=shape.te_layers,
            max_position_embeddings=77,
            projection_dim=shape.te_hidden,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type=prediction_type, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    # Like the real SD checkpoints: PNDM for sampling; training code loads the same config as DDPM.
    scheduler = PNDMScheduler(**{k: v for k, v in schedule.items() if k != "clip_sample"}, skip_prk_steps=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    staging = staging_dir(target.parent, target.name)  # umask permissions, pid in the name
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        # The real SD scheduler configs carry clip_sample=false although PNDM ignores it; DDIM/DDPM loaded
        # from this config read it (and warn when it is missing), so write it as they do.
        scheduler_config = staging / "scheduler" / "scheduler_config.json"
        config = json.loads(scheduler_config.read_text(encoding="utf-8"))
        config["clip_sample"] = schedule["clip_sample"]
        scheduler_config.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        (staging / "cloak_builtin.json").write_text(
            json.dumps({"shape": shape_name, "seed": TINY_SEED, "prediction_type": prediction_type,
                        "note": "random weights: protects and measures nothing"}), encoding="utf-8")
        apply_umask(staging)  # safetensors writes 0600 files
        # Another process may have finished first: its folder is used, never replaced or deleted.
        publish_dir(staging, target, lambda t: (t / "cloak_builtin.json").is_file())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def build_tiny_sd(target: Path) -> Path:
    return build_pipeline_dir("tiny-sd", target)


def build_tiny_sd_v(target: Path) -> Path:
    return build_pipeline_dir("tiny-sd", target, prediction_type="v_prediction")


def build_mid_sd(target: Path) -> Path:
    return build_pipeline_dir("mid-sd", target)


def build_sd21_shaped(target: Path) -> Path:
    return build_pipeline_dir("sd21-shaped", target)
