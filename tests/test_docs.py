"""Man pages, completions and docs/cli.md are generated from the CLI and must be current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_docs_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_every_command_has_help_and_a_man_page():
    from cloak.cli._docs import flatten, walk

    for cmd in flatten(walk()):
        assert cmd.help, f"{' '.join(cmd.path)} has no help text"
        assert (ROOT / "man" / f"{'-'.join(cmd.path)}.1").is_file()
        for opt in cmd.options:
            assert opt.help, f"{' '.join(cmd.path)} {opt.names[0]} has no help"


def test_bash_completion_is_valid_bash():
    script = (ROOT / "completions" / "cloak.bash").read_text()
    r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
