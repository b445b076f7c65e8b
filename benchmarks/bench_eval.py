#!/usr/bin/env python3
"""``cloak eval`` wall time: one warm process vs the same plan as a shell loop of ``cloak`` calls, and the
Ray executor with 1 vs 2 workers.

The plan is the test suite's (tiny-sd, 2 identities × 2 protections × 2 purifications × 1 attack × 2
metrics = 8 cells, 22 distinct steps). Variants, each into a fresh output folder:

* ``local``: ``cloak eval PLAN OUT`` (one process; every model loaded once for the plan);
* ``shell``: the same 22 steps as the ``cloak protect|purify|attack|score`` command lines a user would
  write (one process and one set of model loads per step), run one after another by bash;
* ``ray1`` / ``ray2``: ``cloak eval --executor ray --workers N`` on a local Ray cluster started by the run.

Stand-in weights are built into the cache by a warm-up run first. Figures: wall seconds of each variant
(process start included: both the eval and the loop pay it), ``shell / local`` and ``ray1 / ray2``.
Wall-clock ratios only mean something on an otherwise idle machine.

    python benchmarks/bench_eval.py                 # all variants
    python benchmarks/bench_eval.py --skip-ray      # local vs shell only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_eval import PLAN, make_identities  # noqa: E402  (the plan the tests check)


def cli_lines(plan_path: Path, out: Path) -> list[list[str]]:
    """Each step of the plan as the command line a user would type (upstream first)."""
    from cloak.eval.cells import build, step_order, verb_kwargs
    from cloak.eval.plan import load_plan

    flag_names = {"model": "--model", "effort": "--effort", "resolution": "--resolution", "seed": "--seed",
                  "device": "--device", "dtype": "--dtype", "steps": "--steps", "num_images": "--num-images",
                  "sample_steps": "--sample-steps", "eps": "--eps", "eps_unit": "--eps-unit", "fit": "--fit",
                  "guidance": "--guidance", "sampler": "--sampler", "negative_prompt": "--negative-prompt",
                  "ref": "--ref", "method": "--method"}
    steps, _ = build(load_plan(plan_path), out)
    lines = []
    for step in step_order(steps):
        kwargs = verb_kwargs(step)
        args = ["cloak", step.verb, "-q"]
        if kwargs.pop("tiny", False):
            args.append("--tiny")
        for key, value in (kwargs.pop("options", None) or {}).items():
            args += ["-o", f"{key}={value}"]
        for prompt in kwargs.pop("prompts", None) or []:
            args += ["--prompt", prompt]
        if step.verb == "score":
            args += ["--metric", ",".join(kwargs.pop("metrics")), "--report", str(step.dir / "report.json")]
        for key, value in kwargs.items():
            if value is not None:
                args += [flag_names[key], str(value)]
        args.append(str(step.input_dir))
        if step.verb != "score":
            args.append(str(step.dir))
        lines.append(args)
    return lines


def timed(cmd: list[str], env: dict) -> float:
    clock = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"{shlex.join(cmd[:6])} … failed with exit code {out.returncode}")
    return time.perf_counter() - clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    make_identities(work)
    plan = work / "plan.toml"
    plan.write_text(PLAN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1",
           "CLOAK_CACHE_DIR": os.environ.get("CLOAK_CACHE_DIR") or
           str(Path(tempfile.gettempdir()) / "cloak-bench-cache")}
    cloak = [sys.executable, "-m", "cloak"]
    warm = timed(cloak + ["eval", "-q", str(plan), str(work / "warm")], env)
    print(f"warm-up (builds the stand-in weights): {warm:.1f} s", file=sys.stderr)
    rows = {"local": timed(cloak + ["eval", "-q", str(plan), str(work / "local")], env)}
    script = work / "loop.sh"
    lines = cli_lines(plan, work / "shell")
    commands = [shlex.join([sys.executable, "-m", "cloak", *a[1:]]) for a in lines]
    script.write_text("set -e\n" + "\n".join(commands) + "\n")
    rows["shell"] = timed(["bash", str(script)], env)
    if not args.skip_ray:
        for n in (1, 2):
            rows[f"ray{n}"] = timed(cloak + ["eval", "-q", "--executor", "ray", "--workers", str(n), str(plan),
                                             str(work / f"ray{n}")], env)
    result = {"cells": 8, "steps": len(lines), "seconds": {k: round(v, 2) for k, v in rows.items()},
              "shell_over_local": round(rows["shell"] / rows["local"], 3)}
    if "ray2" in rows:
        result["ray1_over_ray2"] = round(rows["ray1"] / rows["ray2"], 3)
    print(f"plan: 8 cells, {len(lines)} steps (tiny-sd, CPU) in {work}")
    for key, value in rows.items():
        print(f"  {key:<6} {value:8.1f} s")
    print(f"  shell loop / local warm = {result['shell_over_local']:.2f}×")
    if "ray1_over_ray2" in result:
        print(f"  ray 1 worker / 2 workers = {result['ray1_over_ray2']:.2f}×")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
