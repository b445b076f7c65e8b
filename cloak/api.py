"""The verbs as Python functions. The CLI parses flags and calls these; so can any script.

Each run: resolve configuration (flag > env > cloak.toml > default, sources recorded), check the
output location before any work, read inputs (bad files are input errors naming the file), resolve
models (missing weights → exit 4 with the pull command), run the method, write outputs atomically,
write ``report.json``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloak._progress import Progress
from cloak.config import Config, cache_dir as resolve_cache_dir, load_config
from cloak.errors import InputError, OutputExistsError, PartialFailure, UsageError
from cloak.io.report import ItemRecord, Report, Stopwatch, now_iso, versions
from cloak.methods import RunContext, build_options

log = logging.getLogger("cloak")

STAND_IN_WARNING = ("stand-in models with random weights were used ({ids}): this run protects nothing and "
                    "measures nothing; it only exercises the code path")
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


@dataclass
class Common:
    """Flags shared by the image/model verbs, before resolution."""

    method: str | None = None
    model: str | None = None
    tiny: bool = False
    effort: float | None = None
    resolution: int | None = None
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # -o key=value
    force: bool = False
    resume: bool = False
    keep_going: bool = False
    keep_metadata: bool = False  # protect/purify: copy EXIF/ICC/dpi/text from each source (default: strip)
    compat: bool = False
    config: str | Config | None = None
    cache_dir: str | None = None
    argv: list[str] | None = None
    progress: Progress | None = None
    on_item: Callable[[dict], None] | None = None  # --jsonl


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    import re

    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", requested):
        raise UsageError(f"unknown --device {requested!r}; valid: auto, cpu, cuda, cuda:N, mps")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested} requested but CUDA is not available", hint="use --device cpu")
        index = int(requested.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if requested == "mps" and not _mps_available():
        raise UsageError("--device mps requested but MPS is not available", hint="use --device cpu")
    return requested


class VerbRun:
    """Shared set-up of one verb invocation: config, models, context, report."""

    def __init__(self, verb: str, registry, common: Common, default_method: str, default_model: str | None):
        self.verb = verb
        self.common = common
        self.clock = Stopwatch()
        self.started = now_iso()
        self.cfg = common.config if isinstance(common.config, Config) else load_config(common.config)
        self.params: dict[str, dict[str, Any]] = {}
        self.method_name = self.value("method", common.method, default_method)
        self.method_cls = registry.get(self.method_name)
        # A method may name its own base model (PhotoGuard: sd15, Mist: sd14); the verb's default otherwise.
        method_model = getattr(self.method_cls, "default_model", None)
        self.model = self.value("model", common.model, method_model or default_model)
        self.effort = float(self.value("effort", common.effort, 1.0))
        if not self.effort > 0:
            raise UsageError(f"--effort must be > 0, got {self.effort}")
        self.seed = int(self.value("seed", common.seed, 0))
        self.device_name = str(self.value("device", common.device, "auto"))
        dtype_name = str(self.value("dtype", common.dtype, "fp32"))
        if dtype_name not in DTYPES:
            raise UsageError(f"unknown --dtype {dtype_name!r}; valid: fp32, bf16, fp16")
        self.dtype_name = DTYPES[dtype_name]
        self.resolution_flag = self.value("resolution", common.resolution, None)
        if self.resolution_flag is not None and (isinstance(self.resolution_flag, bool) or
                                                 not isinstance(self.resolution_flag, int) or self.resolution_flag < 1):
            raise UsageError(f"--resolution must be a positive number of pixels, got {self.resolution_flag!r}")
        self.cache = resolve_cache_dir(common.cache_dir or self.cfg.defaults.get("cache_dir"))
        self.warnings: list[str] = []
        self.items: list[ItemRecord] = []

    def value(self, key: str, flag: Any, default: Any) -> Any:
        resolved = self.cfg.resolve(self.verb, key, flag, default)
        self.params[key] = resolved.as_dict()
        return resolved.value

    def flag(self, key: str, flag: bool) -> bool:
        """A boolean switch: on from the command line, or from cloak.toml (``keep_metadata = true``)."""
        value = self.value(key, True if flag else None, False)
        if not isinstance(value, bool):
            raise UsageError(f"{key} in cloak.toml must be true or false, got {value!r}")
        return value

    def options(self, extra_layers: list[tuple[str, dict]] | None = None):
        layers = [("config", self.cfg.method(self.verb, self.method_name))]
        layers += extra_layers or []
        layers.append(("-o", self.common.options))
        return build_options(self.method_cls.Options, layers, self.method_name)

    def context(self, *, resolution: int | None = None, ref=None, extras: dict | None = None) -> RunContext:
        import torch

        from cloak.models.handle import Models

        device = torch.device(_pick_device(self.device_name))
        dtype = getattr(torch, self.dtype_name)
        self.models = Models(cache_dir=self.cache, device=device, dtype=dtype, tiny=self.common.tiny,
                             overrides=self.cfg.models)
        generator = torch.Generator("cpu").manual_seed(self.seed)
        return RunContext(models=self.models, model=self.model, device=device, dtype=dtype, seed=self.seed,
                          generator=generator, resolution=resolution or 0, cache_dir=self.cache,
                          progress=self.common.progress or Progress(), effort=self.effort,
                          compat=self.common.compat, ref=ref, extras=extras or {}, warnings=self.warnings)

    def model_resolution(self) -> int:
        """--resolution, or the model's native size (512 for SD, 64 for tiny-sd) read from its config."""
        if self.resolution_flag:
            res = int(self.resolution_flag)
            if res < 8 or res % 8:
                raise UsageError(f"--resolution must be a positive multiple of 8, got {res}")
            return res
        return self.models.sd(self.model).resolution

    def add_item(self, record: dict) -> None:
        item = ItemRecord(**record)
        self.items.append(item)
        if self.common.on_item:
            self.common.on_item(item.model_dump(mode="json", exclude_none=True))

    def report(self, opts_record: dict, summary: dict, method_info: dict | None = None, models=None) -> Report:
        import torch

        records = models if models is not None else (self.models.records() if hasattr(self, "models") else [])
        stand_ins = sorted({r.id for r in records if r.stand_in})
        if stand_ins:
            self.warnings.insert(0, STAND_IN_WARNING.format(ids=", ".join(stand_ins)))
        counts = {s: sum(1 for i in self.items if i.status == s) for s in ("ok", "failed", "skipped")}
        return Report(
            verb=self.verb, method=self.method_name, method_info=method_info or self.method_cls.info(),
            argv=self.common.argv if self.common.argv is not None else sys.argv, options=opts_record,
            params=self.params, models=records, seed=self.seed,
            device=str(self.models.device) if hasattr(self, "models") else None,
            dtype=self.dtype_name, versions=versions() | {"torch": torch.__version__}, started=self.started,
            seconds=self.clock.seconds(), warnings=self.warnings, items=self.items,
            summary={**counts, "stand_in": bool(stand_ins), **summary},
        )

    def finish(self, report: Report, out_dir: Path) -> Report:
        report.write(out_dir)
        failed = sum(1 for i in self.items if i.status == "failed")
        if failed:
            exc = PartialFailure(f"{failed} of {len(self.items)} items failed; see {out_dir / 'report.json'}")
            exc.report = report
            raise exc
        return report


