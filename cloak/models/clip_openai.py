"""OpenAI CLIP models (ViT-B/32, RN50) and LIQE's fine-tuned CLIP, read from state dicts in OpenAI's naming.

OpenAI's own release files are TorchScript archives; cloak reads the same weights as plain state dicts
(open_clip's safetensors re-release on the hub, LIQE's ``torch.save`` checkpoint) with safetensors or
``torch.load(weights_only=True)``, infers the architecture from the tensor shapes (as OpenAI's
``build_model`` does) and instantiates open_clip's ``CLIP`` class (QuickGELU, as OpenAI trained it) in
float32. The BPE tokenizer ships inside open_clip, so no tokenizer files are needed.

Stand-ins (``--tiny``): the same classes at toy widths with seeded random weights, written in the same
file format and naming, so they go through this loader.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cloak.errors import ModelUnavailableError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_FILE = "open_clip_model.safetensors"  # layout of the timm/*_clip*.openai hub repos
LIQE_FILES = ("liqe_mix.pt", "LIQE.pt")  # pyiqa's re-release, or the LIQE repo's original checkpoint
STANDIN_SEED = 13


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ModelUnavailableError("CLIP-based metrics need open_clip", hint="pip install 'cloak[iqa]'") from None
    return open_clip


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A CLIP state dict in OpenAI naming from a safetensors or a weights-only torch file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle with more than tensors: refuse rather than unpickle it
            raise ModelUnavailableError(f"{path} is not a weights-only checkpoint: {exc}") from None
    for key in ("params", "state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "clip_model."):  # DataParallel / pyiqa's LIQE wrapper
            key = key.removeprefix(prefix)
        if isinstance(value, torch.Tensor):
            out[key] = value
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's JIT extras
        out.pop(key, None)
    return out


def _configs(state: dict[str, torch.Tensor]):
    open_clip = _open_clip()
    if "visual.proj" in state:  # ViT
        width = state["visual.conv1.weight"].shape[0]
        layers = sum(1 for k in state if k.startswith("visual.") and k.endswith(".attn.in_proj_weight"))
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = open_clip.CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=patch * grid)
    else:  # modified ResNet
        counts = tuple(len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")})
                       for b in (1, 2, 3, 4))
        width = state["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = open_clip.CLIPVisionCfg(layers=counts, width=width, image_size=grid * 32)
    text_width = state["ln_final.weight"].shape[0]
    text = open_clip.CLIPTextCfg(
        context_length=state["positional_embedding"].shape[0], vocab_size=state["token_embedding.weight"].shape[0],
        width=text_width, heads=max(1, text_width // 64),
        layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}))
    return state["text_projection"].shape[1], vision, text


def build_clip(state: dict[str, torch.Tensor]):
    """open_clip's CLIP with the architecture the state dict implies, weights loaded strictly, fp32, eval."""
    open_clip = _open_clip()
    embed_dim, vision, text = _configs(state)
    model = open_clip.CLIP(embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.float().eval().requires_grad_(False)


def load_clip(model_dir: Path, files: tuple[str, ...] = (CLIP_FILE,), device: str | torch.device = "cpu"):
    for name in files:
        path = Path(model_dir) / name
        if path.is_file():
            try:
                model = build_clip(read_state(path))
            except (RuntimeError, KeyError) as exc:
                raise ModelUnavailableError(f"{path} is not a CLIP checkpoint in OpenAI naming: {exc}") from None
            return model.to(device)
    raise ModelUnavailableError(f"none of {', '.join(files)} in {model_dir}")


def tokenize(texts: list[str]) -> torch.Tensor:
    return _open_clip().tokenize(texts)


# --- stand-ins -------------------------------------------------------------------------------------------

def _tiny(kind: str):
    open_clip = _open_clip()
    torch.manual_seed(STANDIN_SEED)
    # Widths are multiples of 64 where OpenAI's shape rules derive the head count from them (width // 64).
    if kind == "vit":
        vision = open_clip.CLIPVisionCfg(layers=1, width=64, patch_size=32, image_size=224)
    else:
        vision = open_clip.CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=224)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = open_clip.CLIP(32, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    with torch.no_grad():  # open_clip initialises logit_scale to log(1/0.07), as OpenAI did
        model.logit_scale.fill_(float(torch.tensor(100.0).log()))
    return model


def _save_safetensors(model, target: Path) -> None:
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target / CLIP_FILE))


def build_standin_clip_vit(target: Path) -> None:
    _save_safetensors(_tiny("vit"), Path(target))


def build_standin_clip_rn(target: Path) -> None:
    _save_safetensors(_tiny("rn"), Path(target))


def build_standin_liqe(target: Path) -> None:
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    torch.save(_tiny("vit").state_dict(), target / LIQE_FILES[0])
