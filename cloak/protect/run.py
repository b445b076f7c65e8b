"""The ``cloak protect`` pipeline: read the set, run the method, write the PNGs within the budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloak._verb import Common, VerbRun, check_output_dir, same_dirs
from cloak.errors import UsageError
from cloak.io.report import Report, Stopwatch


def run_protect(input_dir, output_dir, *, ref: str | None = None, eps: float | str | None = None,
                eps_unit: str | None = None, force_budget: bool = False, steps: int | None = None,
                target_image: str | None = None, common: Common | None = None, **kwargs) -> Report:
    import shutil

    import torch

    from cloak.adversarial import quantize_within_budget
    from cloak.io.images import output_path, read_images, source_metadata, write_png
    from cloak.protect import PROTECT

    common = common or Common(**kwargs)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if same_dirs(input_dir, output_dir):
        raise UsageError("input and output directories are the same; inputs are never modified")
    run = VerbRun("protect", PROTECT, common, default_method="aspl", default_model="sd21-base",
                  output=output_dir, inputs=input_dir)
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

    ctx = run.context(extras={"target_image": target_image,
                              "state_dir": output_dir / ".cloak-state", "resume": common.resume})
    # A method that loads no diffusion model (DLADiff -o layers=zs) reads the images at their own size.
    resolution = run.model_resolution() if run.method_cls.needs_model(opts) or run.resolution_flag else None
    ctx.resolution = resolution or 0
    images = read_images(input_dir, resolution, keep_going=common.keep_going)
    for path, error in images.failures:
        run.add_item({"input": str(path), "status": "failed", "error": error})
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
        ctx.ref = read_images(ref, resolution)
        run.params["ref"] = {"value": str(ref), "source": "flag"}
    elif run.method_cls.uses_ref:
        ctx.warn("no --ref clean reference set given: the input images stand in for it")

    for i in range(len(images)):
        if i not in todo:
            run.add_item({"input": str(images.items[i].path), "output": str(output_path(output_dir, images.names[i])),
                          "status": "skipped"})
    summary: dict[str, Any] = {"budget": {"eps": opts.eps, "unit": opts.unit, "eps_m11": opts.eps_m11}
                               if hasattr(opts, "eps_m11") else None}
    if todo:
        method = run.method_cls(opts, ctx)
        subset = images.subset(todo)
        snapshots: list[str] = []

        def quantize(pixels):
            """8-bit levels as saved: within the method's budget of the input after rounding."""
            eps_m11 = method.budget_m11()
            return quantize_within_budget(pixels, subset.pixels, eps_m11) if eps_m11 is not None else \
                ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

        def snapshot(label: str, pixels) -> None:
            """-o save_every: the set mid-run, quantised like the final output, in OUTPUT/.steps/LABEL/."""
            if not snapshots and (output_dir / ".steps").is_dir():
                shutil.rmtree(output_dir / ".steps")  # an earlier run's snapshots would mix with these
            q = quantize(pixels)
            folder = output_dir / ".steps" / label
            for j, item in enumerate(subset.items):
                write_png(output_path(folder, item.name), q[j].permute(1, 2, 0).numpy(), force=True)
            snapshots.append(str(folder))

        ctx.snapshot = snapshot
        clock = Stopwatch()
        result = method(subset)
        seconds_each = clock.seconds() / len(todo)
        q = quantize(result.pixels)
        q0 = ((subset.pixels.float() + 1) * 127.5).round()
        output_dir.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(todo):
            item = images.items[i]
            unchanged = unchanged_error(q[j], q0[j])
            if unchanged:  # an output equal to its input protects nothing: a failed item, not an ok one
                run.add_item({"input": str(item.path), "status": "failed", "error": unchanged})
                continue
            path = write_png(output_path(output_dir, item.name), q[j].permute(1, 2, 0).numpy(), force=True,
                             metadata=source_metadata(item.path) if keep_metadata else None)
            diff = (q[j].float() - q0[j])
            mse = float(diff.div(255).pow(2).mean())
            extra = result.records[j] if j < len(result.records) else {}
            run.add_item({"input": str(item.path), "output": str(path), "status": "ok",
                          "seconds": round(seconds_each, 4), "linf_255": float(diff.abs().max()),
                          "psnr": round(10 * torch.log10(torch.tensor(1.0 / mse)).item(), 3) if mse > 0 else None,
                          **extra})
        summary.update(result.summary)
        if snapshots:
            summary["snapshots"] = snapshots
    report = run.report(opts_record, summary)
    return run.finish(report, output_dir)
