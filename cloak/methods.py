"""What every method of every verb shares: typed options, the run context, the method base class."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from cloak.errors import UsageError


class MethodOptions(BaseModel):
    """A method's knobs (``-o key=value``). Unknown keys are rejected with a suggestion."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_option_pairs(pairs: list[str]) -> dict[str, str]:
    """``["pgd_steps=6", "host=aspl"]`` → dict; the value is parsed later by the Options model."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"-o expects key=value, got {pair!r}")
        out[key] = value.strip()
    return out


def build_options(cls: type[MethodOptions], layers: list[tuple[str, dict[str, Any]]], method: str):
    """Validate option values given in precedence layers (lowest first), remembering each source.

    Returns (options instance, {name: {"value", "source"}}).
    """
    from cloak.adversarial.budget import normalize_budget_layers

    layers = normalize_budget_layers(cls, layers, method)  # every budget read in its own unit
    names = list(cls.model_fields)
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, values in layers:
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"{method}: unknown option {key!r}{hint}; valid: {', '.join(names) or 'none'}",
                                 hint=f"`cloak methods show {method}` lists the options")
            merged[key] = _coerce(value)
            sources[key] = source
    try:
        opts = cls(**merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"{method}: invalid option value: {problems}") from None
    record = {name: {"value": _jsonable(getattr(opts, name)), "source": sources.get(name, "default")}
              for name in names}
    return opts, record


def _coerce(value: Any) -> Any:
    """Strings from -o: "none"/"null" → None, comma lists stay strings (pydantic parses them)."""
    if isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclass
class RunContext:
    """Everything a method may use besides its own options."""

    models: Any  # cloak.models.handle.Models
    model: str  # --model: catalog id or local directory
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    seed: int
    generator: Any  # torch.Generator (CPU), the only source of randomness
    resolution: int
    cache_dir: Path
    progress: Any  # cloak._progress.Progress
    effort: float = 1.0
    compat: bool = False
    ref: Any = None  # ImageSet of clean reference images (same identity), if given
    extras: dict[str, Any] = field(default_factory=dict)  # verb-specific flags (target image, prompts, ...)
    warnings: list[str] = field(default_factory=list)
    # protect: snapshot(label, pixels) writes the set as it is mid-run (``-o save_every``), quantised within
    # the budget, to OUTPUT/.steps/<label>/; pixels in the order of the ImageSet the method was given.
    snapshot: Any = None

    def iters(self, n: int) -> int:
        """Scale an iteration count by ``--effort`` (never below 1 unless it was 0)."""
        return 0 if n <= 0 else max(1, round(n * self.effort))

    def warn(self, message: str) -> None:
        import logging

        logging.getLogger("cloak").warning(message)
        self.warnings.append(message)


class Method:
    """Base of every registered method. Subclasses set the class attributes and implement the call."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    paper: ClassVar[str] = ""
    implements: ClassVar[str] = ""  # one line: what this is, faithful to which source
    proposals: ClassVar[tuple[str, ...]] = ()  # options whose defaults are our proposals ([PROP] in the spec)
    notes: ClassVar[str] = ""
    # Options that make a run take seconds on the built-in tiny models (contract tests, `make demo`).
    tiny_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: MethodOptions, ctx: RunContext):
        self.opts = options
        self.ctx = ctx

    @classmethod
    def info(cls) -> dict[str, Any]:
        info = {"paper": cls.paper, "implements": cls.implements}
        if cls.proposals:
            info["proposals"] = list(cls.proposals)
        if cls.notes:
            info["notes"] = cls.notes
        return info

    @classmethod
    def option_table(cls) -> list[dict[str, Any]]:
        rows = []
        for name, f in cls.Options.model_fields.items():
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            rows.append({"name": name, "type": _type_name(f.annotation), "default": _jsonable(f.default),
                         "unit": extra.get("unit"), "proposal": name in cls.proposals,
                         "help": f.description or ""})
        return rows


def _type_name(annotation: Any) -> str:
    """``int``, ``float | None``, ``m11|01|255`` (a Literal shows its choices), ``list[str]``."""
    from typing import Literal, Union, get_args, get_origin

    origin = get_origin(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    if origin is Union or type(annotation).__name__ == "UnionType":
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if origin is list:
        return "list of " + "".join(_type_name(a) for a in get_args(annotation))  # typed as a,b,c
    if annotation is type(None):
        return "none"
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
