"""Sampling from (possibly fine-tuned) SD components through diffusers' pipeline."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("cloak.diffusion")

SAMPLERS = ("default", "ddim", "pndm", "dpm", "euler", "ddpm")


def make_scheduler(sd, sampler: str):
    """The model's own scheduler config loaded into the requested sampler class."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )
    from diffusers.schedulers import KarrasDiffusionSchedulers  # noqa: F401 (import check)

    classes = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "dpm": DPMSolverMultistepScheduler,
               "euler": EulerDiscreteScheduler, "ddpm": DDPMScheduler}
    config_path = Path(sd.path) / "scheduler"
    if sampler == "default":
        import diffusers

        cfg = json.loads((config_path / "scheduler_config.json").read_text())
        cls = getattr(diffusers, cfg.get("_class_name", "PNDMScheduler"), PNDMScheduler)
        return cls.from_pretrained(config_path, local_files_only=True)
    return classes[sampler].from_pretrained(config_path, local_files_only=True)


def build_pipeline(sd, unet=None, text_encoder=None, sampler: str = "default"):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=sd.vae, text_encoder=text_encoder or sd.text_encoder, tokenizer=sd.tokenizer, unet=unet or sd.unet,
        scheduler=make_scheduler(sd, sampler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    seeds: list[int],
    *,
    steps: int,
    guidance: float,
    resolution: int,
    negative_prompt: str | None = None,
    batch_size: int = 4,
    all_seeds: list[int] | None = None,
    on_image: Callable[[int, np.ndarray], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    **pipe_kwargs,
) -> list[np.ndarray]:
    """One uint8 H×W×3 image per seed (seed i → ``torch.Generator().manual_seed(i)``), batched.

    Every draw of an image comes from its own seed's generator. Batched kernels still round
    differently at different batch sizes, so with ``all_seeds`` (the run's whole seed list) the
    batches are fixed slices of it: an image is always computed with the same batch-mates, whichever
    of them were asked for (``--resume`` after deleting some outputs gives the same bytes). A batch
    runs when any of its seeds is asked for; only the seeds asked for are returned and reported to
    ``on_image(i, image)`` (i: index into ``seeds``). ``pipe_kwargs`` go to every pipeline call
    unchanged (e.g. ``ip_adapter_image_embeds``: one embedding per adapter, repeated over the batch).
    ``on_step(n)`` is called after each denoising step of a batch, ``n`` = the images asked for in it (so a
    progress bar in image-steps moves, with its ETA, many times per batch rather than once).
    """
    wanted = {int(s): i for i, s in enumerate(seeds)}
    order = [int(s) for s in (all_seeds if all_seeds is not None else seeds)]
    missing = set(wanted) - set(order)
    if missing:
        raise ValueError(f"seeds {sorted(missing)} are not in all_seeds")
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    by_seed: dict[int, np.ndarray] = {}
    for chunk in chunks:
        if not any(s in wanted for s in chunk):
            continue
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk]
        device = pipe.unet.device
        # Initial latents drawn on CPU per seed: the same image on every device for a given seed.
        shape = (pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, pipe.unet.dtype)
        step_kwargs = {}
        if on_step is not None:
            asked = sum(s in wanted for s in chunk)

            def step_end(_pipe, _index, _timestep, tensors, asked=asked):
                on_step(asked)
                return tensors

            step_kwargs["callback_on_step_end"] = step_end
        out = pipe(
            [prompt] * len(chunk), negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
            num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
            generator=gens, latents=latents, output_type="np", **step_kwargs, **pipe_kwargs,
        ).images
        for s, img in zip(chunk, out):
            if s not in wanted:
                continue  # a batch-mate computed only so that the others keep their batch
            arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
            by_seed[s] = arr
            if on_image:
                on_image(wanted[s], arr)
    return [by_seed[int(s)] for s in seeds]


def slug(text: str, limit: int = 60) -> str:
    """A file-system-safe name for a prompt; a short hash keeps distinct prompts distinct."""
    base = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"
    return f"{base}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"
