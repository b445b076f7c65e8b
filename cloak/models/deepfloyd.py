"""DeepFloyd IF stage II (64² → 256² pixel-space super-resolution) and its T5 text encoder; PDM-Pure's models.

* ``deepfloyd-if-ii-l`` → ``DeepFloyd/IF-II-L-v1.0`` in diffusers layout: ``unet/`` (a ``UNet2DConditionModel``
  with 6 input channels — the noisy image and the upsampled low-resolution image —, 6 output channels — ε and
  the learned-range variance —, the low-resolution noise level as a ``timestep`` class embedding and the T5
  text projection), ``scheduler/`` (cosine DDPM, learned-range variance, thresholding) and
  ``image_noising_scheduler/`` (the noise augmentation of the low-resolution input);
* ``deepfloyd-if-t5`` → the T5 v1.1 XXL encoder and tokenizer of ``DeepFloyd/IF-I-XL-v1.0`` (stage II takes
  the prompt's embeddings from stage I's encoder, as diffusers' IF documentation does).

Both are gated on the hub (accept the DeepFloyd IF licence, log in); ``cloak models pull`` then fetches them
with the user's token. The built-in stand-ins ``tiny-if-ii`` / ``tiny-if-t5`` are the same diffusers and
transformers classes at toy width (the block layout of diffusers' own IF super-resolution test model), random
weights from a fixed seed, in the same directory layout, so the loading path is the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cloak.errors import ModelUnavailableError

STANDIN_SEED = 41
T5_MAX_LENGTH = 77  # IF's T5Embedder: max_length padding to 77 tokens, with the attention mask


def _if_schedulers():
    """The published IF-II scheduler settings: cosine (squaredcos_cap_v2) ε-prediction DDPM with learned-range
    variance and dynamic thresholding at p 0.95, max 1 (IF's stage II c = 1.0); the augmentation scheduler is the
    same cosine schedule."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", thresholding=True,
                              dynamic_thresholding_ratio=0.95, sample_max_value=1.0, prediction_type="epsilon",
                              variance_type="learned_range")
    noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return scheduler, noising


def build_standin_if_ii(target: Path) -> None:
    """Random-weight IF-II-shaped super-resolution UNet (ResNet down/up-sampling blocks, simple cross-attention
    with added K/V, text projection from the T5 width, noise-level class embedding, scale-shift time
    conditioning, GELU) plus the two schedulers, saved in the hub repository's layout."""
    from diffusers import UNet2DConditionModel

    from cloak.models.guided import randomize_zeroed
    from cloak.models.handle import quiet_libraries

    quiet_libraries()
    target = Path(target)
    torch.manual_seed(STANDIN_SEED)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=6, out_channels=6, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32, encoder_hid_dim=TINY_T5["d_model"], encoder_hid_dim_type="text_proj",
        attention_head_dim=8, addition_embed_type="text", addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
        class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
        time_embedding_dim=32)
    randomize_zeroed(unet, torch.Generator().manual_seed(STANDIN_SEED))
    scheduler, noising = _if_schedulers()
    target.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(target / "unet", safe_serialization=True)
    scheduler.save_pretrained(target / "scheduler")
    noising.save_pretrained(target / "image_noising_scheduler")
    (target / "cloak_builtin.json").write_text(json.dumps({"seed": STANDIN_SEED, "note": "random weights"}),
                                               encoding="utf-8")


TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


def _tiny_t5_tokenizer():
    """A T5 tokenizer (SentencePiece-style unigram over "▁"-prefixed pieces) built without a sentencepiece file:
    T5's special ids (pad 0, eos 1, unk 2), a few whole words, then single characters as fallback pieces."""
    from transformers import T5Tokenizer

    words = ["a", "an", "the", "of", "photo", "picture", "person", "painting", "portrait", "face", "man", "woman"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0) for w in words]
    pieces += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_standin_t5(target: Path) -> None:
    """Random-weight T5 encoder (T5EncoderModel, gated-GELU, relative attention) and a T5 fast tokenizer, in the
    layout of IF-I-XL's ``text_encoder/`` and ``tokenizer/``."""
    from transformers import T5Config, T5EncoderModel

    from cloak.models.handle import quiet_libraries

    quiet_libraries()
    target = Path(target)
    tokenizer = _tiny_t5_tokenizer()
    torch.manual_seed(STANDIN_SEED + 1)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **TINY_T5))
    target.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(target / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(target / "tokenizer")
    (target / "cloak_builtin.json").write_text(json.dumps({"seed": STANDIN_SEED + 1, "note": "random weights"}),
                                               encoding="utf-8")


# ------------------------------------------------------------------------------------------------ loaders


def load_if_stage2(path: Path, device: torch.device, dtype: torch.dtype):
    """(unet, scheduler config, noising scheduler) of an IF stage-II directory (diffusers layout)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from cloak.models.handle import quiet_libraries

    quiet_libraries()
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        noising = DDPMScheduler.from_pretrained(path, subfolder="image_noising_scheduler", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot load DeepFloyd IF stage II from {path}: {exc}",
                                    hint="cloak models pull deepfloyd-if-ii-l (gated: accept the DeepFloyd IF "
                                         "licence on the hub and log in first)") from None
    unet.requires_grad_(False).eval()
    return unet.to(device=device, dtype=dtype), scheduler.config, noising


@torch.no_grad()
def t5_embeddings(path: Path, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """T5 last hidden states (B×77×D) of ``prompts``, padded to 77 with the attention mask, as IF's
    ``T5Embedder.get_text_embeddings``. The encoder is loaded, used and released: T5-XXL is 4.7 B parameters,
    and the purifier needs only two embeddings per run."""
    from transformers import AutoTokenizer, T5EncoderModel

    from cloak.models.handle import quiet_libraries

    quiet_libraries()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelUnavailableError(f"cannot load the T5 tokenizer from {path}: {exc}",
                                    hint="the published tokenizer is a sentencepiece model: pip install "
                                         "sentencepiece protobuf") from None
    # T5 v1.1 overflows in float16; IF's T5Embedder runs it in bfloat16.
    run_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    try:
        encoder = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True,
                                                 torch_dtype=run_dtype)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot load the T5 encoder from {path}: {exc}",
                                    hint="cloak models pull deepfloyd-if-t5 (gated: accept the DeepFloyd IF "
                                         "licence on the hub and log in first)") from None
    encoder = encoder.to(device).eval()
    tokens = tokenizer(prompts, max_length=T5_MAX_LENGTH, padding="max_length", truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    out = encoder(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
    emb = out.last_hidden_state.detach().to(dtype)
    del encoder
    return emb
