"""``run_immunize``: the immunize verb as a Python function (the CLI calls it; so can any script).

The run follows the other verbs (``cloak.api``): resolve configuration, check the output before any
work, read the images, run the method, write the result atomically with its ``report.json``. The
result is a complete diffusers model directory in which only the UNet differs from the base model:
the other components are copied byte for byte.

Long runs checkpoint into a hidden staging directory next to the output (``.<name>.partial/``);
``--resume`` continues from the last checkpoint bit for bit, and the directory is removed once the
model is written.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cloak._verb import Common, VerbRun, same_dirs
from cloak.errors import InputError, OutputExistsError, UsageError
from cloak.io.output import apply_umask, staging_dir
from cloak.io.report import Report, Stopwatch

log = logging.getLogger("cloak.immunize")

DEFAULT_CHECKPOINT_EVERY = 50  # [PROP] outer iterations between checkpoints (~minutes apart on SD 1.5)
COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
_VARIANT = re.compile(r"\.(fp16|bf16|non_ema|ema)\.")
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb"}


def partial_dir(output_dir: Path) -> Path:
    """Where an unfinished run keeps its checkpoints: hidden, next to the output."""
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.partial"


def _is_complete(output_dir: Path) -> bool:
    return all((output_dir / name).exists() for name in ("report.json", "cloak_model.json", "unet"))


def run_immunize(input_dir, output_dir, *, safe: str | None = None, checkpoint_every: int | None = None,
                 common: Common | None = None, **kwargs) -> Report:
    """Immunize the base model (``--model``, default sd15) against personalization on ``input_dir``.

    Writes a diffusers model directory ``output_dir`` (loadable with ``cloak attack --model DIR``)
    containing ``report.json``; returns the report.
    """
    from cloak.immunize import IMMUNIZE
    from cloak.immunize.base import Checkpoints
    from cloak.io.images import read_images

    common = common or Common(**kwargs)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if same_dirs(input_dir, output_dir) or (safe is not None and same_dirs(Path(safe), output_dir)):
        raise UsageError("the output directory is an input directory; inputs are never modified")
    # --force replaces OUTPUT as a whole (renamed away, then deleted): an OUTPUT that holds the photos
    # (`cloak immunize --force data/photos data`) would take them with it.
    for what, folder in (("INPUT", input_dir), ("--safe", safe)):
        if folder is None or str(folder) == "-":
            continue
        if output_dir.resolve() in Path(folder).resolve().parents:
            raise UsageError(f"the output directory {output_dir} holds the {what} directory {folder}; "
                             "write the model to a folder of its own (inputs are never modified)")
    run = VerbRun("immunize", IMMUNIZE, common, default_method="apdm", default_model="sd15")
    opts, opts_record = run.options()
    every = int(run.value("checkpoint_every", checkpoint_every, DEFAULT_CHECKPOINT_EVERY))
    if every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0 (0 = never), got {every}")
    if safe is not None:
        run.params["safe"] = {"value": str(safe), "source": "flag"}

    # The output, before any work.
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output {output_dir} exists and is not a directory")
    occupied = output_dir.is_dir() and any(output_dir.iterdir())
    if occupied and common.resume and not common.force and _is_complete(output_dir):
        log.info("%s is already complete (--resume): nothing to do", output_dir)
        return Report.model_validate_json((output_dir / "report.json").read_text(encoding="utf-8"))
    if occupied and not common.force:
        raise OutputExistsError(f"output directory {output_dir} exists and is not empty",
                                hint="pass --force to replace it")
    staging = partial_dir(output_dir)
    if staging.exists():
        if common.force:
            shutil.rmtree(staging)
        elif not common.resume:
            raise OutputExistsError(f"an interrupted run left checkpoints in {staging}",
                                    hint="pass --resume to continue it, or --force to start over")

    ctx = run.context()
    resolution = run.model_resolution()
    ctx.resolution = resolution
    subject = read_images(input_dir, resolution)
    safe_set = read_images(safe, resolution) if safe is not None else None
    if safe_set is not None and len(safe_set) != len(subject):
        raise InputError(f"the paired safe set {safe} has {len(safe_set)} images but the subject has "
                         f"{len(subject)}: image i of --safe pairs with image i of INPUT (natural sort order)")
    _, base_path, _ = ctx.models.resolve(ctx.model, "base")
    fingerprint = {
        "method": run.method_name, "options": {k: v["value"] for k, v in opts_record.items()},
        "model": str(base_path), "seed": run.seed, "effort": run.effort, "resolution": resolution,
        "compat": common.compat, "dtype": run.dtype_name,
        "subject": [item.sha256 for item in subject.items],
        "safe": [item.sha256 for item in safe_set.items] if safe_set is not None else None,
    }
    checkpoints = Checkpoints(staging, every, fingerprint, resume=common.resume)
    if common.resume:
        state = checkpoints.check()  # a checkpoint of another run is refused before any work
        if state is None:
            log.info("--resume: no checkpoint in %s; starting from the beginning", staging)

    method = run.method_cls(opts, ctx)
    clock = Stopwatch()
    try:
        result = method(subject, safe_set, checkpoints)
    except KeyboardInterrupt:
        if checkpoints.exists():
            log.warning("interrupted; the last checkpoint is kept in %s: repeat the command with --resume to "
                        "continue", staging)
        raise
    seconds = clock.seconds()
    sd = ctx.models.sd(ctx.model, role="base")
    for i, item in enumerate(subject.items):
        run.add_item({"input": str(item.path), "status": "ok", "role": "subject",
                      "paired_safe": result.safe_paths[i] if i < len(result.safe_paths) else None})
    run.add_item({"output": str(output_dir), "status": "ok", "role": "model", "seconds": seconds})
    from cloak.attack.presets import IMMUNIZE_PRESET, attack_command

    summary = {**result.summary, "model_dir": str(output_dir), "checkpoint_every": every,
               "changed_components": ["unet"]}
    preset = IMMUNIZE_PRESET.get(run.method_name)
    if preset is not None:  # the paper's own evaluation of this model (the CLI prints it on stderr)
        summary["attack_command"] = attack_command(preset, output_dir, input_dir)
    report = run.report(opts_record, summary)
    # The base is named so that `cloak attack --model OUTPUT` samples its class images from the unmodified
    # base, as APDM's evaluation does (train_dreambooth.py generates them before the immunized UNet is loaded).
    note = {"made_by": f"cloak immunize {run.method_name}", "base": sd.id, "base_path": str(sd.path),
            "base_digest": sd.digest, "stand_in": sd.stand_in, "changed_components": ["unet"],
            **({"attack_preset": preset} if preset else {})}
    write_model_dir(sd, result.unet, output_dir, note=note, report=report)
    checkpoints.discard()
    return report


def _copy_component(src: Path, dst: Path) -> None:
    """Copy one component folder byte for byte, with its main weights only (no fp16/EMA variants, and
    no .bin next to a .safetensors)."""
    dst.mkdir(parents=True)
    files = [p for p in sorted(src.iterdir()) if p.is_file() and not p.name.startswith(".")]
    has_safetensors = any(p.suffix == ".safetensors" and not _VARIANT.search(p.name) for p in files)
    for path in files:
        if path.suffix in _WEIGHT_SUFFIXES:
            if _VARIANT.search(path.name) or (has_safetensors and path.suffix != ".safetensors"):
                continue
        shutil.copy2(path, dst / path.name)


def _model_index(base: Path) -> dict[str, Any]:
    """The base's model_index.json with every component we do not write set to null (a missing
    safety checker must not make ``from_pretrained`` look for one)."""
    import diffusers

    path = base / "model_index.json"
    index: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    }
    if not path.is_file():
        cfg = json.loads((base / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        index["scheduler"] = ["diffusers", cfg.get("_class_name", "PNDMScheduler")]
    for key, value in list(index.items()):
        if key.startswith("_") or key == "unet" or key in COPIED_COMPONENTS:
            continue
        if isinstance(value, list) and len(value) == 2:
            index[key] = [None, None]
    index.setdefault("safety_checker", [None, None])
    index.setdefault("feature_extractor", [None, None])
    index["requires_safety_checker"] = False
    return index


def write_model_dir(sd, unet, target: Path, *, note: dict[str, Any], report: Report) -> Path:
    """A complete diffusers model directory, built in a temporary directory next to ``target`` and
    renamed into place (an existing ``target`` is replaced only once the new one is complete)."""
    target = Path(target)
    base = Path(sd.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target.parent, target.name)  # pid in the name: a killed run's is recognisable
    old: Path | None = None
    try:
        for component in COPIED_COMPONENTS:  # only the UNet changes
            _copy_component(base / component, staging / component)
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        (staging / "model_index.json").write_text(json.dumps(_model_index(base), indent=2) + "\n", encoding="utf-8")
        (staging / "cloak_model.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
        report.write(staging)
        apply_umask(staging)  # copied and safetensors files are 0600, the folder 0700: the umask decides
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            old.rmdir()
            target.rename(old)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and old.exists() and not target.exists():
            old.rename(target)  # put the previous output back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
