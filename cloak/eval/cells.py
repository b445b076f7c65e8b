"""The plan as steps and cells, each step keyed by the hash of everything that makes its output.

A *step* is one verb call (protect, purify, attack or score) with one output folder; a *cell* is one
row of the results: (protection, purification, attack, identity, seed) → the chain of steps that
leads to its scores. Cells share their upstream steps: one ``aspl`` run on an identity feeds every
purifier and attack of that row, so the plan runs each distinct step once.

Layout under ``OUT/cells/`` (every step folder is exactly what the verb writes when run by hand)::

    <protect>/<identity>/protect/                       cloak protect's OUTPUT
    <protect>/<purify>/<identity>/purify/               cloak purify's OUTPUT
    <protect>/<purify>/<attack>/<identity>/attack/      cloak attack's OUTPUT (gen/ inside)
    <protect>/<purify>/<attack>/<identity>/score/       cloak score's report.json

(``<identity>`` is ``<identity>.seed<N>`` when the plan has several seeds.) Beside each step folder,
``<step>.step.json`` records its key and status. A step is done when that record says ``ok`` with the
key the plan now gives it; a step whose key changed is redone from scratch, an interrupted one is
continued with the verb's own ``--resume``, a failed one is tried again.

The key is the sha256 of: the cloak version, the verb, the method, its options as the verb resolves
them (defaults included), the verb flags, the shared flags (model, tiny, effort, resolution, dtype),
the model's content digest, the seed, and the inputs: the sha256 of every input file for a first
step, the upstream step's key otherwise (the upstream output is a function of its key).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloak.eval.plan import Entry, Identity, Plan

MARKER_SUFFIX = ".step.json"
ORDER = ("protect", "purify", "attack", "score")


@dataclass
class Step:
    verb: str
    key: str
    dir: Path
    input_dir: Path
    identity: Identity
    seed: int
    label: str
    method: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    upstream: str | None = None  # key of the step whose output this one reads
    work: float = 1.0  # estimated model passes (for --dry-run and the ETA)
    common: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)

    @property
    def marker(self) -> Path:
        return self.dir.parent / f"{self.dir.name}{MARKER_SUFFIX}"

    def describe(self) -> str:
        return f"{self.verb} {self.label} [{self.identity.name} seed {self.seed}]"


@dataclass
class Cell:
    protect: Entry
    purify: Entry
    attack: Entry
    identity: Identity
    seed: int
    dir: Path
    steps: list[str]  # step keys, upstream first; the last one is the score step

    @property
    def id(self) -> str:
        return "/".join((self.protect.slug, self.purify.slug, self.attack.slug, self.dir.name))


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def files_digest(folder: Path | None) -> str | None:
    """sha256 over the (relative name, content sha256) of every image a verb would read from ``folder``."""
    if folder is None:
        return None
    from cloak.io.images import list_images

    entries = []
    for path in list_images(folder):
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        entries.append((path.relative_to(folder).as_posix(), h.hexdigest()))
    return sha256_json(entries)


def _model_digest(model: str, common: dict[str, Any], memo: dict[str, Any]) -> Any:
    """What identifies the weights a step loads: the content digest of a local folder, the lock file's
    digest of a downloaded catalog model, the built-in stand-in's id (its weights come from this version)."""
    if model in memo:
        return memo[model]
    from cloak.config import cache_dir as resolve_cache_dir
    from cloak.errors import CloakError
    from cloak.models import cache as model_cache
    from cloak.models.catalog import get_spec
    from cloak.models.handle import content_digest, looks_like_local_model

    try:
        if looks_like_local_model(model) and get_spec(model) is None:
            value = {"dir": str(Path(model).resolve()), "sha256": content_digest(Path(model))}
        else:
            spec = model_cache.spec_or_error(model)
            if common.get("tiny") and not spec.builtin and spec.stand_in:
                model, spec = spec.stand_in, model_cache.spec_or_error(spec.stand_in)
            cache = resolve_cache_dir(common.get("cache_dir"))
            value = {"id": model, "builtin": spec.builtin,
                     "sha256": None if spec.builtin else model_cache.weights_digest(cache, model)}
    except CloakError as exc:  # the step itself will fail with the verb's message; the key still differs
        value = {"id": model, "unavailable": str(exc)}
    memo[model] = value
    return value


