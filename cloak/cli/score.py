"""``cloak score``: metrics with gates, for papers' tables and CI exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cloak.cli import _options as O  # noqa: N812
from cloak.cli import _output
from cloak.cli._run import common, stop_progress

HELP = """Score the images of GENERATED (e.g. `cloak attack`'s OUTPUT/gen) against clean photos.

Prints one `metric<TAB>mean` line per metric on stdout (or the full report with --json), and a
table on stderr. Gates make the exit code 6 when their expression is true, naming each failed gate.
--fail-if gates are added to those of fail_if in cloak.toml's score section (both apply). A config
gate applies only when its metrics are computed in this run (stderr says when one is skipped); a
--fail-if gate on a metric not computed is an error.

Gate expressions: METRIC[.mean|.std|.n] OP NUMBER, joined with `and` / `or`; OP is one of
< <= > >= == !=; metric names ignore case. Example: 'ism>0.35 or fdfr<0.5'. A gate that reads an
undefined value (no faces, PSNR of identical images, NIQE of too-small images) fails, unless
--undefined pass.

Exit codes: 0 ok, 6 a gate failed, 5 some images could not be read (--keep-going). 5 beats 6: when
both happen the exit is 5 (every figure is over a subset) and the message still names the failed
gates.

With --per-subdir, GENERATED and --ref are roots: each GENERATED/<name>/ (or <name>/gen/, as
`cloak attack` writes it) is scored against REF/<name>/, and the table (and the gates) use the mean
over subjects of each subject's mean. Metric options: -o METRIC.KEY=VALUE (e.g. -o ism.backend=dlib);
`cloak methods show METRIC` lists them.

ISM is a cosine on its backend's own scale, and ISM gate thresholds (e.g. 'ism>0.35') are on ArcFace's
(the default retinaface backend): under -o ism.backend=dlib different people already score 0.7-0.9,
and a warning says so. idmatch is the verdict that means the same on every backend: the fraction of
generations that the backend's own published same-person threshold verifies as the subject.
"""

EPILOG = """Examples:

  cloak score attacked/gen --ref photos/ --metric ism --metric fdfr

  cloak score attacked/gen --ref photos/ --fail-if 'ism>0.35' --fail-if 'fdfr<0.5'   (CI gate: exit 6)

  cloak score protected/ --ref photos/ --metric psnr --metric ssim --metric linf --json

  cloak score protected_crops/ --ref photos/ --metric psnr --align crop       (--fit crop outputs)

  cloak score attacked/gen --ref photos/ --metric idmatch --fail-if 'idmatch>0.5'
      (ArcFace IR-SE50: verified when the squared distance to the subject's mean embedding is < 1.54)

  cloak score gen/ --ref photos/ --metric fdfr,idmatch -o fdfr.backend=dlib -o idmatch.backend=dlib
      --fail-if 'idmatch>0.5'          (no GPU, no hub; dlib: verified at distance < 0.6)

  cloak score attacks/ --ref photos/ --per-subdir --metric ism,serfiq,brisque --sheet sheet.png

  cloak methods score                       (every metric, its direction and range)
"""


def register(app: typer.Typer) -> None:
    @app.command("score", help=HELP, epilog=EPILOG, no_args_is_help=True)
    def score(
        generated_dir: Annotated[Path, typer.Argument(metavar="GENERATED", help="Images to score; - reads image paths "
                                                           "from stdin, one per line.")],
        ref: Annotated[Optional[Path], typer.Option("--ref", help="Clean reference photos of the subject.")] = None,
        metric: Annotated[Optional[list[str]], typer.Option("--metric", help="Metric (repeatable, or comma "
                                                            "separated); default: fdfr, ism.")] = None,
        fail_if: Annotated[Optional[list[str]], typer.Option("--fail-if", metavar="EXPR", help="Fail (exit 6) "
                                                             "when EXPR is true; repeatable.")] = None,
        undefined: Annotated[Optional[str], typer.Option("--undefined", metavar="fail|pass", help="What a gate "
                                                         "on an undefined value does; default: fail.")] = None,
        report: Annotated[Optional[Path], typer.Option("--report", help="Also write the JSON report to this "
                                                       "file.")] = None,
        per_subdir: Annotated[Optional[bool], typer.Option("--per-subdir", help="Score each subdirectory of "
                                                           "GENERATED against the same-named one of --ref; "
                                                           "aggregate over subjects.", show_default=False)] = None,
        sheet: Annotated[Optional[Path], typer.Option("--sheet", metavar="PNG", help="Write a contact sheet: "
                                                      "reference and generated images with their scores.")] = None,
        align: Annotated[Optional[str], typer.Option(
            "--align", metavar="none|resize|crop",
            help="Full-reference metrics on a pair of different sizes: none (default: a per-item error naming "
                 "both sizes), resize (the reference resized to the image), crop (scaled to cover and centre-"
                 "cropped, as --fit crop made its square).")] = None,
        tiny: O.TinyOpt = False,
        seed: O.SeedOpt = None,
        device: O.DeviceOpt = None,
        option: Annotated[Optional[list[str]], typer.Option("--option", "-o", metavar="METRIC.KEY=VALUE",
                                                            help="Metric option (repeatable).")] = None,
        config: O.ConfigOpt = None,
        cache_dir: O.CacheOpt = None,
        as_json: O.JsonOpt = False,
        jsonl: O.JsonlOpt = False,
        quiet: O.QuietOpt = False,
        verbose: O.VerboseOpt = 0,
        keep_going: O.KeepGoingOpt = False,
    ) -> None:
        from cloak.errors import CloakError
        from cloak.score.runner import score_run

        metrics = [m.strip() for item in (metric or []) for m in item.split(",") if m.strip()]
        if metric and not metrics:  # --metric '' (an empty shell variable) must not quietly mean the defaults
            from cloak.errors import UsageError

            raise UsageError(f"--metric {metric[0]!r} names no metric", hint="`cloak methods score` lists them")
        c = common(tiny=tiny, seed=seed, device=device, option=option, keep_going=keep_going, config=config,
                   cache_dir=cache_dir, quiet=quiet, verbose=verbose, jsonl=jsonl)
        try:
            result = score_run(generated_dir, ref=str(ref) if ref else None, metrics=metrics or None,
                               fail_if=fail_if, report_path=str(report) if report else None,
                               per_subdir=per_subdir, sheet=str(sheet) if sheet else None, common=c,
                               undefined=undefined, align=align)
        except CloakError as exc:
            stop_progress(c)
            if getattr(exc, "report", None) is not None:
                _render(exc.report, as_json, quiet, jsonl)
            raise
        finally:
            stop_progress(c)
        _render(result, as_json, quiet, jsonl)


def _render(report, as_json: bool, quiet: bool, jsonl: bool = False) -> None:
    """stdout: the report (--json), the per-image records already streamed and nothing else (--jsonl), or
    one ``metric<TAB>mean`` line per metric (default, -q); the tables on stderr unless -q."""
    from rich.text import Text

    table = report.summary["metrics"]
    if as_json:
        _output.data(report.to_json())
    elif not jsonl:
        for name, row in table.items():
            _output.data(f"{name}\t{_num(row['mean'])}")
    if quiet:
        return
    from rich.table import Table

    t = Table(title=None, show_edge=False)
    for col in ("metric", "mean", "std", "n", "better", "range"):
        t.add_column(col)
    for name, row in table.items():
        lo, hi = row["range"]
        t.add_row(Text(name), _num(row["mean"]), _num(row["std"]), str(row["n"]), "lower" if row["lower_better"] else
                  "higher", Text(f"[{_num(lo)}, {_num(hi)}]"))
    _output.err.print(t)
    subjects = report.summary.get("subjects") or {}
    if subjects:
        names = list(table)
        st = Table(title=f"per subject (table above: {report.summary.get('aggregation')})", show_edge=False)
        st.add_column("subject")
        st.add_column("n")
        for name in names:
            st.add_column(name)
        for subject, row in subjects.items():
            st.add_row(Text(subject), str(row["n_images"]), *(_num(row["metrics"][n]["mean"]) for n in names))
        _output.err.print(st)
    for g in report.summary.get("gates", []):
        mark = Text("FAIL", style="red") if g["failed"] else Text("pass", style="green")
        _output.err.print(Text.assemble(mark, f" {g['gate']}  ({g['values']})"))
    for w in report.warnings:
        _output.warning(w)


def _num(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
