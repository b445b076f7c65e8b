"""Class images for prior preservation: generated once per (base model content, prompt, size, sampler, steps).

Cache layout: ``<cache>/class-images/<model-key>/<prompt-slug>-<res>px-<sampler>-<steps>st/<i>.png``
where image i comes from seed i, so asking for more images later only generates the missing ones, and
every method and verb that needs the same set (ASPL, FSMG, DLADiff, APDM, the DreamBooth attacks) reuses
it. ``model-key`` is the base model's content digest (:func:`model_key`), never its path alone. Each
image is written atomically and is the same bytes whoever makes it, so two runs filling one folder at
the same time need no lock: the second rename simply replaces an identical file.

Through a run context (``ctx=``) the counts follow ``--effort`` (:func:`class_image_plan`), a
``--class-dir`` of the user's own class images replaces generation (as DreamBooth users do), progress
shows on the run's bar with an ETA, and what was used is recorded in ``ctx.extras["class_images"]``
for the report.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cloak.diffusion.sampling import build_pipeline, generate, slug
from cloak.io.images import input_files, read_images, write_png

log = logging.getLogger("cloak.diffusion")

# Floors under --effort: fewer than this many class images (or sampling steps) is no prior at all.
MIN_CLASS_IMAGES = 4
MIN_CLASS_STEPS = 10
# [PROP] The fast class-image sampler: DPM-Solver++ (2M) at half the steps of the reference sampler
# (Lu et al. 2022 report DDIM-50 quality at 20–25 steps). --compat keeps the model's own sampler.
FAST_SAMPLER = "dpm"
FAST_SAMPLER_NOTE = ("[PROP] class images sampled with DPM-Solver++ (2M) at half the specified steps (same quality "
                     "as the reference 50-step sampler per Lu et al. 2022); --compat uses the model's own sampler "
                     "and steps")


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


@dataclass
class ClassImagePlan:
    """What a method's ``class_images``/``class_image_steps`` become in this run."""

    count: int  # images used
    steps: int  # sampling steps per generated image
    sampler: str  # "default" (the model's own scheduler) or FAST_SAMPLER
    requested_count: int
    requested_steps: int
    class_dir: str | None = None  # the user's own class images (nothing generated)


def _scaled(n: int, effort: float, floor: int) -> int:
    """``n`` scaled by ``effort`` (never above ``n``), not below ``min(n, floor)``."""
    if n <= 0:
        return 0
    return max(min(n, floor), min(n, round(n * effort)))


def class_image_plan(ctx, n: int, steps: int) -> ClassImagePlan:
    """The class images a method asking for ``n`` images of ``steps`` sampling steps gets in ``ctx``'s run.

    ``--effort`` scales the count and the steps (each with a floor, never above what was asked); unless
    ``--compat``, the sampler is DPM-Solver++ at half the steps [PROP]. Without a context: as asked.
    """
    if ctx is None:
        return ClassImagePlan(n, steps, "default", n, steps)
    effort = float(getattr(ctx, "effort", 1.0))
    class_dir = (getattr(ctx, "extras", None) or {}).get("class_dir")
    count = _scaled(n, effort, MIN_CLASS_IMAGES)
    if getattr(ctx, "compat", False):
        sampler, base_steps = "default", steps
    else:
        sampler, base_steps = FAST_SAMPLER, max(1, math.ceil(steps / 2))
    return ClassImagePlan(count, _scaled(base_steps, effort, MIN_CLASS_STEPS), sampler, n, steps,
                          str(class_dir) if class_dir else None)


