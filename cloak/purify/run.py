"""The ``cloak purify`` pipeline: each image through the purifier at its own size."""

from __future__ import annotations

from cloak._verb import Common, check_output_dir, image_run
from cloak.errors import InputError
from cloak.io.report import Report, Stopwatch


def run_purify(input_dir, output_dir, *, common: Common | None = None, **kwargs) -> Report:
    import torch

    from cloak.adversarial.per_image import per_item_generator, pixels_key
    from cloak.io.images import (fit, input_files, load_pil, multi_frame_warning, output_path, pil_to_tensor,
                                  read_notes, source_alpha, source_metadata, write_png)
    from cloak.purify import PURIFY

    run, input_dir, output_dir = image_run("purify", PURIFY, input_dir, output_dir, common, kwargs,
                                           default_method="jpeg")
    common = run.common
    opts, opts_record = run.options()
    keep_metadata = run.flag("keep_metadata", common.keep_metadata)
    files, base = input_files(input_dir, exclude=output_dir)
    if not files:
        raise InputError(f"no images found in {input_dir}")
    names = [str(p.relative_to(base).with_suffix("")) for p in files]
    done = set(check_output_dir(output_dir, names, force=common.force, resume=common.resume))
    if not common.keep_going:
        # An unreadable input stops the run before anything is written, as protect's does: otherwise the
        # images before it are left in OUTPUT with no report.json, and the rerun trips over them. Decoding
        # twice costs far less than any purifier.
        for path, name in zip(files, names):
            if name not in done:
                load_pil(path)
    ctx = run.context()
    if warning := multi_frame_warning(files):
        ctx.warn(warning)
    method = run.method_cls(opts, ctx)
    resolution = int(run.resolution_flag) if run.resolution_flag else None
    prepared = False
    prepare_seconds = 0.0
    lpips_to_input = _purify_lpips(ctx)
    output_dir.mkdir(parents=True, exist_ok=True)
    with ctx.progress.task(f"purify {run.method_name}", len(files)) as bar:
        for path, name in zip(files, names):
            out = output_path(output_dir, name)
            if name in done:
                run.add_item({"input": str(path), "output": str(out), "status": "skipped"})
                bar.advance(1)
                continue
            clock = Stopwatch()
            try:
                img = load_pil(path)
                if resolution:
                    img = fit(img, resolution)
                x = pil_to_tensor(img).unsqueeze(0)
                if not prepared:
                    # Model loading, timed apart from the per-image seconds (reported in the summary).
                    prep = Stopwatch()
                    method.prepare()
                    prepared = True
                    prepare_seconds = prep.seconds()
                    clock = Stopwatch()
                method.record = {}  # per-image figures a method may add (faces restored, t*, ...)
                # Each image's noise comes from its own stream (seed, its 8-bit pixels): its result does
                # not depend on the other images, their order, or which ones --resume skipped.
                ctx.generator = per_item_generator(run.seed, pixels_key(x[0]))
                with torch.no_grad() if not getattr(method, "needs_grad", False) else _null():
                    y = method(x.to(ctx.device)).detach().float().cpu().clamp(-1, 1)
                seconds = clock.seconds()
                if y.shape != x.shape:
                    raise RuntimeError(f"{run.method_name} changed the image size {tuple(x.shape)} → {tuple(y.shape)}")
                alpha = source_alpha(path)  # kept, unless --resolution changed the size
                if alpha is not None and alpha.shape != tuple(y.shape[-2:]):
                    alpha = None
                write_png(out, y[0], force=True, metadata=source_metadata(path) if keep_metadata else None,
                          alpha=alpha)
            except InputError as exc:
                if not common.keep_going:
                    raise
                run.add_item({"input": str(path), "status": "failed", "error": str(exc)})
                bar.advance(1)
                continue
            notes = read_notes(path)
            source = {**notes, "output_mode": "RGBA" if alpha is not None else "RGB"} if notes else {}
            qx, qy = ((x + 1) * 127.5).round(), ((y + 1) * 127.5).round()
            mse = float(((qx - qy) / 255).pow(2).mean())
            run.add_item({"input": str(path), "output": str(out), "status": "ok", "seconds": seconds,
                          "psnr_to_input": round(10 * torch.log10(torch.tensor(1 / mse)).item(), 3) if mse else None,
                          "linf_255_to_input": float((qx - qy).abs().max()),
                          "lpips_to_input": lpips_to_input(qx / 127.5 - 1, qy / 127.5 - 1) if lpips_to_input else None,
                          **getattr(method, "record", {}), **source})
            bar.advance(1)
    timed = [i.seconds for i in run.items if i.status == "ok" and i.seconds is not None]
    summary = {
        "lpips": {"net": "alex", "of": "8-bit output vs input", "computed": lpips_to_input is not None},
        "prepare_seconds": round(prepare_seconds, 4),
        "seconds_per_image": round(sum(timed) / len(timed), 4) if timed else None,
        # DiffShortcut Table 2 counts model loading in its time per sample.
        "seconds_per_image_with_loading": round((prepare_seconds + sum(timed)) / len(timed), 4) if timed else None,
    }
    report = run.report(opts_record, summary)
    return run.finish(report, output_dir)


def _purify_lpips(ctx):
    """LPIPS-alex(output, input) per purified image, or None with a warning when its weights are missing.

    A missing LPIPS backbone must not fail a purification: the items then record ``lpips_to_input: null``.
    """
    import torch

    from cloak.errors import ModelUnavailableError
    from cloak.models.lpips import MIN_SIDE, distance, lpips_model

    try:
        model = lpips_model(ctx.models, "alex", role="report-lpips")
    except ModelUnavailableError as exc:
        reason = str(exc).replace("\nhint: ", "; ")
        ctx.warn(f"LPIPS to the input not computed (lpips_to_input: null): {reason}")
        return None

    def lpips_to_input(a, b):
        if min(a.shape[-2:]) < MIN_SIDE["alex"]:
            return None
        with torch.no_grad():
            return round(float(distance(model, a.to(ctx.device), b.to(ctx.device))[0]), 5)

    return lpips_to_input


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
