"""``cloak eval``: a plan of protections × purifications × attacks × metrics over identities, run through
the five verbs' Python API, resumable, on this machine or a Ray cluster; the paper's table at the end.

:func:`run_eval` is the whole command; :mod:`cloak.eval.plan` reads the plan, :mod:`cloak.eval.cells`
turns it into keyed steps, :mod:`cloak.eval.executors` runs them, :mod:`cloak.eval.results` writes
``results.{csv,json,md,png}`` and the contact sheets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloak._progress import _duration
from cloak.eval.cells import Cell, Step, build, cached, read_marker
from cloak.eval.plan import Plan, PlanError, load_plan

EXECUTORS = ("local", "ray")


@dataclass
class EvalRun:
    """What :func:`run_eval` returns: the plan, its cells' records, where the results are."""

    plan: Plan
    out: Path
    cells: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    table: str = ""
    dry_run: bool = False
    plan_text: str = ""

    @property
    def failed(self) -> int:
        return sum(1 for c in self.cells if c["status"] != "ok")


class Tracker:
    """Turns finished steps into finished cells: one progress line each (with the plan's ETA, from the
    estimated model passes done so far) and one record for ``--jsonl``."""

    def __init__(self, steps: dict[str, Step], cells: list[Cell], log: Callable[[str], None] | None,
                 on_cell: Callable[[dict], None] | None):
        self.steps, self.cells, self.log, self.on_cell = steps, cells, log, on_cell
        self.by_last: dict[str, list[Cell]] = {}
        for cell in cells:
            self.by_last.setdefault(cell.steps[-1], []).append(cell)
        self.records: dict[str, dict[str, Any]] = {}
        self.todo_work = sum(s.work for s in steps.values() if cached(s) is None)
        self.done_work = 0.0
        self.clock = time.perf_counter()
        self.finished: list[dict[str, Any]] = []

    def on_step(self, step: Step, record: dict[str, Any]) -> None:
        self.records[step.key] = record
        if not record.get("cached"):
            self.done_work += step.work
        for cell in self.by_last.get(step.key, []):
            self._cell_done(cell)

    def cell_record(self, cell: Cell) -> dict[str, Any]:
        from cloak.eval.results import cell_scores

        records = [self.records.get(k) or self._on_disk(self.steps[k]) for k in cell.steps]
        failed = next((r for r in records if r.get("status") in ("failed", "blocked")), None)
        status = "ok" if all(r.get("status") == "ok" for r in records) else ("failed" if failed else "pending")
        out: dict[str, Any] = {
            "cell": cell.id, "protect": cell.protect.label, "purify": cell.purify.label, "attack": cell.attack.label,
            "identity": cell.identity.name, "seed": cell.seed, "dir": str(cell.dir), "status": status,
            "cached": all(r.get("cached") for r in records) if status == "ok" else False,
            "steps": {self.steps[k].verb: {"key": k, "dir": str(self.steps[k].dir), "status": r.get("status"),
                                           "cached": bool(r.get("cached")), "seconds": r.get("seconds")}
                      for k, r in zip(cell.steps, records)},
        }
        if failed is not None:
            origin = next((r for r in records if r.get("status") == "failed"), failed)
            out["error"] = f"{origin.get('verb')}: {origin.get('error')}"
        if status == "ok":
            out["scores"], out["backends"] = cell_scores(self.steps[cell.steps[-1]].dir)
        return out

    @staticmethod
    def _on_disk(step: Step) -> dict[str, Any]:
        """A step this run did not reach: its record if it was made with the key the plan now gives it."""
        marker = read_marker(step) or {}
        return marker if marker.get("key") == step.key and marker.get("status") != "running" else {}

    def _cell_done(self, cell: Cell) -> None:
        record = self.cell_record(cell)
        self.finished.append(record)
        if self.on_cell is not None:
            self.on_cell(record)
        if self.log is None:
            return
        elapsed = time.perf_counter() - self.clock
        left = len(self.cells) - len(self.finished)
        if left == 0:
            eta = "done"
        elif self.todo_work - self.done_work <= 0:
            eta = "ETA 0s"
        elif self.done_work > 0:
            eta = "ETA " + _duration(elapsed * max(0.0, self.todo_work - self.done_work) / self.done_work)
        else:
            eta = "ETA ?"
        if record["status"] == "ok":
            what = "ok " + " ".join(f"{m}={_fmt(v)}" for m, v in record["scores"].items())
            what += " (cached)" if record["cached"] else ""
        else:
            what = f"FAILED {record.get('error')}"
        n = len(self.cells)
        self.log(f"[{len(self.finished):>{len(str(n))}}/{n}] {cell.id}: {what} · {_duration(elapsed)} elapsed, {eta}")


