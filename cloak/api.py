"""The verbs as Python functions, re-exported: each verb's pipeline lives beside its methods
(``cloak/<verb>/run.py``; score's in ``cloak/score/runner.py``), the shared set-up in ``cloak/_verb.py``.

The public API is ``cloak.protect()`` etc. (``cloak/__init__.py``); this module keeps the ``run_*`` names
for scripts and tests that import them.
"""

from __future__ import annotations

from cloak._verb import Common, VerbRun, check_output_dir, same_dirs
from cloak.attack.run import run_attack, save_model_dir
from cloak.immunize.run import run_immunize
from cloak.io.report import Report
from cloak.protect.run import run_protect
from cloak.purify.run import run_purify


def run_score(generated_dir, *, ref: str | None = None, metrics: list[str] | None = None,
              fail_if: list[str] | None = None, report_path: str | None = None, per_subdir: bool | None = None,
              sheet: str | None = None, undefined: str | None = None, common: Common | None = None,
              **kwargs) -> Report:
    """Score GENERATED against the clean REF (or each GEN_ROOT/<name>/ against REF_ROOT/<name>/ with
    ``per_subdir``); gates raise :class:`GateFailed` (exit 6). The run lives in :mod:`cloak.score.runner`."""
    from cloak.score.runner import score_run

    return score_run(generated_dir, ref=ref, metrics=metrics, fail_if=fail_if, report_path=report_path,
                     per_subdir=per_subdir, sheet=sheet, common=common or Common(**kwargs), undefined=undefined)


__all__ = ["Common", "Report", "VerbRun", "check_output_dir", "run_attack", "run_immunize", "run_protect",
           "run_purify", "run_score", "same_dirs", "save_model_dir"]
