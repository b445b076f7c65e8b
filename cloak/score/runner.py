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


def score_run(generated_dir, *, ref: str | None, metrics: list[str] | None, fail_if: list[str] | None,
              report_path: str | None, per_subdir: bool | None, sheet: str | None, common,
              align: str | None = None) -> Report:
    from cloak._verb import VerbRun
    from cloak.score import SCORE
    from cloak.score.gates import parse_gate

    generated_dir = Path(generated_dir)
    for flag, path in (("--report", report_path), ("--sheet", sheet)):
        if path is not None and Path(path).is_dir():  # found before any scoring, not after
            raise UsageError(f"{flag} {path} is a directory; give a file name")
    run = VerbRun("score", SCORE, common, default_method="fdfr", default_model=None)
    run.method_name = None
    metric_names = run.value("metrics", metrics or None, DEFAULT_METRICS_WITH_REF if ref else DEFAULT_METRICS_NO_REF)
    if isinstance(metric_names, str):
        metric_names = [m.strip() for m in metric_names.split(",") if m.strip()]
    metric_names = list(dict.fromkeys(metric_names))
    for name in metric_names:
        SCORE.entry(name)  # unknown names → usage error with a suggestion
    per_subdir = bool(run.value("per_subdir", per_subdir, False))
    sheet = run.value("sheet", sheet, None)
    config_gates = run.cfg.verb("score").get("fail_if", [])
    gate_texts = list(fail_if or []) or ([config_gates] if isinstance(config_gates, str) else list(config_gates))
    run.params["fail_if"] = {"value": gate_texts, "source": "flag" if fail_if else
                             ("config" if gate_texts else "default")}
    gates = [parse_gate(g, metric_names) for g in gate_texts]
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
            for i, img in enumerate(subject.images):
                record = {"input": img.path, "status": "ok", "scores": {n: subject.values[n][i] for n in metric_names}}
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
            table[name] = {**stats, **info}
        else:
            table[name] = {**subjects[0].table[name], **info}
    gate_results = []
    for gate in gates:
        failed, why = gate.evaluate(table)
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
    failed_gates = [g for g in gate_results if g["failed"]]
    if failed_gates:
        exc = GateFailed("; ".join(f"gate failed: {g['gate']} ({g['values']})" for g in failed_gates))
        exc.report = report
        raise exc
    failed = sum(1 for i in run.items if i.status == "failed")
    if failed:
        exc = PartialFailure(f"{failed} image(s) could not be read or scored")
        exc.report = report
        raise exc
    return report
