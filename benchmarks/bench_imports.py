#!/usr/bin/env python3
"""Import cost of a run's model libraries, with cloak's lazy diffusers packages and with the plain import.

Each round starts two fresh interpreters, alternating: one imports what ``Models.sd`` and the class-image
pipeline import (torch, ``UNet2DConditionModel``, ``AutoencoderKL``, the schedulers,
``StableDiffusionPipeline``, ``CLIPTextModel``/``CLIPTokenizer``) after ``import cloak`` as a run does (lazy:
cloak/_lazy_imports.py, scipy.stats run on first read, the collector paused and the objects frozen), the
other the same with ``CLOAK_EAGER_IMPORTS=1`` and the collector on (the plain imports). Printed per mode:
modules loaded and garbage collections run (load-independent), whether scipy.stats's code ran, and the
median wall and CPU (user+sys) seconds of the imports, the interpreter's start included. Wall and CPU
depend on the machine's load; run it idle, and read the ratio of alternating runs when it is not.

    python benchmarks/bench_imports.py             # 5 rounds
    python benchmarks/bench_imports.py --rounds 9 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import contextlib, gc, os, resource, sys, json
import cloak
from cloak._lazy_imports import library_imports
# lazy: as a run imports (Models.sd: collector paused, then frozen); eager: the plain imports, collector on
paused = library_imports("models") if os.environ["CLOAK_EAGER_IMPORTS"] == "0" else contextlib.nullcontext()
with paused:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
usage = resource.getrusage(resource.RUSAGE_SELF)
lazy = getattr(sys.modules.get("diffusers.models.transformers"), "__cloak_lazy__", False)
print(json.dumps({"modules": len(sys.modules), "cpu_s": usage.ru_utime + usage.ru_stime, "lazy": lazy,
                  "collections": [g["collections"] for g in gc.get_stats()],
                  "scipy_stats_ran": "scipy.stats._stats_py" in sys.modules}))
"""


def _once(eager: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CLOAK_EAGER_IMPORTS": "1" if eager else "0"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"lazy": [], "eager": []}
    for _ in range(args.rounds):
        for mode in ("eager", "lazy"):
            runs[mode].append(_once(mode == "eager"))
    summary = {}
    for mode, rows in runs.items():
        summary[mode] = {"modules": rows[-1]["modules"], "lazy_applied": rows[-1]["lazy"],
                         "gc_collections": rows[-1]["collections"], "scipy_stats_ran": rows[-1]["scipy_stats_ran"],
                         "wall_s_median": round(statistics.median(r["wall_s"] for r in rows), 2),
                         "cpu_s_median": round(statistics.median(r["cpu_s"] for r in rows), 2),
                         "wall_s": [round(r["wall_s"], 2) for r in rows]}
    ratio = summary["lazy"]["wall_s_median"] / summary["eager"]["wall_s_median"]
    summary["wall_ratio_lazy_over_eager"] = round(ratio, 3)
    summary["load_avg_1m"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for mode in ("eager", "lazy"):
        s = summary[mode]
        print(f"{mode:6s} modules {s['modules']:5d}   wall median {s['wall_s_median']:6.2f} s   "
              f"cpu median {s['cpu_s_median']:6.2f} s   (lazy applied: {s['lazy_applied']})   "
              f"gc collections young/middle/full {'/'.join(map(str, s['gc_collections']))}   "
              f"scipy.stats ran: {s['scipy_stats_ran']}")
    print(f"lazy/eager wall {summary['wall_ratio_lazy_over_eager']:.3f}   load average {summary['load_avg_1m']:.1f}")


if __name__ == "__main__":
    main()
