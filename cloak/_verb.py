"""One verb invocation's shared set-up: configuration with sources, device, models, context, report.

Every verb's pipeline (``cloak/<verb>/run.py``) builds a :class:`VerbRun` from the flags (:class:`Common`)
and hands it items as they finish; the report it makes is the verb's ``report.json``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloak._progress import Progress
from cloak.config import Config, cache_dir as resolve_cache_dir, effort_problem, load_config
from cloak.errors import InputError, OutputExistsError, PartialFailure, UsageError
from cloak.io.images import input_files
from cloak.io.output import claim_output
from cloak.io.report import ItemRecord, Report, Stopwatch, merge_earlier, now_iso, versions
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
    memory: str | None = None  # --memory default|low (cloak.diffusion.memory)
    options: dict[str, str] = field(default_factory=dict)  # -o key=value
    force: bool = False
    resume: bool = False
    keep_going: bool = False
    keep_metadata: bool = False  # protect/purify: copy EXIF/ICC/dpi/text from each source (default: strip)
    compat: bool = False
    config: str | Config | None = None
    cache_dir: str | None = None
    class_dir: str | None = None  # --class-dir: the user's own class images for prior preservation
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


def _reproducible_cuda() -> None:
    """Same seed, same bytes on a GPU too (ARCHITECTURE §3): cuDNN's deterministic algorithms and a fixed cuBLAS
    workspace, as PyTorch's reproducibility notes ask (the workspace setting only takes if no cuBLAS handle
    exists yet in the process). Ops whose CUDA backward scatters with atomic adds are replaced where cloak
    differentiates through them (cloak/adversarial/resample.py). On an H200, DLADiff's bytes differed between
    two runs of one seed without these; with them, the runs tried repeated (few runs: evidence, not proof)."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _number(flag: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind``; the Python API passes whatever it is given (``seed="x"``, ``effort="abc"``),
    which must be a usage error naming the argument, not a bare ValueError from ``int()``."""
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise UsageError(f"--{flag} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{flag} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


class VerbRun:
    """Shared set-up of one verb invocation: config, models, context, report."""

    def __init__(self, verb: str, registry, common: Common, default_method: str, default_model: str | None,
                 output: Path | str | None = None, inputs: Path | str | None = None):
        """``output``: the folder this run writes; it is claimed (locked, probed, tidied) before any model
        loads and released by :meth:`finish` (cloak.io.output). ``inputs``: the image folder (or ``-``)
        read, listed at once so that a missing folder or two inputs with one output name stop the run
        before any model loads."""
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
        self.effort = _number("effort", self.value("effort", common.effort, 1.0), float)
        if problem := effort_problem(self.effort):
            raise UsageError(f"--effort {problem}")
        self.seed = _number("seed", self.value("seed", common.seed, 0), int)
        if not -(2**63) <= self.seed < 2**63:  # each item's stream is derived from the seed as a signed 64-bit int
            raise UsageError(f"--seed must fit in a signed 64-bit integer, got {self.seed}")
        self.device_name = str(self.value("device", common.device, "auto"))
        dtype_name = str(self.value("dtype", common.dtype, "fp32"))
        if dtype_name not in DTYPES:
            raise UsageError(f"unknown --dtype {dtype_name!r}; valid: fp32, bf16, fp16")
        self.dtype_name = DTYPES[dtype_name]
        from cloak.diffusion.memory import MEMORY_TIERS

        self.memory = str(self.value("memory", common.memory, "default"))
        if self.memory not in MEMORY_TIERS:
            raise UsageError(f"unknown --memory {self.memory!r}; valid: {', '.join(MEMORY_TIERS)}")
        self.resolution_flag = self.value("resolution", common.resolution, None)
        if self.resolution_flag is not None and (isinstance(self.resolution_flag, bool) or
                                                 not isinstance(self.resolution_flag, int) or self.resolution_flag < 1):
            raise UsageError(f"--resolution must be a positive number of pixels, got {self.resolution_flag!r}")
        self.cache = resolve_cache_dir(common.cache_dir or self.cfg.defaults.get("cache_dir"))
        self.warnings: list[str] = []
        self.items: list[ItemRecord] = []
        self.claim = claim_output(output) if output is not None else None
        try:
            if inputs is not None:
                input_files(inputs, exclude=output)
        except BaseException:
            self.release()
            raise

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
        from cloak.diffusion.memory import tier_options

        layers = [("config", self.cfg.method(self.verb, self.method_name))]
        tier = tier_options(self.memory, self.method_cls.Options)
        if tier:  # --memory low's options, below the verb's flags and -o
            layers.append((f"--memory {self.memory}", tier))
        layers += extra_layers or []
        layers.append(("-o", self.common.options))
        return build_options(self.method_cls.Options, layers, self.method_name)

    def context(self, *, resolution: int | None = None, ref=None, extras: dict | None = None) -> RunContext:
        import torch

        from cloak.models.handle import Models

        device = torch.device(_pick_device(self.device_name))
        if device.type == "cuda":
            _reproducible_cuda()
        dtype = getattr(torch, self.dtype_name)
        self.models = Models(cache_dir=self.cache, device=device, dtype=dtype, tiny=self.common.tiny,
                             overrides=self.cfg.models)
        self.models.memory = self.memory
        generator = torch.Generator("cpu").manual_seed(self.seed)
        extras = dict(extras or {})
        class_dir = self.common.class_dir
        if class_dir is not None:
            self.params["class_dir"] = {"value": str(class_dir), "source": "flag"}
            if not Path(class_dir).expanduser().is_dir():
                raise InputError(f"--class-dir {class_dir} is not a directory")
            extras["class_dir"] = str(Path(class_dir).expanduser())
        self.ctx = RunContext(models=self.models, model=self.model, device=device, dtype=dtype, seed=self.seed,
                              generator=generator, resolution=resolution or 0, cache_dir=self.cache,
                              progress=self.common.progress or Progress(), effort=self.effort,
                              compat=self.common.compat, ref=ref, extras=extras, warnings=self.warnings)
        return self.ctx

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

        from cloak.diffusion.memory import tier_options

        records = models if models is not None else (self.models.records() if hasattr(self, "models") else [])
        stand_ins = sorted({r.id for r in records if r.stand_in})
        if stand_ins:
            self.warnings.insert(0, STAND_IN_WARNING.format(ids=", ".join(stand_ins)))
        counts = {s: sum(1 for i in self.items if i.status == s) for s in ("ok", "failed", "skipped")}
        ctx = getattr(self, "ctx", None)
        if self.memory != "default":
            summary = {"memory": {"tier": self.memory, "options": tier_options(self.memory, self.method_cls.Options),
                                  "models": getattr(getattr(self, "models", None), "memory_record", {})}, **summary}
        if ctx is not None and ctx.extras.get("class_images"):
            # What --effort, --class-dir and the sampler made of each method's class images.
            summary = {"class_images": ctx.extras["class_images"], **summary}
        return Report(
            verb=self.verb, method=self.method_name, method_info=method_info or self.method_cls.info(),
            argv=self.common.argv if self.common.argv is not None else sys.argv, options=opts_record,
            params=self.params, models=records, seed=self.seed,
            device=str(self.models.device) if hasattr(self, "models") else None,
            dtype=self.dtype_name, versions=versions() | {"torch": torch.__version__}, started=self.started,
            seconds=self.clock.seconds(), warnings=self.warnings, items=self.items,
            summary={**counts, "stand_in": bool(stand_ins), **summary},
        )

    def release(self) -> None:
        """Let go of the output folder (also done when the run object is collected after an error)."""
        if self.claim is not None:
            self.claim.release()

    def finish(self, report: Report, out_dir: Path) -> Report:
        try:
            if self.common.resume and not self.common.force:
                # A resumed run reports the whole output, not only what it redid (a no-op resume must not
                # turn every item into "skipped" and drop the earlier figures and stand-in warning).
                report = merge_earlier(report, Path(out_dir) / "report.json")
                self.items = report.items
            report.write(out_dir)
        finally:
            self.release()
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


def image_run(verb: str, registry, input_dir, output_dir, common: Common | None, kwargs: dict, *,
              default_method: str) -> tuple[VerbRun, Path, Path]:
    """The opening the image-to-image verbs share: flags, inputs never the outputs, and the output folder
    claimed (lock, write probe) before any work."""
    common = common or Common(**kwargs)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if same_dirs(input_dir, output_dir):
        raise UsageError("input and output directories are the same; inputs are never modified")
    run = VerbRun(verb, registry, common, default_method=default_method, default_model="sd21-base",
                  output=output_dir, inputs=input_dir)
    return run, input_dir, output_dir


def same_dirs(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