def _step_model(verb: str, method_cls, common: dict[str, Any]) -> str:
    return common.get("model") or getattr(method_cls, "default_model", None) or "sd21-base"


def _resolved_options(verb: str, entry: Entry, method_cls) -> dict[str, Any]:
    """The method's options as the verb resolves them, defaults included (a changed default changes keys)."""
    from cloak.methods import build_options

    options = dict(entry.options)
    if verb == "protect" and "eps" in entry.flags:
        options["eps"] = entry.flags["eps"]
        if "eps_unit" in entry.flags:
            options["unit"] = entry.flags["eps_unit"]
    if "steps" in entry.flags and method_cls.steps_option:
        options[method_cls.steps_option] = entry.flags["steps"]
    for key in ("num_images", "sample_steps", "prompts", "guidance", "negative_prompt", "sampler"):
        if key in entry.flags:
            options[key] = entry.flags[key]
    opts, _ = build_options(method_cls.Options, [("plan", options)], entry.method)
    return opts.model_dump(mode="json")


def _work(verb: str, resolved: dict[str, Any], n_images: int, effort: float, method_cls=None) -> float:
    """A rough count of model passes: the method's main iteration count × images (× effort), plus the
    attack's sampling. An estimate for planning, not a measurement."""
    if verb == "protect":
        steps = resolved.get(getattr(method_cls, "steps_option", None) or "", None)
        return float(max(1, int(steps or 1)) * n_images * effort)
    if verb == "purify":
        return float(n_images * max(1, int(resolved.get("steps", 1) or 1)))
    if verb == "attack":
        train = int(resolved.get(getattr(method_cls, "steps_option", None) or "", 0) or 0)
        sampling = len(resolved.get("prompts", [])) * int(resolved.get("num_images", 0)) * \
            int(resolved.get("sample_steps", 1))
        return float(train * effort + sampling)
    return float(n_images)


