"""The ``cloak score`` run behind :func:`cloak.score`: metrics, subjects, gates, contact sheet.

One subject: GENERATED against REF. ``per_subdir``: every subdirectory GEN_ROOT/<name>/ (or its
``gen/`` folder, as ``cloak attack`` writes it) against REF_ROOT/<name>/, each scored on its own
(ISM's mean embedding is the subject's), then aggregated as the papers' tables do (DiffShortcut A.2:
Σ_{i,k} m_{i,k}/(N_i N_k), the mean over subjects of each subject's mean over its images). Within a
subject, images in per-prompt folders also get a per-prompt mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloak.errors import GateFailed, InputError, PartialFailure, UsageError
from cloak.io.report import Report, Stopwatch
from cloak.methods import build_options
from cloak.score.base import ScoreImage, aggregate

DEFAULT_METRICS_WITH_REF = ["fdfr", "ism"]
DEFAULT_METRICS_NO_REF = ["fdfr"]
AGGREGATION = "mean over subjects of each subject's mean over its images (DiffShortcut A.2)"


@dataclass
class Subject:
    name: str | None  # None: the single-subject run
    gen_dir: Path
    ref_dir: Path | None
    images: list[ScoreImage] = field(default_factory=list)
    ref: list[ScoreImage] | None = None
    values: dict[str, list] = field(default_factory=dict)
    table: dict[str, dict] = field(default_factory=dict)
    errors: dict[int, list[str]] = field(default_factory=dict)  # per image: metrics that could not score it


def read_images(root: Path, keep_going: bool, run) -> list[ScoreImage]:
    from cloak.io.images import input_files, load_pil

    files, base = input_files(root)
    if not files:
        raise InputError(f"no images found in {root}")
    out = []
    for path in files:
        try:
            rgb = np.asarray(load_pil(path), dtype=np.uint8)
        except InputError as exc:
            if not keep_going:
                raise
            if run is not None:
                run.add_item({"input": str(path), "status": "failed", "error": str(exc)})
            continue
        out.append(ScoreImage(str(path.relative_to(base).with_suffix("")), str(path), rgb))
    if not out:
        raise InputError(f"none of the images in {root} could be read")
    return out


def discover_subjects(gen_root: Path, ref_root: Path | None, warn) -> list[Subject]:
    """GEN_ROOT/<name>/ (or <name>/gen/) paired with REF_ROOT/<name>/, in name order."""
    from cloak.io.images import natural_key

    if not gen_root.is_dir():
        raise InputError(f"--per-subdir: {gen_root} is not a directory")
    subjects = []
    for sub in sorted((p for p in gen_root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: natural_key(p.name)):
        gen = sub / "gen" if (sub / "gen").is_dir() else sub
        if ref_root is not None and not (ref_root / sub.name).is_dir():
            warn(f"--per-subdir: no reference folder {ref_root / sub.name} for {sub.name}; subject skipped")
            continue
        subjects.append(Subject(sub.name, gen, ref_root / sub.name if ref_root is not None else None))
    if not subjects:
        raise InputError(f"--per-subdir: no subject folder in {gen_root}"
                         + (f" with a same-named folder in {ref_root}" if ref_root is not None else ""))
    return subjects


def metric_option_layers(options: dict[str, str], metric_names: list[str]) -> dict[str, dict[str, str]]:
    """``-o METRIC.KEY=VALUE`` → {metric: {key: value}} (``-o`` turns '-' into '_' in keys: undo for names)."""
    by_key = {n.replace("-", "_"): n for n in metric_names} | {n: n for n in metric_names}
    per_metric: dict[str, dict[str, str]] = {}
    for key, value in options.items():
        metric, dot, opt = key.partition(".")
        if not dot or metric not in by_key:
            raise UsageError(f"score options are METRIC.KEY=VALUE for a selected metric "
                             f"({', '.join(metric_names)}), got {key!r}")
        per_metric.setdefault(by_key[metric], {})[opt] = value
    return per_metric


def _stats(result) -> dict[str, Any]:
    stats = aggregate(result.values)
    if result.value is not None:
        stats["mean"] = result.value
    return stats


def _prompt_means(images: list[ScoreImage], values: dict[str, list]) -> dict[str, dict[str, float | None]]:
    """Per first-level folder (``cloak attack`` writes one per prompt) the mean of each metric."""
    groups: dict[str, list[int]] = {}
    for i, img in enumerate(images):
        head, sep, _ = img.name.partition("/")
        groups.setdefault(head if sep else ".", []).append(i)
    if len(groups) < 2:
        return {}
    return {g: {m: aggregate([v[i] for i in idx])["mean"] for m, v in values.items()} for g, idx in groups.items()}


def _typed(run, key: str, flag: Any, default: Any, kind: str) -> Any:
    """A [score] value from flag or cloak.toml, of the type the key needs (a usage error naming the key)."""
    from cloak.config import check_type, key_error

    value = run.value(key, flag, default)
    if value is not None and run.params[key]["source"] == "config" and not check_type(value, kind):
        raise key_error(run.cfg.path, f"score.{key}", value, kind)
    return value


def _texts(value: str | list[str] | None) -> list[str]:
    return [] if value is None else ([value] if isinstance(value, str) else list(value))


def score_run(generated_dir, *, ref: str | None, metrics: list[str] | None, fail_if: list[str] | None,
              report_path: str | None, per_subdir: bool | None, sheet: str | None, common,
              undefined: str | None = None, align: str | None = None) -> Report:
    import logging

    from cloak._verb import VerbRun
    from cloak.config import check_type, key_error
    from cloak.score import SCORE
    from cloak.score.gates import UNDEFINED, metric_name, parse_gate

    generated_dir = Path(generated_dir)
    for flag, path in (("--report", report_path), ("--sheet", sheet)):
        if path is not None and Path(path).is_dir():  # found before any scoring, not after
            raise UsageError(f"{flag} {path} is a directory; give a file name")
    run = VerbRun("score", SCORE, common, default_method="fdfr", default_model=None)
    run.method_name = None
    metric_names = _typed(run, "metrics", metrics or None,
                          DEFAULT_METRICS_WITH_REF if ref else DEFAULT_METRICS_NO_REF, "str_list")
    if isinstance(metric_names, str):
        metric_names = [m.strip() for m in metric_names.split(",") if m.strip()]
    # Case does not matter (ISM is ism); unknown names → usage error with a suggestion.
    metric_names = list(dict.fromkeys(metric_name(n, SCORE.names(), "--metric") for n in metric_names))
    per_subdir = _typed(run, "per_subdir", per_subdir, False, "bool")
    sheet = _typed(run, "sheet", sheet, None, "str")
    undefined = _typed(run, "undefined", undefined, "fail", "str")
    if undefined not in UNDEFINED:
        raise UsageError(f"--undefined {undefined!r}; valid: {', '.join(UNDEFINED)}")
    # Gates from cloak.toml and --fail-if add up. A config gate applies only when its metrics are computed in
    # this run (a [score] gate on ism must not break `cloak score --metric psnr`); a --fail-if gate on a
    # metric not computed is a usage error.
    config_value = run.cfg.verb("score").get("fail_if")
    if config_value is not None and not check_type(config_value, "str_list"):
        raise key_error(run.cfg.path, "score.fail_if", config_value, "str_list")
    gates, gate_texts = [], []
    for text in _texts(config_value):
        gate = parse_gate(text, SCORE.names())
        absent = sorted(gate.metrics() - set(metric_names))
        if absent:
            note = f"config gate {text!r} not applied: {', '.join(absent)} not computed in this run"
            run.warnings.append(note)
            logging.getLogger("cloak").warning(note)
            continue
        gates.append(gate)
        gate_texts.append(text)
    for text in fail_if or []:
        gates.append(parse_gate(text, metric_names))
        gate_texts.append(text)
    sources = [s for s, given in (("config", config_value), ("flag", fail_if)) if given]
    run.params["fail_if"] = {"value": gate_texts, "source": "+".join(sources) or "default"}
    needing_ref = [n for n in metric_names if SCORE.get(n).needs_ref]
    if needing_ref and ref is None:
        raise UsageError(f"metric(s) {', '.join(needing_ref)} need the clean reference set: pass --ref DIR")
    per_metric = metric_option_layers(common.options, metric_names)

    from cloak.score.fullref import ALIGNS

    align = run.value("align", align, "none")
    if align not in ALIGNS:
        raise UsageError(f"unknown --align {align!r}; valid: {', '.join(ALIGNS)}")
    ctx = run.context(extras={"align": align})
    instances, options_record = {}, {}
    for name in metric_names:
        cls = SCORE.get(name)
        layers = [("config", run.cfg.method("score", name)), ("-o", per_metric.get(name, {}))]
        opts, options_record[name] = build_options(cls.Options, layers, name)
        instances[name] = cls(opts, ctx)
    for text in gate_scale_warnings(gates, instances):
        run.warnings.append(text)
        logging.getLogger("cloak").warning(text)

    ref_root = Path(ref) if ref is not None else None
    if ref is not None:
        run.params["ref"] = {"value": str(ref), "source": "flag"}
    if per_subdir:
        subjects = discover_subjects(generated_dir, ref_root, ctx.warn)
    else:
        subjects = [Subject(None, generated_dir, ref_root)]
    seconds = {n: 0.0 for n in metric_names}
    n_images = 0
    with ctx.progress.task("score", len(metric_names) * len(subjects)) as bar:
        for subject in subjects:
            subject.images = read_images(subject.gen_dir, common.keep_going, run)
            subject.ref = read_images(subject.ref_dir, False, None) if subject.ref_dir is not None else None
            n_images += len(subject.images)
            for name in metric_names:
                clock = Stopwatch()
                try:
                    result = instances[name].compute(subject.images, subject.ref)
                except InputError as exc:
                    if subject.name is None:
                        raise
                    raise InputError(f"subject {subject.name}: {exc}") from None
                seconds[name] += clock.seconds()
                subject.values[name] = result.values
                for i, why in result.errors.items():
                    subject.errors.setdefault(i, []).append(f"{name}: {why}")
                subject.table[name] = {**_stats(result),
                                       **({"extras": result.extras} if result.extras else {})}
                bar.advance(1, status=f"{subject.name or ''} {name}".strip())
            unpaired = _unpaired(subject, [n for n in metric_names if SCORE.get(n).mode == "FR"])
            if unpaired:
                ctx.warn(f"{len(unpaired)} of {len(subject.images)} images in {subject.gen_dir} have no reference "
                         f"of the same name in {subject.ref_dir} (e.g. {unpaired[0]}): their paired metrics are "
                         f"null and the means are over the other images")
            for i, img in enumerate(subject.images):
                record = {"input": img.path, "status": "ok", "scores": {n: subject.values[n][i] for n in metric_names}}
                if img.name in unpaired:
                    record["unpaired"] = True
                if i in subject.errors:
                    record.update(status="failed", error="; ".join(dict.fromkeys(subject.errors[i])))
                if subject.name is not None:
                    record["subject"] = subject.name
                run.add_item(record)

    table: dict[str, dict] = {}
    for name in metric_names:
        cls = SCORE.get(name)
        info = {**cls.describe(), "seconds_per_image": round(seconds[name] / max(1, n_images), 5)}
        if per_subdir:
            means = [s.table[name]["mean"] for s in subjects]
            stats = aggregate(means)
            stats["n_images"] = sum(s.table[name]["n"] for s in subjects)
            extras = _merge_extras([s.table[name].get("extras", {}) for s in subjects])
            table[name] = {**stats, **({"extras": extras} if extras else {}), **info}
        else:
            table[name] = {**subjects[0].table[name], **info}
    gate_results = []
    for gate in gates:
        failed, why = gate.evaluate(table, undefined)
        gate_results.append({"gate": gate.text, "failed": failed, "values": why})
    summary: dict[str, Any] = {"metrics": table, "gates": gate_results, "n_images": n_images}
    if per_subdir:
        summary["aggregation"] = AGGREGATION
        summary["subjects"] = {s.name: {"metrics": s.table, "n_images": len(s.images), "gen": str(s.gen_dir),
                                        "ref": str(s.ref_dir) if s.ref_dir else None,
                                        **({"prompts": p} if (p := _prompt_means(s.images, s.values)) else {})}
                               for s in subjects}
    elif prompts := _prompt_means(subjects[0].images, subjects[0].values):
        summary["prompts"] = prompts
    if sheet:
        from cloak.score.sheet import contact_sheet

        path = contact_sheet(Path(sheet), subjects, metric_names, table)
        run.params["sheet"] = {"value": str(path), "source": run.params["sheet"]["source"]}
    report = run.report({"metrics": {"value": metric_names, "source": run.params["metrics"]["source"]},
                         **{f"{k}.{o}": v for k, rec in options_record.items() for o, v in rec.items()}},
                        summary, method_info={"metrics": {n: SCORE.get(n).info() | {"summary": SCORE.entry(n).summary}
                                                          for n in metric_names}})
    report.method = None
    if report_path:
        target = Path(report_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        report.write(target.parent, target.name)
    # Exit precedence: a partial failure (5: some images unread, so every figure is over a subset) beats a
    # failed gate (6); the failed gates are still named in the message and the report.
    failed_gates = [g for g in gate_results if g["failed"]]
    gate_text = "; ".join(f"gate failed: {g['gate']} ({g['values']})" for g in failed_gates)
    failed = sum(1 for i in run.items if i.status == "failed")
    if failed:
        exc = PartialFailure(f"{failed} image(s) could not be read or scored"
                             + (f"; also {gate_text}" if gate_text else ""))
        exc.report = report
        raise exc
    if failed_gates:
        exc = GateFailed(gate_text)
        exc.report = report
        raise exc
    return report


def _unpaired(subject: Subject, paired_metrics: list[str]) -> list[str]:
    """Names of the subject's images that a paired (FR) metric found no reference for: a mean over a subset
    must not pass silently for a mean over the set."""
    from cloak.score.base import pair_by_name

    if not paired_metrics or not subject.ref:
        return []
    pairs = pair_by_name(subject.images, subject.ref, paired_metrics[0])
    return [img.name for img, ref in zip(subject.images, pairs) if ref is None]


# The backend whose cosine scale ISM gate thresholds (e.g. 'ism>0.35', the papers' ArcFace numbers) are written on.
ISM_GATE_BACKEND = "retinaface"


def gate_scale_warnings(gates, instances: dict) -> list[str]:
    """A warning for each gate on ism computed with another backend than the one ISM thresholds come from:
    dlib's descriptors put different people at cosine 0.71–0.93 (91 LFW faces), so 'ism>0.35' under
    ism.backend=dlib fails for any face at all."""
    ism = instances.get("ism")
    backend = getattr(getattr(ism, "opts", None), "backend", ISM_GATE_BACKEND)
    if ism is None or backend == ISM_GATE_BACKEND:
        return []
    return [f"gate {gate.text!r} reads ism computed with ism.backend={backend}, but ISM thresholds are on the "
            f"{ISM_GATE_BACKEND} (ArcFace) cosine scale; on {backend}'s scale different people already score "
            f"high (dlib: cosine 0.71–0.93). For a verdict that holds on every backend gate on idmatch instead "
            f"(--metric idmatch -o idmatch.backend={backend} --fail-if 'idmatch>0.5')"
            for gate in gates if "ism" in gate.metrics()]


def _merge_extras(per_subject: list[dict[str, Any]]) -> dict[str, Any]:
    """One top-level ``extras`` from the subjects': a value all subjects share (backend) is kept, counts
    (ints) are summed, figures (floats, e.g. ism_det) are the mean over the subjects that have one."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for extras in per_subject for k in extras):
        values = [e.get(key) for e in per_subject]
        present = [v for v in values if v is not None]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in present) and present:
            out[key] = sum(present)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present) and present:
            out[key] = float(np.mean(present))
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        else:
            out[key] = {"per_subject": values}
    return out
