"""stdout carries data only; progress, logs, warnings and summaries go to stderr."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from rich.console import Console

err = Console(stderr=True, highlight=False, no_color=bool(os.environ.get("NO_COLOR")))


def data(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def data_json(obj: Any) -> None:
    data(json.dumps(obj, indent=2))


def jsonl(record: dict) -> None:
    data(json.dumps(record, separators=(",", ":")))


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    if quiet:
        level = logging.ERROR
    from rich.logging import RichHandler

    root = logging.getLogger("cloak")
    root.handlers[:] = [RichHandler(console=err, show_time=False, show_path=False, markup=False)]
    root.setLevel(level)
    root.propagate = False


def make_progress(quiet: bool):
    from cloak._progress import LogProgress, Progress, RichProgress

    if quiet:
        return Progress()
    if err.is_terminal:
        return RichProgress(err)
    return LogProgress()


def summarize(report) -> None:
    """A short human summary on stderr."""
    s = report.summary
    parts = [f"{report.verb} {report.method or ''}".strip(), f"ok {s.get('ok', 0)}"]
    if s.get("failed"):
        parts.append(f"failed {s['failed']}")
    if s.get("skipped"):
        parts.append(f"skipped {s['skipped']}")
    parts.append(f"{report.seconds:.1f}s")
    err.print(" · ".join(parts))
    for item in report.items:  # each failure by name (--keep-going), not only a count
        if item.status == "failed":
            what = item.input or item.output or "?"
            reason = (item.error or "unknown error").splitlines()[0]
            err.print(f"failed: {reason}" if what in reason else f"failed: {what}: {reason}", markup=False,
                      soft_wrap=True)
    for w in report.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}")
