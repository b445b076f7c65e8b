"""Class images for prior preservation: generated once per (base model, class prompt) and cached.

Cache layout: ``<cache>/class-images/<model-key>/<prompt-slug>/<i>.png`` where image i comes from
seed i, so asking for more images later only generates the missing ones.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from cloak.diffusion.sampling import build_pipeline, generate, slug
from cloak.io.images import read_images, write_png

log = logging.getLogger("cloak.diffusion")


def model_key(sd) -> str:
    """Key of the *unmodified* base model's content: its name and its content digest.

    Never its path alone: a folder replaced in place (``immunize --force``) must not reuse what was
    made from the old weights, and a moved or copied folder may reuse it.
    """
    local = "/" in sd.id or Path(sd.id).is_absolute()
    name = "local" if local else sd.id
    digest = getattr(sd, "digest", None)
    if digest:
        return f"{name}-{digest[:16]}"
    if local:
        return "local-" + hashlib.sha1(str(Path(sd.path).resolve()).encode()).hexdigest()[:12]
    return name


def class_images(sd, prompt: str, n: int, cache_dir: Path, *, steps: int = 50, guidance: float = 7.5,
                 resolution: int | None = None, progress=None) -> torch.Tensor:
    """``n`` class images (n×3×H×W in [-1,1]) of ``prompt`` from the base model ``sd``."""
    resolution = resolution or sd.resolution
    folder = Path(cache_dir) / "class-images" / model_key(sd) / f"{slug(prompt)}-{resolution}px-{steps}st"
    missing = [i for i in range(n) if not (folder / f"{i}.png").is_file()]
    if missing:
        log.info("generating %d class images for %r with %s into %s", len(missing), prompt, sd.id, folder)
        pipe = build_pipeline(sd)
        done = 0

        def save(i: int, arr) -> None:
            nonlocal done
            write_png(folder / f"{missing[i]}.png", arr, force=True)
            done += 1
            if progress:
                progress(done, len(missing))

        generate(pipe, prompt, missing, steps=steps, guidance=guidance, resolution=resolution, on_image=save)
    paths = [folder / f"{i}.png" for i in range(n)]
    return read_images(folder, resolution, paths=paths).pixels
