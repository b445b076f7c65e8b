"""Progress reporting that library code can call without knowing about terminals.

The CLI installs a rich bar on stderr when stderr is a TTY, and log lines (``-v``) otherwise; the
Python API defaults to silence.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("cloak.progress")


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


class _LogTask(Task):
    def __init__(self, description: str, total: int | None):
        self.description, self.total, self.done = description, total, 0
        self.start = time.perf_counter()
        self.next_report = 0.1

    def advance(self, n: int = 1, status: str | None = None) -> None:
        self.done += n
        if self.total and self.done / self.total >= self.next_report:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.done * (self.total - self.done)
            log.info("%s: %d/%d (%.0f%%), eta %.0fs%s", self.description, self.done, self.total,
                     100 * self.done / self.total, eta, f" [{status}]" if status else "")
            while self.next_report <= self.done / self.total:
                self.next_report += 0.1


class LogProgress(Progress):
    """One log line per 10 % (stderr is not a terminal: no bars)."""

    def task(self, description: str, total: int | None) -> Task:
        return _LogTask(description, total)


class _RichTask(Task):
    def __init__(self, bar, description: str, total: int | None):
        self.bar = bar
        self.id = bar.add_task(description, total=total, status="")  # the status column reads it on every refresh

    def advance(self, n: int = 1, status: str | None = None) -> None:
        self.bar.update(self.id, advance=n, status=status or "")

    def close(self) -> None:
        self.bar.remove_task(self.id)


class RichProgress(Progress):
    """A rich bar with ETA on stderr."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichBar

        self.bar = RichBar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                           console=console, transient=True)
        self.bar.start()

    def task(self, description: str, total: int | None) -> Task:
        return _RichTask(self.bar, description, total)

    def stop(self) -> None:
        self.bar.stop()
