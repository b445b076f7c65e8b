#!/usr/bin/env python3
"""DLADiff and CAP speed and memory: seconds per epoch / step and peak memory, on a random-weight model.

Each variant runs in its own process (so its peak memory — ru_maxrss on CPU, max_memory_allocated on CUDA —
is its own) through the real ``run_protect`` path; a progress recorder timestamps every ``advance`` of the
method's bars, so the figures are per epoch / per step of the method's own loop, first one dropped (warm-up).

Variants (default model ``mid-sd``, 128 px, 4 images):
  dladiff-ft   layer 1: one epoch = 3 attention-PGD steps on the static surrogate (explicit attention on the
               recorded layers) + 3 dynamic-surrogate DreamBooth steps + 3 PGD steps on the dynamic surrogate
  dladiff-zs   layer 2: one PGD step through ArcFace IR-SE50 and the CLIP image encoder (stand-ins: the
               ArcFace stand-in has the real architecture, the CLIP one is toy width — ViT-H/14 costs more)
  aspl         the host alone: one iteration = 3 DreamBooth + 6 PGD + 3 DreamBooth steps
  cap-aspl     CAP on ASPL with CAP active from the first step (start_fraction 0), R = 100: the ratio to
               ``aspl`` is CAP's cost per host iteration (2 backward passes + up to R+1 candidate forwards
               per PGD step; identical sign patterns are evaluated once)

    OMP_NUM_THREADS=1 python benchmarks/bench_seed.py [--model mid-sd] [--images 4] [--epochs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "dladiff-ft": ("dladiff", "dladiff layer 1", {"layers": "ft", "static_steps": 4}),
    "dladiff-zs": ("dladiff", "dladiff layer 2", {"layers": "zs"}),
    "aspl": ("aspl", "aspl", {}),
    "cap-aspl": ("cap", "cap+aspl", {"host": "aspl", "start_fraction": 0, "ratio_max": 100}),
}


class _Recorder:
    """A Progress whose tasks keep the time of every advance."""

    def __init__(self):
        self.stamps: dict[str, list[float]] = {}

    def task(self, description: str, total):
        stamps = self.stamps.setdefault(description, [time.perf_counter()])

        class _Task:
            def advance(self, n: int = 1, status: str | None = None) -> None:
                stamps.append(time.perf_counter())

            def close(self) -> None:
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        return _Task()


def run_variant(name: str, model: str, n_images: int, count: int, cache: str) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from cloak.api import Common, run_protect

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    method, bar, opts = VARIANTS[name]
    opts = dict(opts)
    if method == "dladiff":
        opts.update({"epochs": count, "zs_steps": count})
    else:
        opts.update({"iterations": count})
    opts.update({"class_images": 2, "class_image_steps": 2})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n_images):
            low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
            Image.fromarray(low).resize((256, 256), Image.BICUBIC).save(folder / f"img{i}.png")
        progress = _Recorder()
        started = time.perf_counter()
        run_protect(folder, Path(tmp) / "out", common=Common(
            method=method, model=model, tiny=True, seed=0, device=device, cache_dir=cache, argv=[],
            options={k: str(v) for k, v in opts.items()}, progress=progress))
        total = time.perf_counter() - started
    stamps = progress.stamps.get(bar, [])
    per = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # drop the first (warm-up)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": name, "model": model, "device": device, "images": n_images, "unit": _unit(name),
            "count": count, "seconds_per_unit": sum(per) / len(per) if per else None,
            "seconds_per_unit_all": [round(p, 3) for p in per], "run_seconds": round(total, 2),
            "peak_mib": round(peak, 1)}


def _unit(name: str) -> str:
    return {"dladiff-ft": "epoch", "dladiff-zs": "PGD step", "aspl": "iteration", "cap-aspl": "iteration"}[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mid-sd")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3, help="epochs / steps / iterations per variant (first dropped)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cache", default=os.environ.get("CLOAK_CACHE_DIR", str(Path(tempfile.gettempdir()) /
                                                                             "cloak-bench-cache")))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.model, args.images, args.epochs, args.cache)))
        return
    rows = []
    for name in args.variants.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--images", str(args.images),
               "--epochs", str(args.epochs), "--cache", args.cache]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {r["variant"]: r for r in rows}
    ratio = None
    if "aspl" in by and "cap-aspl" in by and by["aspl"]["seconds_per_unit"]:
        ratio = by["cap-aspl"]["seconds_per_unit"] / by["aspl"]["seconds_per_unit"]
    result = {"rows": rows, "cap_over_host_per_iteration": ratio, "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"model {args.model}, {args.images} images, load average {result['load_avg'][0]:.1f}")
    for r in rows:
        s = r["seconds_per_unit"]
        print(f"  {r['variant']:<11} {s if s is None else round(s, 3):>8} s per {r['unit']:<9} "
              f"peak {r['peak_mib']:.0f} MiB ({r['device']})")
    if ratio:
        print(f"  CAP on ASPL costs {ratio:.2f}× the host per iteration (R = 100, CAP on every step)")


if __name__ == "__main__":
    main()