def check_output_dir(out_dir: Path, names: list[str], *, force: bool, resume: bool, suffix: str = ".png") -> list[str]:
    """Fail before any work if outputs would be overwritten; return the names already done."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output {out_dir} exists and is not a directory")
    done = [n for n in names if (out_dir / f"{n}{suffix}").is_file()]
    if done and not (force or resume):
        raise OutputExistsError(f"{len(done)} output(s) already exist in {out_dir} (e.g. {done[0]}{suffix})",
                                hint="pass --force to overwrite or --resume to skip finished items")
    return done if resume and not force else []


def same_dirs(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# protect


def run_protect(input_dir, output_dir, *, ref: str | None = None, eps: float | None = None,
                eps_unit: str | None = None, steps: int | None = None, target_image: str | None = None,
                common: Common | None = None, **kwargs) -> Report:
    import shutil

    import torch

    from cloak.adversarial import quantize_within_budget
    from cloak.io.images import output_path, read_images, source_metadata, write_png
    from cloak.protect import PROTECT

    common = common or Common(**kwargs)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if same_dirs(input_dir, output_dir):
        raise UsageError("input and output directories are the same; inputs are never modified")
    run = VerbRun("protect", PROTECT, common, default_method="aspl", default_model="sd21-base")
    flag_layer: dict[str, Any] = {}
    fields = run.method_cls.Options.model_fields
    if eps is not None:
        flag_layer["eps"] = eps
    if eps_unit is not None:
        from cloak.adversarial import UNITS

        if eps_unit not in UNITS:
            raise UsageError(f"unknown --eps-unit {eps_unit!r}; valid: {', '.join(UNITS)}")
        flag_layer["unit"] = eps_unit
        if "alpha" in fields and "alpha" not in common.options and "unit" in fields:
            # A new unit converts the default step so it means the same thing.
            from cloak.adversarial.budget import from_m11, to_m11

            default_unit = fields["unit"].default
            flag_layer["alpha"] = from_m11(to_m11(fields["alpha"].default, default_unit), eps_unit)
    if steps is not None:
        if not run.method_cls.steps_option:
            raise UsageError(f"{run.method_name} has no main step count for --steps")
        flag_layer[run.method_cls.steps_option] = steps
    opts, opts_record = run.options([("flag", flag_layer)])
    keep_metadata = run.flag("keep_metadata", common.keep_metadata)
    if target_image is not None:
        run.params["target_image"] = {"value": target_image, "source": "flag"}

    ctx = run.context(extras={"target_image": target_image})
    resolution = run.model_resolution()
    ctx.resolution = resolution
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


# ------------------------------------------------------------------------------------------------
# attack


def save_model_dir(sd, unet, text_encoder, target: Path, *, note: dict) -> Path:
    """A complete diffusers model directory (loadable with --model DIR), written atomically."""
    import json
    import shutil
    import tempfile

    from cloak.diffusion.sampling import build_pipeline

    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise OutputExistsError(f"model directory {target} exists and is not empty", hint="pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pipe = build_pipeline(sd, unet=unet, text_encoder=text_encoder)
        pipe.save_pretrained(staging, safe_serialization=True)
        # Keep the base model's own sampler config rather than whatever the pipeline object holds.
        shutil.copytree(Path(sd.path) / "scheduler", staging / "scheduler", dirs_exist_ok=True)
        (staging / "cloak_model.json").write_text(json.dumps(note, indent=2), encoding="utf-8")
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def run_attack(input_dir, output_dir, *, ref: str | None = None, prompts: list[str] | None = None,
               num_images: int | None = None, sample_steps: int | None = None, guidance: float | None = None,
               negative_prompt: str | None = None, sampler: str | None = None, save_model: str | None = None,
               steps: int | None = None, common: Common | None = None, **kwargs) -> Report:
    import shutil

    from cloak.attack import ATTACK
    from cloak.attack.base import Condition
    from cloak.diffusion.evaluate import fixed_denoising_loss
    from cloak.diffusion.sampling import SAMPLERS, build_pipeline, generate, slug
    from cloak.io.images import read_images, write_png

    common = common or Common(**kwargs)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if same_dirs(input_dir, output_dir):
        raise UsageError("input and output directories are the same; inputs are never modified")
    run = VerbRun("attack", ATTACK, common, default_method="dreambooth", default_model="sd21-base")
    flags: dict[str, Any] = {k: v for k, v in dict(prompts=prompts, num_images=num_images, sample_steps=sample_steps,
                                                   guidance=guidance, negative_prompt=negative_prompt,
                                                   sampler=sampler).items() if v is not None}
    if steps is not None:
        if run.method_cls.steps_option is None:
            raise UsageError(f"--steps: attack {run.method_name} trains nothing (zero-shot)")
        flags[run.method_cls.steps_option] = steps
    opts, opts_record = run.options([("flag", flags)])
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

                generate(pipe, prompt + suffix, seeds, steps=opts.sample_steps, guidance=guidance,
                         resolution=resolution, negative_prompt=negative, on_image=save, **cond.pipe_kwargs)
    summary["sample_seconds_per_image"] = round(clock.seconds() / count, 4) if count else None
    summary["prompts"] = {slug(p): p for p in opts.prompts}
    summary["sampling"] = {"sampler": opts.sampler, "steps": opts.sample_steps, "guidance": guidance,
                           "negative_prompt": negative, "prompt_suffix": suffix, "resolution": resolution,
                           "seeds": list(range(opts.num_images)), "conditions": [c.name for c in conditions if c.name]}
    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(output_dir / ".checkpoint", ignore_errors=True)  # the run finished: nothing left to resume
    report = run.report(opts_record, summary)
    return run.finish(report, output_dir)


# ------------------------------------------------------------------------------------------------
# purify


def run_purify(input_dir, output_dir, *, common: Common | None = None, **kwargs) -> Report:
    import torch

    from cloak.io.images import fit, input_files, load_pil, output_path, pil_to_tensor, source_metadata, write_png
    from cloak.purify import PURIFY

    common = common or Common(**kwargs)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if same_dirs(input_dir, output_dir):
        raise UsageError("input and output directories are the same; inputs are never modified")
    run = VerbRun("purify", PURIFY, common, default_method="jpeg", default_model="sd21-base")
    opts, opts_record = run.options()
    keep_metadata = run.flag("keep_metadata", common.keep_metadata)
    files, base = input_files(input_dir)
    if not files:
        raise InputError(f"no images found in {input_dir}")
    names = [str(p.relative_to(base).with_suffix("")) for p in files]
    done = set(check_output_dir(output_dir, names, force=common.force, resume=common.resume))
    ctx = run.context()
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
                with torch.no_grad() if not getattr(method, "needs_grad", False) else _null():
                    y = method(x.to(ctx.device)).detach().float().cpu().clamp(-1, 1)
                seconds = clock.seconds()
                if y.shape != x.shape:
                    raise RuntimeError(f"{run.method_name} changed the image size {tuple(x.shape)} → {tuple(y.shape)}")
                write_png(out, y[0], force=True, metadata=source_metadata(path) if keep_metadata else None)
            except InputError as exc:
                if not common.keep_going:
                    raise
                run.add_item({"input": str(path), "status": "failed", "error": str(exc)})
                bar.advance(1)
                continue
            qx, qy = ((x + 1) * 127.5).round(), ((y + 1) * 127.5).round()
            mse = float(((qx - qy) / 255).pow(2).mean())
            run.add_item({"input": str(path), "output": str(out), "status": "ok", "seconds": seconds,
                          "psnr_to_input": round(10 * torch.log10(torch.tensor(1 / mse)).item(), 3) if mse else None,
                          "linf_255_to_input": float((qx - qy).abs().max()),
                          "lpips_to_input": lpips_to_input(qx / 127.5 - 1, qy / 127.5 - 1) if lpips_to_input else None,
                          **getattr(method, "record", {})})
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


# ------------------------------------------------------------------------------------------------
# score


def run_score(generated_dir, *, ref: str | None = None, metrics: list[str] | None = None,
              fail_if: list[str] | None = None, report_path: str | None = None, per_subdir: bool | None = None,
              sheet: str | None = None, common: Common | None = None, **kwargs) -> Report:
    """Score GENERATED against the clean REF (or each GEN_ROOT/<name>/ against REF_ROOT/<name>/ with
    ``per_subdir``); gates raise :class:`GateFailed` (exit 6). The run lives in :mod:`cloak.score.runner`."""
    from cloak.score.runner import score_run

    return score_run(generated_dir, ref=ref, metrics=metrics, fail_if=fail_if, report_path=report_path,
                     per_subdir=per_subdir, sheet=sheet, common=common or Common(**kwargs))
