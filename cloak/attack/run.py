"""The ``cloak attack`` pipeline: personalize a model on the images, then generate from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloak._verb import Common, check_output_dir, image_run
from cloak.errors import OutputExistsError, UsageError
from cloak.io.report import Report, Stopwatch


def save_model_dir(sd, unet, text_encoder, target: Path, *, note: dict) -> Path:
    """A complete diffusers model directory (loadable with --model DIR), written atomically."""
    import json
    import shutil

    from cloak.diffusion.sampling import build_pipeline
    from cloak.io.output import new_model_dir

    with new_model_dir(target) as staging:
        pipe = build_pipeline(sd, unet=unet, text_encoder=text_encoder)
        pipe.save_pretrained(staging, safe_serialization=True)
        # Keep the base model's own sampler config rather than whatever the pipeline object holds.
        shutil.copytree(Path(sd.path) / "scheduler", staging / "scheduler", dirs_exist_ok=True)
        (staging / "cloak_model.json").write_text(json.dumps(note, indent=2), encoding="utf-8")
    return target


def run_attack(input_dir, output_dir, *, ref: str | None = None, prompts: list[str] | None = None,
               num_images: int | None = None, sample_steps: int | None = None, guidance: float | None = None,
               negative_prompt: str | None = None, sampler: str | None = None, save_model: str | None = None,
               steps: int | None = None, preset: str | None = None, common: Common | None = None,
               **kwargs) -> Report:
    """``preset``: a paper's attack settings by name (cloak.attack.presets); explicit values override it."""
    import dataclasses
    import shutil

    from cloak.attack import ATTACK
    from cloak.attack.base import Condition
    from cloak.diffusion.evaluate import fixed_denoising_loss
    from cloak.diffusion.sampling import SAMPLERS, build_pipeline, generate, slug
    from cloak.io.images import read_images, write_png

    chosen = None
    if preset is not None:
        from cloak.attack.presets import get_preset

        chosen = get_preset(preset)
        common = common or Common(**kwargs)
        # The preset's method and base model rank as given on this command line (above cloak.toml);
        # --method / --model given explicitly win.
        given = {"method": common.method, "model": common.model}
        common = dataclasses.replace(common, method=common.method or chosen.method,
                                     model=common.model or chosen.model)
    run, input_dir, output_dir = image_run("attack", ATTACK, input_dir, output_dir, common, kwargs,
                                           default_method="dreambooth")
    common = run.common
    preset_layers: list[tuple[str, dict]] = []
    if chosen is not None:
        from cloak.attack.presets import preset_layer

        for key in ("method", "model"):
            if given[key] is None:
                run.params[key]["source"] = f"preset {chosen.name}"
        run.params["preset"] = {"value": chosen.name, "source": "flag"}
        preset_layers = [(f"preset {chosen.name}", preset_layer(chosen, run.method_cls.Options, run.method_name))]
    flags: dict[str, Any] = {k: v for k, v in dict(prompts=prompts, num_images=num_images, sample_steps=sample_steps,
                                                   guidance=guidance, negative_prompt=negative_prompt,
                                                   sampler=sampler).items() if v is not None}
    if steps is not None:
        if run.method_cls.steps_option is None:
            raise UsageError(f"--steps: attack {run.method_name} trains nothing (zero-shot)")
        flags[run.method_cls.steps_option] = steps
    opts, opts_record = run.options(preset_layers + [("flag", flags)])
    if getattr(opts, "sampler", "default") not in SAMPLERS:
        raise UsageError(f"unknown sampler {opts.sampler!r}; valid: {', '.join(SAMPLERS)}")
    if save_model and not run.method_cls.fine_tunes:
        raise UsageError(f"--save-model: attack {run.method_name} fine-tunes nothing (zero-shot); there is no "
                         "model to keep")
    gen_dir = output_dir / "gen"
    planned = [f"{slug(p)}/{s}" for p in getattr(opts, "prompts", []) for s in range(getattr(opts, "num_images", 0))]
    if run.method_cls.per_reference:  # gen/<reference image>/<prompt>/<seed>.png
        from cloak.io.images import input_files

        ref_files, base = input_files(input_dir)
        refs = [str(f.relative_to(base).with_suffix("")) for f in ref_files]
        planned = [f"{r}/{p}" for r in refs for p in planned]
    done = set(check_output_dir(gen_dir, planned, force=common.force, resume=common.resume))
    if save_model:
        run.params["save_model"] = {"value": str(save_model), "source": "flag"}
        # --force replaces the model folder with rmtree: it must never be (or hold, or sit inside) the photos
        # read or the run's OUTPUT; `--force --save-model photos/ photos/ out/` used to delete the photos.
        target = Path(save_model).resolve()
        for what, other in (("input", input_dir), ("--ref", ref), ("output", output_dir)):
            if other is None or str(other) == "-":
                continue
            other = Path(other).resolve()
            if target == other or target in other.parents or other in target.parents:
                raise UsageError(f"--save-model {save_model} overlaps the {what} directory {other}; "
                                 "keep the model in a folder of its own")
        if Path(save_model).exists() and any(Path(save_model).iterdir()):
            if not common.force:
                raise OutputExistsError(f"model directory {save_model} exists and is not empty", hint="pass --force")
            shutil.rmtree(save_model)

    # Training loops checkpoint into OUTPUT/.checkpoint (hidden: score ignores it); --resume continues there.
    ctx = run.context(extras={"checkpoint_dir": output_dir / ".checkpoint",
                              "resume": common.resume and not common.force})
    resolution = run.model_resolution()
    ctx.resolution = resolution
    images = read_images(input_dir, resolution, keep_going=common.keep_going)
    for path, error in images.failures:
        run.add_item({"input": str(path), "status": "failed", "error": error})
    method = run.method_cls(opts, ctx)
    clock = Stopwatch()
    result = method(images)
    summary: dict[str, Any] = {"train_seconds": clock.seconds(), **result.summary}
    if chosen is not None:
        source = f"preset {chosen.name}"
        summary["preset"] = {
            "name": chosen.name, "source": chosen.source, "method": chosen.method, "model": chosen.model,
            "options": chosen.options,
            # What the command line changed: the method/model given explicitly and options from flags or -o.
            "overridden": sorted([k for k in ("method", "model") if given[k] not in (None, getattr(chosen, k))]
                                 + [k for k in chosen.options if opts_record.get(k, {}).get("source") != source]),
            **({"notes": chosen.notes} if chosen.notes else {})}
    sd = ctx.models.sd(ctx.model, role="base")
    if ref is not None:
        clean = read_images(ref, resolution)
        run.params["ref"] = {"value": str(ref), "source": "flag"}
        prompt = getattr(opts, "instance_prompt", "a photo of sks person")
        summary["ref_denoising_loss"] = fixed_denoising_loss(result.unet, result.text_encoder, sd, clean.pixels, prompt)
        summary["ref_denoising_loss_note"] = ("L_dn of the fine-tuned model on the clean --ref images with the "
                                              "instance prompt, fixed (t, ε) draws: higher = the subject was "
                                              "learned worse")
    if save_model:
        note = {"made_by": f"cloak attack {run.method_name}", "base": sd.id, "stand_in": sd.stand_in}
        if result.save is not None:  # the method's own format (LoRA: a small adapter file)
            result.save(Path(save_model), note)
        else:
            save_model_dir(sd, result.unet, result.text_encoder, Path(save_model), note=note)
    pipe = build_pipeline(sd, unet=result.unet, text_encoder=result.text_encoder, sampler=opts.sampler)
    if result.pipeline_hook is not None:
        result.pipeline_hook(pipe)
    # What the pipeline is actually given: the method may resolve these itself (DiffShortcut).
    suffix = result.sampling.get("prompt_suffix", "")
    negative = result.sampling.get("negative_prompt", opts.negative_prompt)
    guidance = result.sampling.get("guidance", opts.guidance)
    conditions = result.conditions if result.conditions is not None else [Condition()]
    clock = Stopwatch()
    count = 0
    total = sum(1 for c in conditions for p in opts.prompts for s in range(opts.num_images)
                if "/".join(filter(None, (c.name, slug(p), str(s)))) not in done)
    with ctx.progress.task("sampling", total) as bar:
        for cond in conditions:
            for prompt in opts.prompts:
                folder = gen_dir / cond.name / slug(prompt)
                key = "/".join(filter(None, (cond.name, slug(prompt))))
                seeds = [s for s in range(opts.num_images) if f"{key}/{s}" not in done]
                for s in range(opts.num_images):
                    if s not in seeds:
                        run.add_item({"output": str(folder / f"{s}.png"), "status": "skipped", "prompt": prompt,
                                      "seed": s, **cond.record})

                def save(i: int, arr, prompt=prompt, seeds=seeds, folder=folder, cond=cond) -> None:
                    nonlocal count
                    path = write_png(folder / f"{seeds[i]}.png", arr, force=True)
                    count += 1
                    bar.advance(1)
                    run.add_item({"output": str(path), "status": "ok", "prompt": prompt, "seed": seeds[i],
                                  **cond.record})

                if seeds:  # fixed batches over all seeds: a resumed image has the bytes it would have had
                    generate(pipe, prompt + suffix, seeds, steps=opts.sample_steps, guidance=guidance,
                             resolution=resolution, negative_prompt=negative, on_image=save,
                             all_seeds=list(range(opts.num_images)), **cond.pipe_kwargs)
    summary["sample_seconds_per_image"] = round(clock.seconds() / count, 4) if count else None
    summary["prompts"] = {slug(p): p for p in opts.prompts}
    summary["sampling"] = {"sampler": opts.sampler, "steps": opts.sample_steps, "guidance": guidance,
                           "negative_prompt": negative, "prompt_suffix": suffix, "resolution": resolution,
                           "seeds": list(range(opts.num_images)), "conditions": [c.name for c in conditions if c.name]}
    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(output_dir / ".checkpoint", ignore_errors=True)  # the run finished: nothing left to resume
    report = run.report(opts_record, summary)
    return run.finish(report, output_dir)
