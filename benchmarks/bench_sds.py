#!/usr/bin/env python3
"""SDS(−) against AdvDM: what score distillation saves per PGD step (the point of Xue et al., ICLR 2024).

Both run the same PGD on the same frozen model; SDS drops the UNet's backward pass. Per method, in its own
process (so the peak memory is its own):
  flops_step   floating-point operations of one PGD step of the whole set (torch.utils.flop_counter's formulas;
               (FLOPs of a 3-step run − FLOPs of a 1-step run) / 2, so model loading and prompt encoding
               cancel). Does not depend on the machine's load.
  peak_mb      CUDA max_memory_allocated, or on CPU the peak RSS above the post-import baseline
  step_s       median seconds per PGD step of the set (wall clock: only valid on an idle machine)

    python benchmarks/bench_sds.py                      # mid-sd (128 px), 4 images
    python benchmarks/bench_sds.py --model sd21-shaped  # the real SD 2.1-base shapes, random weights

Seen on a loaded 2-core CPU (wall times there are not valid): mid-sd, 1 image, 128 px — 6.67 vs 4.98 GFLOP per
step (SDS ×0.75), peak RSS 434 vs 368 MB (×0.85); tiny-sd, 2 images, 64 px — ×0.94 FLOPs (its VAE dominates).
At SD's real size the UNet dominates, so the saving should grow toward the UNet's backward share.
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

METHODS = ("advdm", "sds-minus")


class _Clock:
    def __init__(self):
        self.times: list[float] = []
        self.sync = None

    def task(self, description, total):
        clock = self
        clock.times.append(time.perf_counter())

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


def flop_counter():
    """A dispatch mode that adds up torch's FLOP formulas (matmul, conv, attention, …) of every op it sees.

    FlopCounterMode itself tracks modules with backward hooks that torch.autograd.grad (the PGD step) rejects."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    return Counter()


def run_method(model_id: str, method: str, n_images: int, steps: int, cache: str) -> dict:
    import diffusers  # noqa: F401  (imported before the baseline RSS)
    import torch
    import transformers  # noqa: F401

    from cloak.methods import build_options
    from cloak.protect import PROTECT

    imports_mb = rss_mib()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cls = PROTECT.get(method)

    def run(n_steps: int, clock):
        opts, _ = build_options(cls.Options, [("bench", {"steps": n_steps, "batch_size": n_images,
                                                         "random_start": False})], method)
        images, ctx = random_protect_run(model_id, n_images, cache, device, clock)
        cls(opts, ctx)(images)
        return ctx.resolution

    flops = []
    for n in (1, 3):
        counter = flop_counter()
        with counter:
            run(n, _Clock())
        flops.append(counter.total)
    clock = _Clock()
    if device.type == "cuda":
        clock.sync = torch.cuda.synchronize
        torch.cuda.reset_peak_memory_stats()
    resolution = run(steps, clock)
    intervals = [b - a for a, b in zip(clock.times, clock.times[1:])][1:]  # drop the first step (warm-up)
    return {"model": model_id, "method": method, "images": n_images, "resolution": resolution,
            "device": str(device), "flops_step": (flops[1] - flops[0]) / 2,
            "step_s": statistics.median(intervals) if intervals else float("nan"),
            "peak_mb": peak_mib(device, imports_mb)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mid-sd")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_method(args.model, args._child, args.images, args.steps, args.cache)))
        return 0
    rows = {m: run_child(__file__, ["--_child", m, "--model", args.model, "--images", args.images, "--steps",
                                    args.steps, "--cache", args.cache]) for m in METHODS}
    if args.json:
        print(json.dumps(list(rows.values()), indent=2))
        return 0
    first = rows[METHODS[0]]
    print(f"model {args.model}, {args.images} images, {first['resolution']} px, device {first['device']}, "
          f"load average {os.getloadavg()[0]:.1f} (step_s is wall clock: valid on an idle machine only)")
    print(f"{'method':<10} {'GFLOP/step':>11} {'s/step':>8} {'peak MB':>9}")
    for r in rows.values():
        print(f"{r['method']:<10} {r['flops_step'] / 1e9:>11.2f} {r['step_s']:>8.4f} {r['peak_mb']:>9.0f}")
    a, s = rows["advdm"], rows["sds-minus"]
    print(f"sds vs advdm: FLOPs ×{s['flops_step'] / a['flops_step']:.2f}, time ×{s['step_s'] / a['step_s']:.2f}, "
          f"peak memory ×{s['peak_mb'] / a['peak_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
