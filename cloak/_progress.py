"""Progress reporting that library code can call without knowing about terminals.

The CLI installs a rich bar on stderr when stderr is a TTY, and sparse plain lines otherwise (CI logs:
every ~10 % or 30 s, with the ETA); the Python API defaults to silence.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Task:
    def advance(self, n: int = 1, status: str | None = None) -> None:  # noqa: D102
        pass

    def close(self) -> None:  # noqa: D102
        pass

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    """No output: the default for library use."""

    def task(self, description: str, total: int | None) -> Task:
        return Task()


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _LineTask(Task):
    def __init__(self, owner: LineProgress, description: str, total: int | None):
        self.owner, self.description, self.total, self.done = owner, description, total, 0
        self.start = self.last = owner.clock()
        self.next_fraction = owner.fraction

    def advance(self, n: int = 1, status: str | None = None) -> None:
        self.done += n
        now = self.owner.clock()
        fraction = self.done / self.total if self.total else None
        due_by_fraction = fraction is not None and fraction >= self.next_fraction
        due_by_time = now - self.last >= self.owner.interval
        if not (due_by_fraction or due_by_time):
            return
        if fraction is not None:
            while self.next_fraction <= fraction:
                self.next_fraction += self.owner.fraction
        self.last = now
        elapsed = now - self.start
        if self.total:
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            line = (f"{self.description}: {self.done}/{self.total} ({100 * fraction:.0f}%), "
                    f"{_duration(elapsed)} elapsed, eta {_duration(eta)}")
        else:
            line = f"{self.description}: {self.done} done, {_duration(elapsed)} elapsed"
        if status:
            line += f" ({status})"
        self.owner.write(line)


class LineProgress(Progress):
    """Plain progress lines for a stderr that is not a terminal (CI logs): one line per ``fraction`` of a
    task or per ``interval`` seconds, whichever comes first, each with elapsed time and ETA."""

    def __init__(self, stream: TextIO | None = None, *, fraction: float = 0.1, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.fraction, self.interval, self.clock = stream, fraction, interval, clock

    def write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def task(self, description: str, total: int | None) -> Task:
        return _LineTask(self, description, total)


class _RichTask(Task):
    def __init__(self, bar, description: str, total: int | None):
        self.bar = bar
        # Every field a column reads must exist from the start: the bar refreshes on its own thread.
        self.id = bar.add_task(description, total=total, status="")

    def advance(self, n: int = 1, status: str | None = None) -> None:
        self.bar.update(self.id, advance=n, status=status or "")

    def close(self) -> None:
        self.bar.remove_task(self.id)


class RichProgress(Progress):
    """A rich bar with ETA on stderr (a terminal)."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichBar

        # markup=False: descriptions and statuses are plain text (a method or file name may hold brackets).
        self.bar = RichBar(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                           TextColumn("{task.fields[status]}", markup=False),
                           console=console, transient=True)
        self.bar.start()

    def task(self, description: str, total: int | None) -> Task:
        return _RichTask(self.bar, description, total)

    def stop(self) -> None:
        self.bar.stop()
