"""The guided-diffusion 256² unconditional checkpoint through the cache, and its built-in stand-in.

``guided-diffusion-256-uncond`` is OpenAI's ``256x256_diffusion_uncond.pt`` (a plain state dict); the
stand-in ``tiny-guided-diffusion`` is the same UNet class at toy width with seeded random weights, saved
under the same file name plus ``cloak_arch.json`` (the architecture overrides). :func:`load_dir` reads
either: the published file has no ``cloak_arch.json`` and gets the published configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cloak.models.archs.guided_diffusion import build_guided_diffusion, load_guided_diffusion

CHECKPOINT = "256x256_diffusion_uncond.pt"
ARCH_FILE = "cloak_arch.json"  # only in built-in stand-ins: constructor overrides of the published config
STANDIN_SEED = 23
# Smallest UNet that keeps every block type of the published one (attention, up/down resblocks, learned σ).
TINY = dict(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
            num_head_channels=16)


def read_arch(model_dir: Path) -> dict:
    path = Path(model_dir) / ARCH_FILE
    if not path.is_file():
        return {}
    arch = json.loads(path.read_text(encoding="utf-8"))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}


def randomize_zeroed(model: torch.nn.Module, generator: torch.Generator, std: float = 0.05) -> None:
    """Give zero-initialised weight tensors small random values.

    The upstream init zeroes the output convolutions (each block starts as an identity and the network
    predicts ε = 0); a stand-in with those zeros would make every sampler step trivial.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def build_standin(target: Path) -> None:
    target = Path(target)
    torch.manual_seed(STANDIN_SEED)
    model = build_guided_diffusion(**TINY)
    randomize_zeroed(model, torch.Generator().manual_seed(STANDIN_SEED))
    target.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), target / CHECKPOINT)
    (target / ARCH_FILE).write_text(json.dumps(TINY), encoding="utf-8")


def load_dir(model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The UNet of ``model_dir`` (published checkpoint or stand-in), eval mode, frozen."""
    model = load_guided_diffusion(Path(model_dir) / CHECKPOINT, device, **read_arch(model_dir))
    return model.to(dtype=dtype)


def guided_unet(models, role: str = "purifier"):
    """The guided-diffusion UNet through the ``Models`` handle, loaded once per run."""
    _, path, _ = models.resolve("guided-diffusion-256-uncond", role)
    return models.memo(("guided-diffusion", str(path), str(models.device), str(models.dtype)),
                       lambda: load_dir(path, models.device, models.dtype))
