"""Glue shared by the verb commands: flags → ``api.Common``, then render the report."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from cloak.cli import _output

# The output folder of the verb running in this process, for the Ctrl-C message (cloak.cli.main).
current_output: Path | None = None
STATE_DIR = ".cloak-state"  # a verb's checkpoints inside its OUTPUT


def common(*, method=None, model=None, tiny=False, effort=None, resolution=None, seed=None, device=None,
           dtype=None, memory=None, option=None, force=False, resume=False, keep_going=False, keep_metadata=False, compat=False,
           config=None, cache_dir=None, quiet=False, verbose=0, jsonl=False, class_dir=None):
    from cloak._verb import Common
    from cloak.methods import parse_option_pairs

    _output.setup_logging(verbose, quiet)
    if force and resume:
        from cloak.errors import UsageError

        raise UsageError("--force and --resume contradict each other; pick one")
    return Common(method=method, model=model, tiny=tiny, effort=effort, resolution=resolution, seed=seed,
                  device=device, dtype=dtype, memory=memory, options=parse_option_pairs(option or []), force=force, resume=resume,
                  keep_going=keep_going, keep_metadata=keep_metadata, compat=compat, config=config,
                  cache_dir=cache_dir, class_dir=str(class_dir) if class_dir is not None else None,
                  argv=["cloak", *sys.argv[1:]], progress=_output.make_progress(quiet),
                  on_item=_output.jsonl if jsonl else None)


def render(report, out_dir: Path | None, *, as_json: bool, jsonl: bool, quiet: bool) -> None:
    """stdout holds one thing per mode (cloak/cli/_output.py): the report (--json), nothing more than the
    records already streamed (--jsonl), or OUTPUT's path (default, and -q, which only silences stderr)."""
    if as_json:
        _output.data(report.to_json())
    elif not jsonl and out_dir is not None:
        _output.data(str(out_dir))
    if not quiet:
        _output.summarize(report)


def stop_progress(c) -> None:
    if c.progress is not None and hasattr(c.progress, "stop"):
        c.progress.stop()


def execute(c, call, out_dir: Path | None, *, as_json: bool, jsonl: bool, quiet: bool, run_dir: Path | None = None):
    """Run ``call()``; render its report, also when some items failed (exit 5) or a gate failed (exit 6).

    ``out_dir`` is what stdout names; ``run_dir`` (default ``out_dir``) the OUTPUT folder that holds the
    run's results and checkpoints, for the Ctrl-C message."""
    from cloak._lazy_imports import library_imports
    from cloak.errors import CloakError

    global current_output
    run_dir = run_dir if run_dir is not None else out_dir
    current_output = Path(run_dir) if run_dir is not None else None
    with library_imports("torch"):  # every verb's run imports torch first: its objects made and frozen unwalked
        import torch  # noqa: F401
    try:
        report = call()
    except CloakError as exc:
        stop_progress(c)
        if getattr(exc, "report", None) is not None:
            render(exc.report, out_dir, as_json=as_json, jsonl=jsonl, quiet=quiet)
        raise
    finally:
        stop_progress(c)
    render(report, out_dir, as_json=as_json, jsonl=jsonl, quiet=quiet)
    return report


def _kept_files(out_dir: Path) -> int:
    """Finished outputs in OUTPUT: visible files other than the report (hidden folders hold state)."""
    count = 0
    for path in out_dir.rglob("*"):
        rel = path.relative_to(out_dir).parts
        if path.is_file() and not any(part.startswith(".") for part in rel) and path.name != "report.json":
            count += 1
    return count


def resume_command(args: list[str]) -> str:
    """The command line that continues an interrupted run: the same flags, --force replaced by --resume."""
    rest = [a for a in args if a != "--force"]
    if "--resume" not in rest:
        rest.append("--resume")
    return shlex.join(["cloak", *rest])


def interrupted_message(args: list[str]) -> str:
    """One line for Ctrl-C: what was kept, where, and the exact command that resumes."""
    out_dir = current_output
    if out_dir is None:
        return "interrupted"
    kept = []
    files = _kept_files(out_dir) if out_dir.is_dir() else 0
    if files:
        kept.append(f"{files} finished output file(s) in {out_dir}")
    for state in (out_dir / STATE_DIR, out_dir.parent / f".{out_dir.name}.partial"):
        if state.is_dir():
            kept.append(f"checkpoints in {state}")
    what = "kept " + " and ".join(kept) if kept else f"nothing finished yet in {out_dir}"
    return f"interrupted: {what}; resume with: {resume_command(args)}"
