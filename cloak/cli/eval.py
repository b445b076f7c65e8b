"""``cloak eval``: the paper's whole table (protections × purifications × attacks × metrics) in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cloak.cli import _options as O  # noqa: N812

HELP = """Run a PLAN of protections × purifications × attacks over identities and score every cell:
the evaluation table of the papers, built by the five verbs, resumable.

PLAN is a TOML file (below). Each identity folder holds protect/ (the photos the attacker gets),
clean/ (other clean photos of the person, the surrogate's --ref) and ref/ (clean photos scored
against; clean/ when missing): Anti-DreamBooth's sets B, A and C. The folder names are settable.

Every step is an ordinary verb run in OUTPUT/cells/ (the same folder you would get by hand), keyed by
a hash of its inputs, method, resolved options, model and cloak version. Run the same command again
and finished steps are skipped, changed ones redone, interrupted ones continued: a Ctrl-C loses no
finished cell. Cells share upstream steps: one protection feeds every purifier and attack.

OUTPUT gets results.csv (a row per identity × cell × metric), results.json (schema cloak.eval/1),
results.md (mean ± std over identities, the best protection per column in bold, each face metric's
backend named), results.png (a panel per metric) and sheets/IDENTITY.png. The table is printed on
stdout; progress (one line per finished cell, with the plan's ETA) on stderr.

A bad plan (unknown method, bad option, missing folder) is exit 2 before any work, every problem
listed. A failing cell is recorded with its error and the others go on: exit 5 if any failed.
"""

EPILOG = """A plan (identity folders relative to the plan; each holds protect/, clean/, ref/,
renamed by clean = "set_A", protect = "set_B", ref = "set_C" under [data]):

  [data]
  identities = "celeb/*"
  [grid]
  protect = ["none", "aspl", { method = "mist", eps = "8/255" }]
  purify  = ["none", "jpeg:quality=75"]
  attack  = ["dreambooth"]
  score   = ["fdfr", "ism"]
  seeds   = [0]
  [common]
  model = "sd21-base"     # also tiny, effort, resolution, device, dtype
  [attack]
  num_images = 4          # what every attack entry starts from

Examples:

  cloak eval plan.toml results/ --dry-run     (cells, cache, work left)

  cloak eval plan.toml results/               (run; run again to resume)

  cloak eval plan.toml results/ --executor ray --ray-address auto

  (Ray: pip install 'cloak[cluster]'. Plans in full: docs/eval.md)
"""


def register(app: typer.Typer) -> None:
    @app.command("eval", help=HELP, epilog=EPILOG, no_args_is_help=True)
    def eval_(
        plan: Annotated[Path, typer.Argument(metavar="PLAN", help="The plan (TOML).")],
        output_dir: Annotated[Path, typer.Argument(metavar="OUTPUT", help="Folder for the cells and results.")],
        executor: Annotated[str, typer.Option("--executor", help="local: this process, models loaded once for "
                                              "the plan; ray: each step a Ray task, an actor per device.",
                                              rich_help_panel="Run")] = "local",
        ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to join (auto, "
                                                           "ray://host:10001); default: start one here.",
                                                           rich_help_panel="Run")] = None,
        workers: Annotated[Optional[int], typer.Option("--workers", help="Ray actors (default: one per GPU, "
                                                       "else one per CPU).", rich_help_panel="Run")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the cells, what is cached and the work "
                                              "left (model passes), then exit.", rich_help_panel="Run")] = False,
        force: Annotated[bool, typer.Option("--force", help="Redo every step (default: keep finished ones).",
                                            rich_help_panel="Output")] = False,
        resume: Annotated[bool, typer.Option("--resume", help="Keep finished steps (the default; accepted for "
                                             "symmetry with the other verbs).", rich_help_panel="Output")] = False,
        jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON record per cell on stdout as it "
                                            "finishes (instead of the table).", rich_help_panel="Output")] = False,
        quiet: O.QuietOpt = False,
        verbose: O.VerboseOpt = 0,
    ) -> None:
        from cloak.cli import _output, _run
        from cloak.errors import CloakError, UsageError
        from cloak.eval import run_eval

        _output.setup_logging(verbose, quiet)
        if force and resume:
            raise UsageError("--force and --resume contradict each other; pick one")
        _run.current_output = Path(output_dir)
        log = None if quiet else _output.note
        try:
            result = run_eval(plan, output_dir, executor=executor, dry_run=dry_run, force=force, log=log,
                              on_cell=_output.jsonl if jsonl else None, ray_address=ray_address, workers=workers)
        except CloakError as exc:
            run = getattr(exc, "eval_run", None)
            if run is not None and not jsonl:
                _output.data(run.table.rstrip("\n"))
            raise
        if result.dry_run:
            _output.data(result.plan_text)
            return
        if not jsonl:
            _output.data(result.table.rstrip("\n"))
        if not quiet:
            _output.note(f"results: {result.files['md']} (also .csv, .json, .png; sheets/)")
