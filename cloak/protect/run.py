"""The ``cloak protect`` pipeline: read the set, run the method, write the photos within the budget.

Protect returns the photo (``--fit keep``, the default): each image is optimised on a working copy whose
short side is the model's resolution and whose sides are padded (by reflection) up to the latent grid,
and the perturbation is brought back to the photo's own size (:mod:`cloak.protect.native`). What this
changes against the papers, for every method alike: they optimise and evaluate a centre square at the
model's resolution (``--fit crop`` reproduces that, byte for byte); here the objective is optimised on
the whole picture at the working size and the photo is perturbed by a resampled δ, which the attacker's
own resize to the model's resolution brings back close to what was optimised. Shapes other than the
square go to the method as shape buckets (per-image methods: one call per bucket; group methods: the
whole mixed set in one call), and the surrogate's DreamBooth steps still train on square crops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloak._verb import Common, VerbRun, check_output_dir, image_run
from cloak.errors import UsageError
from cloak.io.report import Report, Stopwatch


def run_protect(input_dir, output_dir, *, ref: str | None = None, eps: float | str | None = None,
                eps_unit: str | None = None, force_budget: bool = False, steps: int | None = None,
                target_image: str | None = None, fit: str | None = None, common: Common | None = None,
                **kwargs) -> Report:
    """Protect the images of ``input_dir`` into ``output_dir``; ``fit`` is keep (default), crop or resize."""
    import shutil

    import numpy as np
    import torch

    from cloak.adversarial import quantize_within_budget
    from cloak.io.images import (FITS, MAX_ASPECT, load_pil, multi_frame_warning, output_path, read_images,
                                  read_notes, source_alpha, source_metadata, write_png)
    from cloak.protect import PROTECT
    from cloak.protect.base import per_image
    from cloak.protect.native import RESAMPLING, apply_native, figures, levels

    run, input_dir, output_dir = image_run("protect", PROTECT, input_dir, output_dir, common, kwargs,
                                           default_method="aspl")
    common = run.common
    from cloak.adversarial.budget import budget_flag_layer, check_options_budget, unchanged_error

    # --eps carries its unit (8/255, 8lv, or a number with --eps-unit); [protect] eps/eps_unit in cloak.toml too.
    eps_unit = run.value("eps_unit", eps_unit, None)
    eps = run.value("eps", eps, None)
    force_budget = run.flag("force_budget", force_budget)
    flag_layer: dict[str, Any] = budget_flag_layer(run.method_cls.Options, run.method_name, eps, eps_unit)
    if steps is not None:
        if not run.method_cls.steps_option:
            raise UsageError(f"{run.method_name} has no main step count for --steps")
        flag_layer[run.method_cls.steps_option] = steps
    opts, opts_record = run.options([("flag", flag_layer)])
    check_options_budget(opts, run.method_name, force=force_budget)
    keep_metadata = run.flag("keep_metadata", common.keep_metadata)
    if target_image is not None:
        run.params["target_image"] = {"value": target_image, "source": "flag"}

    fit_mode = run.value("fit", fit, "keep")
    if fit_mode not in FITS:
        raise UsageError(f"unknown --fit {fit_mode!r}; valid: {', '.join(FITS)}")

    ctx = run.context(extras={"target_image": target_image,
                              "state_dir": output_dir / ".cloak-state", "resume": common.resume})
    # A method that loads no diffusion model (DLADiff -o layers=zs) reads the images at their own size.
    resolution = run.model_resolution() if run.method_cls.needs_model(opts) or run.resolution_flag else None
    ctx.resolution = resolution or 0
    grid = latent_grid(run) if resolution is not None else 8
    images = read_images(input_dir, resolution, keep_going=common.keep_going, fit=fit_mode, grid=grid, mixed=True,
                         exclude=output_dir)
    for path, error in images.failures:
        run.add_item({"input": str(path), "status": "failed", "error": error})
    if warning := multi_frame_warning([item.path for item in images.items]):
        ctx.warn(warning)
    thin = [item for item in images.items if item.placement is not None and item.placement.fit == "keep"
            and min(item.placement.content) < (resolution or 0)]
    if thin:
        p = thin[0].placement
        ctx.warn(f"{len(thin)} image(s) longer than {MAX_ASPECT}:1 (e.g. {thin[0].path}, "
                 f"{p.native[0]}×{p.native[1]}) are worked on at {p.content[0]}×{p.content[1]}, below the model's "
                 f"{resolution} px on the short side, to keep the working copy's size bounded; --fit crop works on "
                 f"their centre square instead")
    done = check_output_dir(output_dir, images.names, force=common.force, resume=common.resume)
    todo = list(range(len(images)))
    if done:
        if run.method_cls.group and len(done) < len(images):
            ctx.warn("--resume: a group method optimises the whole set together; recomputing all images")
            common.force = True
        elif not run.method_cls.group:
            todo = [i for i, n in enumerate(images.names) if n not in done]
        else:
            todo = []
    if ref is not None:
        # The reference set only feeds the surrogate's DreamBooth steps: square crops, as an attacker trains.
        ctx.ref = read_images(ref, resolution, fit="crop")
        run.params["ref"] = {"value": str(ref), "source": "flag"}
    elif run.method_cls.uses_ref:
        ctx.warn("no --ref clean reference set given: the input images stand in for it")

    for i in range(len(images)):
        if i not in todo:
            run.add_item({"input": str(images.items[i].path), "output": str(output_path(output_dir, images.names[i])),
                          "status": "skipped"})
    summary: dict[str, Any] = {"budget": {"eps": opts.eps, "unit": opts.unit, "eps_m11": opts.eps_m11}
                               if hasattr(opts, "eps_m11") else None,
                               "fit": fit_mode, "latent_grid": grid}
    if fit_mode != "crop":
        summary["resampling"] = RESAMPLING
    if todo:
        method = run.method_cls(opts, ctx)
        subset = images.subset(todo)
        snapshots: list[str] = []

        def protected(j: int, adv) -> tuple[np.ndarray, np.ndarray]:
            """Image j of the subset as saved (uint8 H×W×3) and the 8-bit image it is measured against."""
            eps_m11 = method.budget_m11()
            clean, placement = subset.tensors[j], subset.items[j].placement
            if placement is None or not placement.maps_back:  # --fit crop: the working square is the output
                q = quantize_within_budget(adv[None], clean[None], eps_m11)[0] if eps_m11 is not None \
                    else levels(adv)
                return q.permute(1, 2, 0).numpy(), levels(clean).permute(1, 2, 0).numpy()
            photo = np.asarray(load_pil(subset.items[j].path), dtype=np.uint8)
            return apply_native(adv, clean, placement, photo, eps_m11), photo

        def snapshot(label: str, pixels) -> None:
            """-o save_every: the set mid-run, brought out like the final output, in OUTPUT/.steps/LABEL/."""
            if not snapshots and (output_dir / ".steps").is_dir():
                shutil.rmtree(output_dir / ".steps")  # an earlier run's snapshots would mix with these
            folder = output_dir / ".steps" / label
            for j, adv in enumerate(per_image(pixels)):
                write_png(output_path(folder, subset.items[j].name), protected(j, adv)[0], force=True)
            snapshots.append(str(folder))

        def write(j: int, adv, seconds: float, extra: dict) -> None:
            item = subset.items[j]
            arr, reference = protected(j, adv)
            unchanged = unchanged_error(torch.as_tensor(np.array(arr)), torch.as_tensor(np.array(reference)))
            if unchanged:  # an output equal to its input protects nothing: a failed item, not an ok one
                run.add_item({"input": str(item.path), "status": "failed", "error": unchanged})
                return
            # The photo's transparency is kept (a square --fit crop output has no alpha that fits it).
            alpha = source_alpha(item.path)
            if alpha is not None and alpha.shape != arr.shape[:2]:
                alpha = None
            path = write_png(output_path(output_dir, item.name), arr, force=True,
                             metadata=source_metadata(item.path) if keep_metadata else None, alpha=alpha)
            written = np.asarray(load_pil(path), dtype=np.uint8)  # figures from the file as saved
            record = {"input": str(item.path), "output": str(path), "status": "ok", "seconds": round(seconds, 4),
                      **figures(written, reference)}
            notes = read_notes(item.path)
            if notes:
                record.update(notes, output_mode="RGBA" if alpha is not None else "RGB")
            if item.placement is not None:
                record.update(item.placement.record())
                record["output_size"] = [int(written.shape[1]), int(written.shape[0])]
                if item.placement.maps_back:
                    record["resampling"] = RESAMPLING
                eps_m11 = method.budget_m11()
                if eps_m11 is not None:
                    record["budget_255"] = float(int(eps_m11 * 127.5 + 1e-6))
            run.add_item({**record, **extra})

        ctx.snapshot = snapshot
        output_dir.mkdir(parents=True, exist_ok=True)
        summaries: list[dict] = []
        # A group method optimises the whole (possibly mixed-shape) set in one call; a per-image method is
        # called once per shape bucket and each bucket is written as soon as its call returns.
        calls = [list(range(len(subset)))] if run.method_cls.group else [b.indices for b in subset.buckets()]
        for indices in calls:
            clock = Stopwatch()
            result = method(subset if run.method_cls.group else subset.subset(indices))
            seconds_each = clock.seconds() / len(indices)
            for k, (j, adv) in enumerate(zip(indices, per_image(result.pixels))):
                write(j, adv, seconds_each, result.records[k] if k < len(result.records) else {})
            summaries.append(result.summary)
        summary.update(merge_summaries(summaries))
        if snapshots:
            summary["snapshots"] = snapshots
    report = run.report(opts_record, summary)
    return run.finish(report, output_dir)


def latent_grid(run: VerbRun) -> int:
    """Working sides are multiples of this: 8 latent pixels × the model's VAE factor (64 for SD).

    Read from the VAE's config file, so a ``--resolution`` run does not load the model just for this.
    """
    import json

    try:
        _, path, _ = run.models.resolve(run.model, "surrogate")
        blocks = json.loads((Path(path) / "vae" / "config.json").read_text())["block_out_channels"]
        factor = 2 ** (len(blocks) - 1)
    except (OSError, KeyError, ValueError, TypeError):
        factor = run.models.sd(run.model).vae_scale_factor
    return 8 * factor


def merge_summaries(summaries: list[dict]) -> dict:
    """One call's summary as is; for several bucket calls, each key's value if they agree, else the list."""
    if len(summaries) == 1:
        return summaries[0]
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for s in summaries for k in s):
        values = [s.get(key) for s in summaries]
        merged[key] = values[0] if all(v == values[0] for v in values) else values
    if summaries:
        merged["calls"] = len(summaries)
    return merged
