#!/usr/bin/env python3
"""Fixed-model protections (advdm, photoguard, mist): seconds per PGD step and peak memory.

Each (method, variant) runs in its own process so that its peak memory is its own: on CPU the
peak RSS (ru_maxrss) minus the RSS after importing torch/diffusers/transformers, so it counts the
loaded weights and the activations; on CUDA max_memory_allocated. The method classes run as
`cloak protect` runs them; a progress hook timestamps every PGD step, the first step of each batch
is dropped as warm-up, and the median of the rest is reported.

Variants, measured in the same run:
  batched    cloak's default: the set goes through the model ``batch_size`` (4) images at a time
  per-image  the straightforward baseline: one image per forward pass (batch_size=1), as the
             released Mist / PhotoGuard code does

Figures: ``set_step_s`` = seconds for one PGD step of the whole set (for per-image: the sum over
the images), ``image_step_s`` = that divided by the number of images.

    python benchmarks/bench_protect_fixed.py                       # mid-sd (128 px), 4 images
    python benchmarks/bench_protect_fixed.py --model tiny-sd --steps 4 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _harness import DEFAULT_CACHE, peak_mib, random_protect_run, rss_mib, run_child  # noqa: E402

METHODS = {  # name → (registry name, extra options)
    "advdm": ("advdm", {}),
    "photoguard": ("photoguard", {}),
    "mist-fused": ("mist", {"mode": "fused"}),
    "mist-textural": ("mist", {"mode": "textural"}),
}


class _Clock:
    """A progress sink that records when each step ends."""

    def __init__(self):
        self.times: list[float] = [time.perf_counter()]

    def task(self, description, total):
        clock = self

        class Task:
            def advance(self, n=1, status=None):
                if clock.sync is not None:
                    clock.sync()
                clock.times.append(time.perf_counter())

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return None

        return Task()

    sync = None


def run_variant(model_id: str, name: str, variant: str, n_images: int, steps: int, cache: str) -> dict:
    import diffusers  # noqa: F401  (imported before measuring the baseline RSS)
    import torch
    import transformers  # noqa: F401

    from cloak.methods import build_options
    from cloak.protect import PROTECT

    # Peak RSS after the imports: the interpreter + torch + diffusers, before any weights (CPU figure).
    imports_mb = rss_mib()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method_name, extra = METHODS[name]
    cls = PROTECT.get(method_name)
    batch = n_images if variant == "batched" else 1
    opts, _ = build_options(cls.Options, [("bench", {**extra, "steps": steps, "batch_size": batch})], method_name)
    clock = _Clock()
    if device.type == "cuda":
        clock.sync = torch.cuda.synchronize
    images, ctx = random_protect_run(model_id, n_images, cache, device, clock)  # loads no weights
    res = ctx.resolution
    start = time.perf_counter()
    cls(opts, ctx)(images)
    total = time.perf_counter() - start
    # Intervals per batch: drop the first step of each batch (set-up, first-call overheads).
    intervals = [b - a for a, b in zip(clock.times, clock.times[1:])]
    per_batch = [intervals[i:i + steps] for i in range(0, len(intervals), steps)]
    step_s = statistics.median(x for chunk in per_batch for x in chunk[1:])
    set_step_s = step_s * len(per_batch)
    peak = peak_mib(device, imports_mb)
    return {"model": model_id, "method": name, "variant": variant, "images": n_images, "batch_size": batch,
            "resolution": res, "device": str(device), "steps": steps, "set_step_s": set_step_s,
            "image_step_s": set_step_s / n_images, "run_s": total, "peak_mb": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mid-sd")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        row = run_variant(args.model, args._child[0], args._child[1], args.images, args.steps, args.cache)
        print(json.dumps(row))
        return 0
    rows = []
    for name in args.methods:
        for variant in ("per-image", "batched"):
            rows.append(run_child(__file__, ["--_child", name, variant, "--model", args.model, "--images",
                                             args.images, "--steps", args.steps, "--cache", args.cache]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"model {args.model}, {args.images} images, {rows[0]['resolution']} px, device {rows[0]['device']}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'method':<14} {'variant':<10} {'s/step (set)':>12} {'s/step/image':>13} {'peak MB':>9}")
    for r in rows:
        print(f"{r['method']:<14} {r['variant']:<10} {r['set_step_s']:>12.4f} {r['image_step_s']:>13.4f} "
              f"{r['peak_mb']:>9.0f}")
    print("\nbatched vs per-image (same run): speed-up, peak-memory ratio")
    for name in args.methods:
        base = next(r for r in rows if r["method"] == name and r["variant"] == "per-image")
        ours = next(r for r in rows if r["method"] == name and r["variant"] == "batched")
        print(f"  {name}: ×{base['set_step_s'] / ours['set_step_s']:.2f} faster, "
              f"memory ×{ours['peak_mb'] / base['peak_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