def _fmt(value: Any) -> str:
    return "n/a" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


def describe_plan(plan: Plan, steps: dict[str, Step], cells: list[Cell]) -> str:
    """``--dry-run``: the grid, every step with its state, and the work left in model passes."""
    lines = [f"plan {plan.path}: {len(plan.identities)} identities × {len(plan.protect)} protect × "
             f"{len(plan.purify)} purify × {len(plan.attack)} attack × {len(plan.seeds)} seed(s) = "
             f"{len(cells)} cells, "
             f"scored by {', '.join(m.label for m in plan.metrics)}",
             f"{len(steps)} distinct steps (cells share their upstream steps):"]
    todo = 0.0
    counts = {"cached": 0, "resume": 0, "run": 0}
    for step in sorted(steps.values(), key=lambda s: ("protect", "purify", "attack", "score").index(s.verb)):
        if cached(step) is not None:
            state = "cached"
        else:
            marker = read_marker(step)
            state = "resume" if marker and marker.get("key") == step.key and marker.get("status") == "running" \
                else "run"
            todo += step.work
        counts[state] += 1
        lines.append(f"  {state:<6} {step.verb:<7} {step.label:<24} {step.identity.name} seed {step.seed}  "
                     f"~{step.work:g} passes  {step.dir}")
    lines.append(f"{counts['cached']} cached, {counts['resume']} to resume, {counts['run']} to run; "
                 f"work left ≈ {todo:g} model passes (estimate: main iteration count × images, plus sampling)")
    return "\n".join(lines)


def run_eval(plan_path: str | Path, out_dir: str | Path, *, executor: str = "local", dry_run: bool = False,
             force: bool = False, log: Callable[[str], None] | None = None,
             on_cell: Callable[[dict], None] | None = None, ray_address: str | None = None,
             workers: int | None = None) -> EvalRun:
    """Run the plan into ``out_dir`` (``cloak eval``); finished steps are kept (resume is the default,
    ``force=True`` redoes everything). Raises :class:`PlanError` (exit 2) before any work for a bad plan,
    :class:`cloak.errors.PartialFailure` (exit 5, after writing the results) if any cell failed."""
    from cloak.errors import PartialFailure, UsageError
    from cloak.eval import results as results_mod
    from cloak.eval.executors import import_ray, run_local, run_ray

    if executor not in EXECUTORS:
        raise UsageError(f"unknown --executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    plan = load_plan(plan_path)
    if executor == "ray":
        import_ray()  # exit 2 naming the extra, before any work
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    steps, cells = build(plan, out)
    run = EvalRun(plan=plan, out=out)
    if dry_run:
        run.dry_run = True
        run.plan_text = describe_plan(plan, steps, cells)
        return run
    out.mkdir(parents=True, exist_ok=True)
    if force:
        for step in steps.values():
            step.marker.unlink(missing_ok=True)
    tracker = Tracker(steps, cells, log, on_cell)
    try:
        if executor == "local":
            run_local(steps, cells, tracker.on_step)
        else:
            ray_cfg = plan.ray
            run_ray(steps, cells, tracker.on_step, address=ray_address, workers=workers or ray_cfg.get("workers"),
                    num_gpus=ray_cfg.get("num_gpus"), num_cpus=ray_cfg.get("num_cpus"))
    finally:
        # Also on Ctrl-C: the results cover every cell finished so far (the rest are "pending").
        run.cells = [tracker.cell_record(c) for c in cells]
        run.files, run.table = results_mod.write_all(plan, out, run.cells, executor=executor)
    if run.failed:
        failed = [c for c in run.cells if c["status"] != "ok"]
        exc = PartialFailure(f"{len(failed)} of {len(cells)} cells failed (first: {failed[0]['cell']}: "
                             f"{failed[0].get('error')}); see {out / 'results.json'}")
        exc.eval_run = run
        raise exc
    return run


__all__ = ["EXECUTORS", "EvalRun", "PlanError", "load_plan", "run_eval"]