def class_images(sd, prompt: str, n: int, cache_dir: Path, *, steps: int = 50, guidance: float = 7.5,
                 resolution: int | None = None, progress=None, sampler: str = "default", ctx=None,
                 batch_size: int = 4) -> torch.Tensor:
    """Class images (count×3×H×W in [-1,1]) of ``prompt`` from the base model ``sd``.

    Without ``ctx``: exactly ``n`` images of ``steps`` steps with ``sampler``. With ``ctx`` (a run
    context): the plan of :func:`class_image_plan`, the run's progress bar, ``--class-dir``, and a
    record in ``ctx.extras["class_images"]``. ``progress`` may be a callable ``(done, total)``.
    """
    resolution = resolution or (getattr(ctx, "resolution", 0) or sd.resolution)
    plan = class_image_plan(ctx, n, steps) if ctx is not None else ClassImagePlan(n, steps, sampler, n, steps)
    started = time.perf_counter()
    if plan.class_dir:
        pixels, source, folder = _from_class_dir(ctx, Path(plan.class_dir), plan.count, resolution), "class-dir", None
    else:
        pixels, source, folder = _cached(sd, prompt, plan, Path(cache_dir), guidance, resolution, progress, ctx,
                                         batch_size)
    if ctx is not None:
        record = {**asdict(plan), "count": int(len(pixels)), "prompt": prompt, "resolution": resolution,
                  "guidance": guidance, "source": source, "folder": str(folder) if folder else plan.class_dir,
                  "seconds": round(time.perf_counter() - started, 3)}
        if plan.class_dir:
            record.update(steps=None, sampler=None)
        elif plan.sampler == FAST_SAMPLER:
            record["note"] = FAST_SAMPLER_NOTE
        used = ctx.extras.setdefault("class_images", [])
        if record not in used:
            used.append(record)
    return pixels


def _cached(sd, prompt, plan: ClassImagePlan, cache_dir: Path, guidance, resolution, progress, ctx, batch_size):
    sampler_tag = "" if plan.sampler == "default" else f"{plan.sampler}-"
    guidance_tag = "" if guidance == 7.5 else f"-g{guidance:g}"
    folder = (cache_dir / "class-images" / model_key(sd) /
              f"{slug(prompt)}-{resolution}px-{sampler_tag}{plan.steps}st{guidance_tag}")
    missing = [i for i in range(plan.count) if not (folder / f"{i}.png").is_file()]
    source = "cache"
    if missing:
        source = "generated" if len(missing) == plan.count else "cache+generated"
        log.info("generating %d class images for %r with %s (%s, %d steps) into %s", len(missing), prompt, sd.id,
                 plan.sampler, plan.steps, folder)
        pipe = build_pipeline(sd, sampler=plan.sampler)
        # The bar counts image-steps (images × sampling steps), so its ETA moves within a batch: on a real model
        # one batch of class images can take minutes. Its status says how many images are written.
        bar = ctx.progress.task("class images", len(missing) * plan.steps) \
            if ctx is not None and progress is None else None
        done = 0
        try:
            def save(i: int, arr) -> None:
                nonlocal done
                write_png(folder / f"{missing[i]}.png", arr, force=True)  # atomic: a concurrent writer is harmless
                done += 1
                if bar is not None:
                    bar.advance(0, status=f"{done}/{len(missing)} images")
                if progress:
                    progress(done, len(missing))

            def stepped(n: int) -> None:
                bar.advance(n, status=f"{done}/{len(missing)} images")

            generate(pipe, prompt, missing, steps=plan.steps, guidance=guidance, resolution=resolution,
                     on_image=save, on_step=stepped if bar is not None else None, batch_size=batch_size,
                     all_seeds=list(range(plan.count)))
        finally:
            if bar is not None:
                bar.close()
    paths = [folder / f"{i}.png" for i in range(plan.count)]
    return read_images(folder, resolution, paths=paths).pixels, source, folder


def _from_class_dir(ctx, folder: Path, count: int, resolution: int) -> torch.Tensor:
    """The first ``count`` images (sorted by name) of the user's class folder, centre-cropped to size."""
    from cloak.errors import InputError

    if not folder.is_dir():
        raise InputError(f"--class-dir {folder} is not a directory")
    files, _ = input_files(folder)
    if not files:
        raise InputError(f"--class-dir {folder} holds no images")
    if len(files) < count:
        ctx.warn(f"--class-dir {folder} holds {len(files)} image(s); the method asked for {count}: using "
                 f"{len(files)}")
    return read_images(folder, resolution, paths=files[:count]).pixels
