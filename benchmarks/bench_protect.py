#!/usr/bin/env python3
"""Fine-tuning-family protections (aspl, E-ASPL, fsmg, simac, metacloak, caat): seconds per outer iteration
and peak memory, and CAAT's time per image and peak memory against ASPL's.

Each method runs in its own process so that its peak memory is its own: on CPU the peak RSS
(ru_maxrss) minus the RSS after importing torch/diffusers/transformers, so it counts the loaded
weights, the surrogate copies, optimizer state, snapshot buffers and activations; on CUDA
max_memory_allocated. The method classes run as `cloak protect` runs them, with the published inner
step counts (n = 3 DreamBooth steps, K = 6 PGD steps, MetaCloak 6 PGD + 2 DreamBooth steps per round)
and few outer iterations. A progress hook timestamps every advance of every bar; the first interval
of each bar is dropped as warm-up and the median of the rest is reported.

What "outer iteration" means per method:
  aspl          one ASPL iteration: n DB steps (learner) + K PGD steps + n DB steps (surrogate)
  aspl-pgd-batch-1  the same with -o pgd_batch=1: one image per UNet pass in the PGD steps (memory bound)
  aspl-ensemble one E-ASPL iteration over 3 models (here the same model three times: the per-model
                buffers and the averaging are exercised, the weights are the same); measured per model
                and multiplied by 3
  fsmg          one PGD step against the cached surrogate (FSMG has no outer loop); its surrogate
                DreamBooth step is reported separately
  simac         one ASPL iteration with SimAC's timestep draws and feature term; a timestep-selection
                round is reported separately
  metacloak     one unrolled round: K PGD steps through the EoT transforms + 2 DB steps; a pool
                DreamBooth step is reported separately
  cap-seq       one CAP PGD step on FSMG (k̂ = 0, R = 20): the line search with one UNet pass per candidate
                (-o cap_batch=1, the old path)
  cap-batched   the same with every candidate of a step in one pass (-o cap_batch=0); same draws, same λ.
                Both print the candidates evaluated and the line search's UNet passes (load-independent)
                (seen, tiny-sd, 4 images, published R = 100, 4 CAP steps: 401 candidates, i.e. 401 line-search
                UNet passes at cap_batch=1, 52 at the default 8, 4 at 0 — nearly every r is a distinct point)
  dladiff       one DLADiff layer-1 epoch (3 attention PGD steps + 3 DB steps + 3 PGD steps), whole set per pass
  dladiff-pgd-batch-1  the same with -o pgd_batch=1: one image per UNet pass in both PGD loops
  caat          one joint step: one forward + backward pass of the set, a PGD step on the images and an
                AdamW step on the cross-attention K/V weights (CAAT has no outer loop)

With both aspl and caat in the run, a last line compares them over their published runs (ASPL 50
iterations, CAAT 250 steps, read from the Options defaults): seconds per image (wall clock: valid on an
idle machine only) and peak memory.
Seen on a loaded 2-core CPU (load 9–13: the seconds are not valid): tiny-sd, 2 images, 64 px — peak RSS
above the imports caat 198 MB vs aspl 241 MB (×0.82).

    python benchmarks/bench_protect.py                        # mid-sd (128 px), 4 images
    python benchmarks/bench_protect.py --model tiny-sd --json
    python benchmarks/bench_protect.py --methods cap-seq cap-batched dladiff dladiff-pgd-batch-1   # issue 16 §4
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

CLASS = {"class_images": 2, "class_image_steps": 2}  # 1 instance + 1 class image per DB step, cheap to make
METHODS = {  # name → (registry name, options, outer bar, other bars worth reporting)
    "aspl": ("aspl", {"iterations": 2, "surrogate_steps": 3, "pgd_steps": 6}, "aspl", []),
    "aspl-pgd-batch-1": ("aspl", {"iterations": 2, "surrogate_steps": 3, "pgd_steps": 6, "pgd_batch": 1}, "aspl", []),
    "aspl-ensemble": ("aspl", {"iterations": 1, "surrogate_steps": 3, "pgd_steps": 6, "models": "{m},{m},{m}"},
                      "aspl ensemble", []),
    "fsmg": ("fsmg", {"surrogate_steps": 4, "steps": 6}, "fsmg", ["surrogate dreambooth"]),
    "simac": ("simac", {"iterations": 2, "surrogate_steps": 3, "pgd_steps": 6, "select_rounds": 2}, "simac",
              ["simac timestep selection"]),
    "metacloak": ("metacloak", {"trials": 1, "pool_steps": 4, "snapshot_interval": 2, "advance_steps": 2,
                                "pgd_steps": 6}, "metacloak", ["metacloak pool"]),
    "cap-seq": ("cap", {"host": "fsmg", "surrogate_steps": 4, "steps": 4, "ratio_max": 20, "start_fraction": 0,
                        "cap_batch": 1}, "cap+fsmg", []),
    "cap-batched": ("cap", {"host": "fsmg", "surrogate_steps": 4, "steps": 4, "ratio_max": 20, "start_fraction": 0,
                            "cap_batch": 0}, "cap+fsmg", []),
    "dladiff": ("dladiff", {"layers": "ft", "epochs": 3, "attention_steps": 3, "surrogate_steps": 3, "pgd_steps": 3,
                            "static_steps": 4}, "dladiff layer 1", []),
    "dladiff-pgd-batch-1": ("dladiff", {"layers": "ft", "epochs": 3, "attention_steps": 3, "surrogate_steps": 3,
                                        "pgd_steps": 3, "static_steps": 4, "pgd_batch": 1}, "dladiff layer 1", []),
    "caat": ("caat", {"steps": 8, "checkpoint_every": 0}, "caat", []),
}
PAIRS = [("cap-batched", "cap-seq"), ("aspl", "aspl-pgd-batch-1"), ("dladiff", "dladiff-pgd-batch-1")]


class _Clock:
    """A progress sink that records, per bar, when each advance happens."""

    sync = None

    def __init__(self):
        self.bars: dict[str, list[float]] = {}

    def task(self, description, total):
        clock = self
        times = clock.bars.setdefault(description, [])

        class Task:
            def advance(self, n=1, status=None):
                if clock.sync is not None:
                    clock.sync()
                times.append(time.perf_counter())

            def __enter__(self):
                if clock.sync is not None:
                    clock.sync()
                times.append(time.perf_counter())
                return self

            def __exit__(self, *exc):
                return None

            def close(self):  # class_images closes its bar early
                return None

        return Task()

    def median(self, prefix: str) -> float | None:
        """Median interval of the bar named ``prefix`` (exactly, else the first that starts with it)."""
        names = [n for n in self.bars if n == prefix] or [n for n in self.bars if n.startswith(prefix)]
        if not names:
            return None
        times = self.bars[names[0]]
        intervals = [b - a for a, b in zip(times, times[1:])]
        if not intervals:
            return None
        return statistics.median(intervals[1:] if len(intervals) > 1 else intervals)


def run_method(model_id: str, name: str, n_images: int, cache: str) -> dict:
    import diffusers  # noqa: F401  (imported before measuring the baseline RSS)
    import torch
    import transformers  # noqa: F401

    from cloak.methods import build_options
    from cloak.protect import PROTECT

    imports_mb = rss_mib()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method_name, extra, outer, others = METHODS[name]
    extra = {k: (v.format(m=model_id) if isinstance(v, str) else v) for k, v in extra.items()}
    cls = PROTECT.get(method_name)
    class_opts = {k: v for k, v in CLASS.items() if k in cls.Options.model_fields}  # caat has no class images
    opts, _ = build_options(cls.Options, [("bench", {**class_opts, **extra})], method_name)
    clock = _Clock()
    if device.type == "cuda":
        clock.sync = torch.cuda.synchronize
    images, ctx = random_protect_run(model_id, n_images, cache, device, clock)
    res = ctx.resolution
    if method_name == "cap":  # CAP's VGG-19: its random stand-in (built-in diffusion models stay as they are)
        ctx.models.tiny = True
    method = cls(opts, ctx)
    start = time.perf_counter()
    result = method(images)
    total = time.perf_counter() - start
    peak = peak_mib(device, imports_mb)
    outer_s = clock.median(outer)
    if outer_s is not None and name == "aspl-ensemble":
        outer_s *= len(opts.models)  # the ensemble bar advances once per model
    row = {"model": model_id, "method": name, "images": n_images, "resolution": res, "device": str(device),
           "outer_s": outer_s, "run_s": total, "peak_mb": peak, "pgd_steps": getattr(method, "pgd_steps_done", None),
           "options": extra}
    cap = result.summary.get("cap")
    if cap is not None:  # the line search's cost in UNet passes, whatever the machine's load
        row.update(cap_steps=cap["cap_steps"], candidates=cap["candidates_evaluated"],
                   line_search_passes=cap["candidate_loss_passes"])
    for bar in others:
        row[bar.replace(" ", "_") + "_s"] = clock.median(bar)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mid-sd")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_method(args.model, args._child, args.images, args.cache)))
        return 0
    rows = []
    load_before = os.getloadavg()[0]
    for name in args.methods:
        rows.append(run_child(__file__, ["--_child", name, "--model", args.model, "--images", args.images,
                                         "--cache", args.cache]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"model {args.model}, {args.images} images, {rows[0]['resolution']} px, device {rows[0]['device']}, "
          f"load average {load_before:.1f} → {os.getloadavg()[0]:.1f}")
    print(f"{'method':<17} {'s/outer iter':>12} {'peak MB':>9}  other")
    for r in rows:
        other = ", ".join(f"{k[:-2].replace('_', ' ')} {v:.3f} s" for k, v in r.items()
                          if k.endswith("_s") and k not in ("outer_s", "run_s") and v is not None)
        outer = f"{r['outer_s']:.3f}" if r["outer_s"] is not None else "n/a"
        if "line_search_passes" in r:
            other = ", ".join(filter(None, [other, f"{r['cap_steps']} CAP steps: {r['candidates']} candidates in "
                                                   f"{r['line_search_passes']} UNet passes"]))
        print(f"{r['method']:<17} {outer:>12} {r['peak_mb']:>9.0f}  {other}")
    by_name = {r["method"]: r for r in rows}
    for fast, slow in PAIRS:
        a, b = by_name.get(fast), by_name.get(slow)
        if a and b and a["outer_s"] and b["outer_s"]:
            print(f"{fast} / {slow}: {a['outer_s'] / b['outer_s']:.2f}× the time per step, "
                  f"peak {a['peak_mb']:.0f} vs {b['peak_mb']:.0f} MB")
    if "aspl" in by_name and "caat" in by_name and by_name["aspl"]["outer_s"] and by_name["caat"]["outer_s"]:
        print(caat_vs_aspl(by_name["aspl"], by_name["caat"], args.images))
    return 0


def caat_vs_aspl(aspl: dict, caat: dict, n_images: int) -> str:
    """One line: both methods' published runs (their Options' defaults), time per image and peak memory."""
    from cloak.protect import PROTECT

    iterations, steps = PROTECT.get("aspl").Options().iterations, PROTECT.get("caat").Options().steps
    a, c = aspl["outer_s"] * iterations / n_images, caat["outer_s"] * steps / n_images
    return (f"caat vs aspl, published runs (aspl {iterations} iterations, caat {steps} steps): "
            f"{c:.2f} vs {a:.2f} s per image (×{c / a:.2f}), peak memory {caat['peak_mb']:.0f} vs "
            f"{aspl['peak_mb']:.0f} MB (×{caat['peak_mb'] / aspl['peak_mb']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
