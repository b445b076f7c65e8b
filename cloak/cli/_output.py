"""stdout carries data only; progress, logs, warnings and summaries go to stderr.

What stdout holds, per mode (README "Output streams"; tests/test_streams.py checks every verb):

  default   the verb's result: OUTPUT's path (protect, purify, attack, immunize), or one
            ``metric<TAB>mean`` line per metric (score)
  --json    the full report, one JSON document
  --jsonl   one JSON record per item as it finishes, nothing else
  -q        the same as the default, with nothing on stderr but errors

Every message on stderr is plain text: the console never reads Rich markup in it (a ``[models]`` in a
hint, a file name with brackets), and off a terminal it never wraps lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.text import Text

err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True, no_color=bool(os.environ.get("NO_COLOR")))

_STYLES = {"error": "red", "warning": "yellow", "info": "", "debug": "dim", "critical": "red"}
_shown_warnings: set[str] = set()


def reset() -> None:
    """Forget the warnings shown (one CLI invocation each, also when several run in one process)."""
    from cloak.cli import _run

    _shown_warnings.clear()
    _run.current_output = None


def data(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def data_json(obj: Any) -> None:
    data(json.dumps(obj, indent=2))


def jsonl(record: dict) -> None:
    data(json.dumps(record, separators=(",", ":")))


def message(level: str, text: str) -> None:
    """``level: text`` on stderr, the level coloured on a terminal, the text never read as markup."""
    err.print(Text.assemble((f"{level}:", _STYLES.get(level, "")), " ", str(text)))


def error(text: str) -> None:
    message("error", text)


def warning(text: str) -> None:
    """A warning, printed once per process however many times it is raised (log line, then summary)."""
    if text in _shown_warnings:
        return
    _shown_warnings.add(text)
    message("warning", text)


def note(text: str) -> None:
    """A plain line on stderr (summaries, hints)."""
    err.print(Text(str(text)))


class _Handler(logging.Handler):
    """The ``cloak`` logger's lines on stderr as ``level: message``; warnings go through :func:`warning`."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and os.environ.get("CLOAK_DEBUG"):
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            if record.levelno == logging.WARNING:
                warning(text)
            else:
                message(record.levelname.lower(), text)
        except Exception:  # noqa: BLE001 — logging must never break a run
            self.handleError(record)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    if quiet:
        level = logging.ERROR
    root = logging.getLogger("cloak")
    root.handlers[:] = [_Handler()]
    root.setLevel(level)
    root.propagate = False


def make_progress(quiet: bool):
    from cloak._progress import LineProgress, Progress, RichProgress

    if quiet:
        return Progress()
    if err.is_terminal:
        return RichProgress(err)
    return LineProgress()


def summarize(report) -> None:
    """A short human summary on stderr, then each warning not already shown."""
    s = report.summary
    parts = [f"{report.verb} {report.method or ''}".strip(), f"ok {s.get('ok', 0)}"]
    if s.get("failed"):
        parts.append(f"failed {s['failed']}")
    if s.get("skipped"):
        parts.append(f"skipped {s['skipped']}")
    parts.append(f"{report.seconds:.1f}s")
    note(" · ".join(parts))
    for item in report.items:  # each failure by name (--keep-going), not only a count
        if item.status == "failed":
            what = item.input or item.output or "?"
            reason = (item.error or "unknown error").splitlines()[0]
            note(f"failed: {reason}" if what in reason else f"failed: {what}: {reason}")
    for w in report.warnings:
        warning(w)