def build(plan: Plan, out: Path) -> tuple[dict[str, Step], list[Cell]]:
    """Every distinct step (by key) and every cell, in plan order."""
    from cloak import __version__
    from cloak.attack import ATTACK
    from cloak.io.images import list_images
    from cloak.protect import PROTECT
    from cloak.purify import PURIFY
    from cloak.score import SCORE

    registries = {"protect": PROTECT, "purify": PURIFY, "attack": ATTACK}
    shared = {k: plan.common.get(k) for k in ("model", "tiny", "effort", "resolution", "dtype")}
    steps: dict[str, Step] = {}
    cells: list[Cell] = []
    digests: dict[str, Any] = {}
    models: dict[str, Any] = {}
    cells_root = out / "cells"
    multi_seed = len(plan.seeds) > 1

    def digest(folder: Path | None) -> str | None:
        key = str(folder)
        if key not in digests:
            digests[key] = files_digest(folder)
        return digests[key]

    def make(verb: str, entry: Entry, ident: Identity, seed: int, folder: Path, input_dir: Path,
             upstream: str | None, n_images: int) -> Step:
        cls = registries[verb].get(entry.method)
        resolved = _resolved_options(verb, entry, cls)
        effort = float(entry.flags.get("effort", plan.common.get("effort", 1.0)))
        inputs: dict[str, Any] = {"upstream": upstream} if upstream else {"images": digest(input_dir)}
        if verb == "protect" and ident.clean is not None and cls.uses_ref:
            inputs["ref"] = digest(ident.clean)
        model = _step_model(verb, cls, plan.common)
        key = sha256_json({"cloak": __version__, "verb": verb, "method": entry.method, "options": resolved,
                           "flags": entry.flags, "common": shared, "model": _model_digest(model, plan.common, models),
                           "seed": seed, "inputs": inputs})
        if key not in steps:
            steps[key] = Step(verb, key, folder, input_dir, ident, seed, entry.label, entry.method,
                              dict(entry.flags), dict(entry.options), upstream,
                              _work(verb, resolved, n_images, effort, cls), dict(plan.common))
        return steps[key]

    for ident in plan.identities:
        n_images = len(list_images(ident.protect))
        for seed in plan.seeds:
            name = f"{ident.name}.seed{seed}" if multi_seed else ident.name
            for p in plan.protect:
                chain_p: list[str] = []
                source, upstream = ident.protect, None
                if not p.none:
                    step = make("protect", p, ident, seed, cells_root / p.slug / name / "protect", source, None,
                                n_images)
                    chain_p, source, upstream = [step.key], step.dir, step.key
                for q in plan.purify:
                    chain_q, source_q, upstream_q = list(chain_p), source, upstream
                    if not q.none:
                        step = make("purify", q, ident, seed, cells_root / p.slug / q.slug / name / "purify",
                                    source, upstream, n_images)
                        chain_q, source_q, upstream_q = chain_q + [step.key], step.dir, step.key
                    for a in plan.attack:
                        cell_dir = cells_root / p.slug / q.slug / a.slug / name
                        attack = make("attack", a, ident, seed, cell_dir / "attack", source_q, upstream_q, n_images)
                        metric_spec = [{"name": m.name, "options": m.options} for m in plan.metrics]
                        for m in plan.metrics:  # options resolved with defaults, as for the methods
                            from cloak.methods import build_options

                            opts, _ = build_options(SCORE.get(m.name).Options, [("plan", m.options)], m.name)
                            metric_spec.append({"resolved": m.name, "options": opts.model_dump(mode="json")})
                        score_key = sha256_json({"cloak": __version__, "verb": "score", "metrics": metric_spec,
                                                 "score": plan.score_options, "tiny": plan.common.get("tiny"),
                                                 "seed": seed, "inputs": {"upstream": attack.key,
                                                                          "ref": digest(ident.ref)}})
                        if score_key not in steps:
                            n_gen = attack.work  # scoring is per generated image: cheap next to the rest
                            steps[score_key] = Step("score", score_key, cell_dir / "score", attack.dir / "gen", ident,
                                                    seed, "+".join(m.label for m in plan.metrics),
                                                    upstream=attack.key, work=max(1.0, n_gen / 100),
                                                    common=dict(plan.common), metrics=[m.name for m in plan.metrics],
                                                    options={f"{m.name}.{k}": v for m in plan.metrics
                                                             for k, v in m.options.items()},
                                                    flags=dict(plan.score_options))
                        cells.append(Cell(p, q, a, ident, seed, cell_dir, chain_q + [attack.key, score_key]))
    return steps, cells


# --- markers ---------------------------------------------------------------------------------------------

