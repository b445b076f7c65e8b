"""Target images of targeted attacks (PhotoGuard, Mist, T-ASPL/T-FSMG).

A target comes from ``--target-image`` (``ctx.extras["target_image"]``) or a method's
``target_image`` option; both at once must agree. It is resized straight to the working resolution
(bicubic, no crop), as Mist's ``load_image_from_path`` does: a target is a texture or a pattern, not
a subject whose framing matters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from cloak.errors import UsageError
from cloak.io.images import file_sha256, load_pil, pil_to_tensor


def target_path(ctx, option_value: str | None) -> Path | None:
    """The target image the user asked for, or None (then the method's default target applies)."""
    flag = ctx.extras.get("target_image") if ctx.extras else None
    if flag and option_value and Path(flag).expanduser().resolve() != Path(option_value).expanduser().resolve():
        raise UsageError(f"--target-image {flag} and -o target_image={option_value} disagree; give one")
    chosen = flag or option_value
    return Path(chosen).expanduser() if chosen else None


def load_target(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """1×3×H×W in [-1, 1] for ``size`` = (H, W); an unreadable file is an input error naming it."""
    height, width = size
    img = load_pil(Path(path))
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    return pil_to_tensor(img).unsqueeze(0)


def describe(path: Path, source: str) -> dict:
    """What the report says about a target: where it came from and its digest."""
    return {"path": str(path), "source": source, "sha256": file_sha256(Path(path))}


def textural_distances(vae, pixels: torch.Tensor, target_mean: torch.Tensor, scaling: float,
                       batch_size: int) -> torch.Tensor:
    """Per image, the squared distance between the VAE posterior mean of ``pixels`` and the target's
    latent ``target_mean`` (scaled latents): Mist's and SDS-T's textural distance, with posterior means
    so that clean and protected sets compare deterministically."""
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch_size):
            z = vae.encode(pixels[i:i + batch_size].to(vae.device, vae.dtype)).latent_dist.mean
            out.append(((z.float() - target_mean.float()) * scaling).pow(2).flatten(1).sum(1).cpu())
    return torch.cat(out)
