"""``cloak eval`` plans: the TOML file, read and checked whole before any work.

A plan names the identities (folders on disk), the grid (protections × purifications × attacks,
scored by metrics, over seeds) and the flags every step shares. :func:`load_plan` reports every
problem it finds at once (a :class:`PlanError`, exit 2), so a plan is fixed in one edit, not one
error per run.

Grid entries are a method name (``"aspl"``), a name with options (``"jpeg:quality=75"``,
``"cap:host=aspl,pgd_batch=2"``) or a table (``{ method = "mist", eps = 8, unit = "255" }``). In a
table, ``label`` names the row (default: built from the method and options) and the verb's flags
(protect: eps, eps_unit, steps, fit; attack: steps, num_images, sample_steps, prompts, guidance,
negative_prompt, sampler; every verb: effort, resolution) are flags; every other key is a method
option, as ``-o key=value``. ``[protect]``, ``[purify]``, ``[attack]`` and ``[score]`` tables give
values every entry of that verb starts from.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloak.config import effort_problem
from cloak.errors import UsageError

VERBS = ("protect", "purify", "attack")
NONE = "none"  # the grid's "no protection" / "no purification": the images pass through unchanged
# Verb flags a grid entry may set (everything else in an entry is a method option).
FLAGS = {
    "protect": ("eps", "eps_unit", "steps", "fit", "effort", "resolution"),
    "purify": ("effort", "resolution"),
    "attack": ("steps", "num_images", "sample_steps", "prompts", "guidance", "negative_prompt", "sampler",
               "effort", "resolution"),
}
COMMON_KEYS = {"model": str, "tiny": bool, "effort": (int, float), "resolution": int, "device": str, "dtype": str,
               "cache_dir": str, "config": str}
DATA_KEYS = ("identities", "clean", "protect", "ref")
RAY_KEYS = {"num_gpus": (int, float), "num_cpus": (int, float), "workers": int}
SECTIONS = ("data", "grid", "common", "ray", *VERBS, "score")


class PlanError(UsageError):
    """Every problem of a plan, one per line (exit 2, before any work)."""

    def __init__(self, path: Path, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"plan {path}: {len(problems)} problem(s):\n{lines}",
                         hint="`cloak eval --help` shows a plan; `cloak methods VERB` lists methods")


@dataclass
class Entry:
    """One value of a grid axis: a method with its flags and options, and the label its row carries."""

    verb: str
    method: str
    label: str
    flags: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """The label as a folder name."""
        return slug(self.label)

    @property
    def none(self) -> bool:
        return self.method == NONE


@dataclass
class Metric:
    name: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Identity:
    name: str
    root: Path
    protect: Path  # the photos the attacker gets (set B): protected, purified, trained on
    clean: Path | None  # clean photos of the same person (set A): surrogate methods' --ref
    ref: Path | None  # clean photos scored against (set C)


@dataclass
class Plan:
    path: Path
    sha256: str
    identities: list[Identity]
    protect: list[Entry]
    purify: list[Entry]
    attack: list[Entry]
    metrics: list[Metric]
    seeds: list[int]
    common: dict[str, Any]
    verb_defaults: dict[str, dict[str, Any]]
    ray: dict[str, Any]
    score_options: dict[str, Any]


_SLUG = re.compile(r"[^A-Za-z0-9._=+-]+")


def slug(text: str) -> str:
    return _SLUG.sub("_", text).strip("_") or "_"


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "|".join(map(str, value))
    return str(value)


def parse_entry(verb: str, raw: Any, defaults: dict[str, Any], problems: list[str]) -> Entry | None:
    where = f"grid.{verb}"
    if isinstance(raw, str):
        name, sep, rest = raw.partition(":")
        name = name.strip()
        given: dict[str, Any] = {}
        if sep:
            for pair in rest.split(","):
                key, eq, value = pair.partition("=")
                if not eq or not key.strip():
                    problems.append(f"{where}: {raw!r}: options are name:key=value,key=value")
                    return None
                given[key.strip().replace("-", "_")] = value.strip()
        label = raw.strip()
    elif isinstance(raw, dict):
        given = {k.replace("-", "_"): v for k, v in raw.items()}
        name = given.pop("method", None)
        if not isinstance(name, str):
            problems.append(f"{where}: the table {raw!r} needs method = \"NAME\"")
            return None
        label = given.pop("label", None)
        if label is None:
            label = " ".join([name] + [f"{k}={_value_text(v)}" for k, v in given.items()])
        elif not isinstance(label, str) or not label.strip():
            problems.append(f"{where}: label must be a non-empty string, got {label!r}")
            return None
    else:
        problems.append(f"{where}: {raw!r} is neither a method name nor a table")
        return None
    if name == NONE:
        if given:
            problems.append(f"{where}: {NONE!r} takes no options")
        return Entry(verb, NONE, label)
    merged = {**defaults, **given}
    flags = {k: v for k, v in merged.items() if k in FLAGS[verb]}
    options = {k: v for k, v in merged.items() if k not in FLAGS[verb]}
    return Entry(verb, name, label, flags, options)


def parse_metric(raw: Any, defaults: dict[str, Any], problems: list[str]) -> Metric | None:
    if isinstance(raw, str):
        name, sep, rest = raw.partition(":")
        options: dict[str, Any] = {}
        for pair in rest.split(",") if sep else []:
            key, eq, value = pair.partition("=")
            if not eq:
                problems.append(f"grid.score: {raw!r}: options are metric:key=value,key=value")
                return None
            options[key.strip()] = value.strip()
        name = name.strip().lower()
        return Metric(name, name, {**defaults.get(name, {}), **options})
    if isinstance(raw, dict) and isinstance(raw.get("metric"), str):
        options = {k: v for k, v in raw.items() if k not in ("metric", "label")}
        name = raw["metric"].lower()
        return Metric(name, str(raw.get("label", name)), {**defaults.get(name, {}), **options})
    problems.append(f"grid.score: {raw!r} is neither a metric name nor a table with metric = \"NAME\"")
    return None


def _check_type(where: str, value: Any, kind, problems: list[str]) -> bool:
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        problems.append(f"{where} = {value!r}: expected a number" if kind in ((int, float), int) else
                        f"{where} = {value!r}: wrong type")
        return False
    if not isinstance(value, kind):
        names = {str: "a string", bool: "true or false", int: "a whole number", (int, float): "a number"}
        problems.append(f"{where} = {value!r}: expected {names.get(kind, kind)}")
        return False
    if where.endswith(".effort") and (problem := effort_problem(value)):
        # Else the plan "runs": every cell then fails on the verb's own check (exit 5 after the work).
        problems.append(f"{where} = {value!r}: {problem}")
        return False
    return True


def _identities(data: dict, base: Path, problems: list[str]) -> list[Identity]:
    names = {k: data.get(k, k) for k in ("clean", "protect", "ref")}
    for key, value in names.items():
        if not isinstance(value, str) or not value or "/" in value:
            problems.append(f"data.{key} = {value!r}: the name of a folder inside each identity folder")
            return []
    pattern = data.get("identities")
    if pattern is None:
        problems.append("data.identities is missing: a glob of identity folders, e.g. identities = \"celeb/*\"")
        return []
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        problems.append(f"data.identities = {pattern!r}: a glob or a list of globs/folders")
        return []
    found: list[Identity] = []
    for pat in patterns:
        full = Path(pat).expanduser()
        full = full if full.is_absolute() else base / full
        matches = sorted(Path(p) for p in glob.glob(str(full)) if Path(p).is_dir())
        if not matches:
            problems.append(f"data.identities: {pat!r} matches no folder (relative paths are from the plan's folder)")
        for root in matches:
            protect = root / names["protect"]
            if not protect.is_dir():
                problems.append(f"identity {root.name}: no {names['protect']}/ folder in {root} "
                                "(the photos to protect)")
                continue
            clean = root / names["clean"] if (root / names["clean"]).is_dir() else None
            ref = root / names["ref"] if (root / names["ref"]).is_dir() else clean
            found.append(Identity(root.name, root, protect, clean, ref))
    seen: dict[str, Path] = {}
    for ident in found:
        if ident.name in seen and seen[ident.name] != ident.root:
            problems.append(f"two identity folders are named {ident.name}: {seen[ident.name]} and {ident.root}")
        seen[ident.name] = ident.root
    unique = {i.root: i for i in found}
    return list(unique.values())


def load_plan(path: str | Path) -> Plan:
    """Read and check the plan; :class:`PlanError` lists every problem found."""
    import hashlib

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read plan {path}: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(raw_bytes.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(path, [f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    for key in doc:
        if key not in SECTIONS:
            problems.append(f"unknown section [{key}]; valid: {', '.join(SECTIONS)}")
    tables = {}
    for section in SECTIONS:
        value = doc.get(section, {})
        if not isinstance(value, dict):
            problems.append(f"[{section}] must be a table")
            value = {}
        tables[section] = value
    data, grid, common, ray = tables["data"], tables["grid"], tables["common"], tables["ray"]
    for key in data:
        if key not in DATA_KEYS:
            problems.append(f"data.{key}: unknown key; valid: {', '.join(DATA_KEYS)}")
    identities = _identities(data, path.parent.resolve(), problems)

    for key in grid:
        if key not in (*VERBS, "score", "seeds"):
            problems.append(f"grid.{key}: unknown axis; valid: protect, purify, attack, score, seeds")
    for key, value in common.items():
        if key not in COMMON_KEYS:
            problems.append(f"common.{key}: unknown key; valid: {', '.join(COMMON_KEYS)}")
        else:
            _check_type(f"common.{key}", value, COMMON_KEYS[key], problems)
    for key, value in ray.items():
        if key not in RAY_KEYS:
            problems.append(f"ray.{key}: unknown key; valid: {', '.join(RAY_KEYS)}")
        else:
            _check_type(f"ray.{key}", value, RAY_KEYS[key], problems)

    axes: dict[str, list[Entry]] = {}
    for verb in VERBS:
        values = grid.get(verb, [NONE] if verb != "attack" else None)
        if values is None:
            problems.append(f"grid.{verb} is missing: a list of methods, e.g. {verb} = [\"dreambooth\"]")
            values = []
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{verb} must be a non-empty list")
            values = []
        entries = [e for raw in values if (e := parse_entry(verb, raw, tables[verb], problems)) is not None]
        labels: dict[str, str] = {}
        for e in entries:
            if e.slug in labels:
                problems.append(f"grid.{verb}: {labels[e.slug]!r} and {e.label!r} have the same folder name "
                                f"{e.slug!r}; give one a label")
            labels[e.slug] = e.label
        axes[verb] = entries
    if any(e.none for e in axes["attack"]):
        problems.append("grid.attack: 'none' is not an attack (there would be nothing to score)")

    score_defaults = {}
    score_options = {}
    for key, value in tables["score"].items():
        if isinstance(value, dict):
            score_defaults[key.lower()] = value
        elif key == "align" and value in ("none", "resize", "crop"):
            score_options[key] = value
        else:
            problems.append(f"score.{key} = {value!r}: [score] holds metric tables (ism = {{ backend = \"dlib\" }}) "
                            "and align = \"none\" | \"resize\" | \"crop\"")
    raw_metrics = grid.get("score")
    if not isinstance(raw_metrics, list) or not raw_metrics:
        problems.append("grid.score must be a non-empty list of metrics, e.g. score = [\"fdfr\", \"ism\"]")
        raw_metrics = []
    metrics = [m for raw in raw_metrics if (m := parse_metric(raw, score_defaults, problems)) is not None]
    if len({m.label for m in metrics}) < len(metrics):
        problems.append("grid.score: a metric appears twice; give one a label")

    seeds = grid.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           and s >= 0 for s in seeds):
        problems.append(f"grid.seeds = {seeds!r}: a non-empty list of whole numbers ≥ 0")
        seeds = [0]
    if len(set(seeds)) < len(seeds):
        problems.append(f"grid.seeds = {seeds!r}: a seed appears twice")

    # Identity folders sit beside step folders (cells/<protect>/<identity>/ and cells/<protect>/<purify>/...).
    labels = {e.slug for e in axes["purify"]}
    for ident in identities:
        if ident.name in labels:
            problems.append(f"identity {ident.name} has the name of a purification in the grid; rename one")
    plan = Plan(path=path, sha256=hashlib.sha256(raw_bytes).hexdigest(), identities=identities,
                protect=axes["protect"], purify=axes["purify"], attack=axes["attack"], metrics=metrics,
                seeds=list(seeds), common=dict(common), verb_defaults={v: tables[v] for v in VERBS}, ray=dict(ray),
                score_options=score_options)
    check_methods(plan, problems)
    if problems:
        raise PlanError(path, problems)
    return plan


def check_methods(plan: Plan, problems: list[str]) -> None:
    """Every method known, every option valid (as the verb would resolve it), every metric known and fed."""
    from cloak.attack import ATTACK
    from cloak.errors import CloakError
    from cloak.methods import build_options
    from cloak.models.catalog import get_spec
    from cloak.models.handle import looks_like_local_model
    from cloak.protect import PROTECT
    from cloak.purify import PURIFY
    from cloak.score import SCORE

    registries = {"protect": PROTECT, "purify": PURIFY, "attack": ATTACK}
    for verb in VERBS:
        for entry in getattr(plan, verb):
            if entry.none:
                continue
            registry = registries[verb]
            if entry.method not in registry:
                problems.append(f"grid.{verb}: {registry.unknown_message(entry.method)}")
                continue
            cls = registry.get(entry.method)
            options = dict(entry.options)
            if verb == "protect" and "eps" in entry.flags:
                options["eps"] = entry.flags["eps"]
                if "eps_unit" in entry.flags:
                    options["unit"] = entry.flags["eps_unit"]
            if "steps" in entry.flags:
                if not cls.steps_option:
                    problems.append(f"grid.{verb}: {entry.label!r}: {entry.method} has no main step count for steps")
                else:
                    options[cls.steps_option] = entry.flags["steps"]
            for key in ("num_images", "sample_steps", "prompts", "guidance", "negative_prompt", "sampler"):
                if key in entry.flags:
                    options[key] = entry.flags[key]
            try:
                build_options(cls.Options, [("plan", options)], entry.method)
            except CloakError as exc:
                problems.append(f"grid.{verb}: {entry.label!r}: {exc}")
            if verb == "protect" and "fit" in entry.flags and entry.flags["fit"] not in ("keep", "crop", "resize"):
                problems.append(f"grid.protect: {entry.label!r}: fit = {entry.flags['fit']!r}; "
                                "valid: keep, crop, resize")
    for metric in plan.metrics:
        if metric.name not in SCORE:
            problems.append(f"grid.score: {SCORE.unknown_message(metric.name).replace('metric method', 'metric')}")
            continue
        cls = SCORE.get(metric.name)
        try:
            build_options(cls.Options, [("plan", metric.options)], metric.name)
        except CloakError as exc:
            problems.append(f"grid.score: {metric.label!r}: {exc}")
        if cls.needs_ref:
            for ident in plan.identities:
                if ident.ref is None:
                    problems.append(f"identity {ident.name}: metric {metric.name} needs clean photos to compare "
                                    f"with, and there is no ref/ or clean/ folder in {ident.root}")
    model = plan.common.get("model")
    if isinstance(model, str) and get_spec(model) is None:
        base = plan.path.parent.resolve()
        local = Path(model).expanduser()
        local = local if local.is_absolute() else base / local
        if not looks_like_local_model(str(local)):
            from cloak.models.catalog import closest_ids

            close = closest_ids(model)
            problems.append(f"common.model = {model!r}: neither a catalog id nor a diffusers folder"
                            + (f" (did you mean {close[0]!r}?)" if close else "; `cloak models list` lists ids"))
        else:
            plan.common["model"] = str(local)
    if plan.common.get("dtype") not in (None, "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"):
        problems.append(f"common.dtype = {plan.common['dtype']!r}; valid: fp32, bf16, fp16")