def read_marker(step: Step) -> dict[str, Any] | None:
    try:
        value = json.loads(step.marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_marker(step: Step, record: dict[str, Any]) -> None:
    """Atomically (a Ctrl-C between two writes leaves the older record whole, never half of one)."""
    step.marker.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{step.marker.name}.", dir=step.marker.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1, sort_keys=True)
        os.replace(tmp, step.marker)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def cached(step: Step) -> dict[str, Any] | None:
    """The step's record if it is done with the key the plan now gives it."""
    record = read_marker(step)
    if record and record.get("key") == step.key and record.get("status") == "ok":
        return {**record, "cached": True}
    return None


# --- running one step ----------------------------------------------------------------------------------

def blocked(step: Step, upstream: dict[str, Any]) -> dict[str, Any]:
    return {"key": step.key, "verb": step.verb, "dir": str(step.dir), "status": "blocked", "cached": False,
            "error": f"upstream {upstream.get('verb')} failed: {upstream.get('error')}"}


def run_step(step: Step, *upstream: dict[str, Any]) -> dict[str, Any]:
    """Run one step through the Python API (or return its cached record); never raises for a failed verb:
    the error is recorded and returned, so the other cells go on. Ctrl-C propagates, leaving the step's
    record ``running`` so that the next run continues it with the verb's ``--resume``."""
    for up in upstream:
        if up.get("status") != "ok":
            return blocked(step, up)
    done = cached(step)
    if done is not None:
        return done
    earlier = read_marker(step)
    resume = bool(earlier and earlier.get("key") == step.key and earlier.get("status") == "running"
                  and step.dir.exists())
    if not resume and step.dir.exists():
        shutil.rmtree(step.dir)  # made with another key (or failed): its files must not leak into this one
    record = {"key": step.key, "verb": step.verb, "method": step.method, "label": step.label, "dir": str(step.dir),
              "identity": step.identity.name, "seed": step.seed, "status": "running", "upstream": step.upstream}
    write_marker(step, record)
    clock = time.perf_counter()
    try:
        report = call_verb(step, resume=resume)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 — any failure of one step is that cell's result, not the plan's
        from cloak.errors import CloakError

        error = str(exc) if isinstance(exc, CloakError) else f"{type(exc).__name__}: {exc}"
        record.update(status="failed", error=error.splitlines()[0] if error else type(exc).__name__,
                      exit_code=getattr(exc, "exit_code", 1), seconds=round(time.perf_counter() - clock, 3))
        if not isinstance(exc, CloakError):
            record["traceback"] = traceback.format_exc(limit=8)
        write_marker(step, record)
        return {**record, "cached": False}
    record.update(status="ok", seconds=round(time.perf_counter() - clock, 3))
    if step.verb == "score":
        record["summary"] = report.summary.get("metrics", {}) if hasattr(report, "summary") else {}
    write_marker(step, record)
    return {**record, "cached": False}


def verb_kwargs(step: Step) -> dict[str, Any]:
    """The keyword arguments of ``cloak.<verb>()`` for this step: what a user would type by hand."""
    c = step.common
    shared = {k: c[k] for k in ("model", "tiny", "effort", "resolution", "device", "dtype", "config", "cache_dir")
              if c.get(k) is not None}
    if step.verb == "score":
        return {"ref": str(step.identity.ref) if step.identity.ref else None, "metrics": list(step.metrics),
                "options": dict(step.options) or None, "tiny": bool(c.get("tiny")), "seed": step.seed,
                **{k: c[k] for k in ("device", "config", "cache_dir") if c.get(k) is not None}, **step.flags}
    kwargs: dict[str, Any] = {"method": step.method, "seed": step.seed, **shared, **step.flags}
    if step.options:
        kwargs["options"] = dict(step.options)
    if step.verb == "protect":
        from cloak.protect import PROTECT

        if step.identity.clean is not None and PROTECT.get(step.method).uses_ref:
            kwargs["ref"] = str(step.identity.clean)
    return kwargs


def call_verb(step: Step, *, resume: bool = False):
    import cloak

    kwargs = verb_kwargs(step)
    if step.verb == "score":
        step.dir.mkdir(parents=True, exist_ok=True)
        return cloak.score(step.input_dir, report_path=step.dir / "report.json", **kwargs)
    fn = {"protect": cloak.protect, "purify": cloak.purify, "attack": cloak.attack}[step.verb]
    return fn(step.input_dir, step.dir, resume=resume, **kwargs)


def step_order(steps: dict[str, Step]) -> list[Step]:
    """Upstream before downstream (verbs in pipeline order; within a verb, plan order)."""
    return sorted(steps.values(), key=lambda s: ORDER.index(s.verb))


