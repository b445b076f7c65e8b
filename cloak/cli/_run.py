"""Glue shared by the verb commands: flags → ``api.Common``, then render the report."""

from __future__ import annotations

import sys
from pathlib import Path

from cloak.cli import _output


def common(*, method=None, model=None, tiny=False, effort=None, resolution=None, seed=None, device=None,
           dtype=None, option=None, force=False, resume=False, keep_going=False, keep_metadata=False, compat=False,
           config=None, cache_dir=None, quiet=False, verbose=0, jsonl=False, class_dir=None):
    from cloak._verb import Common
    from cloak.methods import parse_option_pairs

    _output.setup_logging(verbose, quiet)
    if force and resume:
        from cloak.errors import UsageError

        raise UsageError("--force and --resume contradict each other; pick one")
    return Common(method=method, model=model, tiny=tiny, effort=effort, resolution=resolution, seed=seed,
                  device=device, dtype=dtype, options=parse_option_pairs(option or []), force=force, resume=resume,
                  keep_going=keep_going, keep_metadata=keep_metadata, compat=compat, config=config,
                  cache_dir=cache_dir, class_dir=str(class_dir) if class_dir is not None else None,
                  argv=["cloak", *sys.argv[1:]], progress=_output.make_progress(quiet),
                  on_item=_output.jsonl if jsonl else None)


def render(report, out_dir: Path | None, *, as_json: bool, jsonl: bool, quiet: bool) -> None:
    """Data on stdout (the report, item records, or output paths); the summary on stderr."""
    if as_json:
        _output.data(report.to_json())
    elif quiet:
        for item in report.items:
            if item.output and item.status == "ok":
                _output.data(item.output)
    elif not jsonl and out_dir is not None:
        _output.data(str(out_dir))
    if not quiet:
        _output.summarize(report)


def stop_progress(c) -> None:
    if c.progress is not None and hasattr(c.progress, "stop"):
        c.progress.stop()


def execute(c, call, out_dir: Path | None, *, as_json: bool, jsonl: bool, quiet: bool):
    """Run ``call()``; render its report, also when some items failed (exit 5) or a gate failed (exit 6)."""
    from cloak.errors import CloakError

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
