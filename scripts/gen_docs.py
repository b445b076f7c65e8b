#!/usr/bin/env python3
"""Regenerate docs/cli.md, man/cloak*.1 and completions/ from the CLI; ``--check`` only compares."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if any generated file is stale")
    args = parser.parse_args()
    from cloak.cli._docs import all_files

    files = all_files()
    stale = []
    for rel, text in files.items():
        path = ROOT / rel
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            stale.append(rel)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    for directory, pattern in (("man", "cloak*.1"), ("completions", "*")):
        for path in sorted((ROOT / directory).glob(pattern)):
            rel = f"{directory}/{path.name}"
            if rel not in files:
                stale.append(rel + " (no longer generated)")
                if not args.check:
                    path.unlink()
    if args.check:
        if stale:
            print("stale generated files (run scripts/gen_docs.py):\n  " + "\n  ".join(stale), file=sys.stderr)
            return 1
        return 0
    print(f"wrote {len(stale)} file(s)" if stale else "up to date", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
