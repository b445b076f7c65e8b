#!/usr/bin/env python3
"""Does ``torch.compile`` (CPU inductor) of the UNet pay back within an ASPL run? Issue 16 §1.

The step measured is ASPL's DreamBooth step on ``mid-sd`` at 128 px: the UNet's forward and backward with
weight gradients on 2 latents (an instance and a class image), as ``DreamBoothTrainer.step`` runs it.
Printed: eager s/step (median), compile + first step (cold cache, in a fresh inductor cache folder unless
``--cache`` names one), compiled s/step (median), the largest differences of the output and of the weight
gradients against eager (``torch.equal`` says whether they are bytes-equal), and the steps a run needs
before the compile has paid for itself. A published ASPL run (50 iterations × 6 DreamBooth steps) has 300
such steps; its PGD steps (4 images, no weight gradients) would need graphs of their own on top.

    python benchmarks/bench_compile.py                  # mid-sd, 3 timed steps each, 2 threads
    python benchmarks/bench_compile.py --steps 5 --threads 2 --cache /tmp/inductor-warm

Run it on an idle machine: wall-clock figures taken while other processes compete are not valid.
Seen on the shared 2-core machine under load 7–12 (not valid figures): the cold compile did not finish
within 23 min on mid-sd (eager step ~11.5 s under the same load) nor within 14 min on tiny-sd.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mid-sd")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None, help="inductor cache folder (default: a fresh one: cold compile)")
    parser.add_argument("--bench-cache", default=None, help="cloak's model cache (default: the benchmarks')")
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache or tempfile.mkdtemp(prefix="cloak-inductor-")
    import torch

    from _harness import DEFAULT_CACHE

    from cloak.models.handle import Models

    torch.set_num_threads(args.threads)
    sd = Models(cache_dir=Path(args.bench_cache or DEFAULT_CACHE), device=torch.device("cpu")).sd(args.model)
    unet = copy.deepcopy(sd.unet)
    unet.requires_grad_(True)
    unet.train()
    gen = torch.Generator().manual_seed(0)
    size = sd.resolution // sd.vae_scale_factor
    z = torch.randn(2, unet.config.in_channels, size, size, generator=gen)
    t = torch.tensor([10, 900])
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    params = list(unet.parameters())

    def step(module):
        for p in params:
            p.grad = None
        out = module(z, t, text).sample
        out.float().pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in params]

    def timed(module, n):
        times, result = [], None
        for _ in range(n):
            start = time.perf_counter()
            result = step(module)
            times.append(time.perf_counter() - start)
        return times, result

    step(unet)  # warm-up
    compiled = torch.compile(unet)
    start = time.perf_counter()
    try:
        step(compiled)
    except Exception as exc:  # noqa: BLE001 — a failed compile is a result here
        print(f"torch.compile failed: {type(exc).__name__}: {exc}")
        return 1
    first = time.perf_counter() - start
    eager_times, compiled_times = [], []
    for _ in range(args.steps):  # alternate, so a change of load hits both sides
        e, eager_out = timed(unet, 1)
        c, compiled_out = timed(compiled, 1)
        eager_times += e
        compiled_times += c
    eager, fast = statistics.median(eager_times), statistics.median(compiled_times)
    out_diff = (eager_out[0] - compiled_out[0]).abs().max().item()
    grad_diff = max((a - b).abs().max().item() for a, b in zip(eager_out[1], compiled_out[1]))
    equal = torch.equal(eager_out[0], compiled_out[0]) and all(
        torch.equal(a, b) for a, b in zip(eager_out[1], compiled_out[1]))
    print(f"UNet DreamBooth step on {args.model} (2 latents of {size}x{size}), {args.threads} threads, "
          f"inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    print(f"eager            {eager:8.3f} s/step  {[round(x, 3) for x in eager_times]}")
    print(f"compiled         {fast:8.3f} s/step  {[round(x, 3) for x in compiled_times]}")
    print(f"compile + first  {first:8.1f} s")
    print(f"output max |diff| {out_diff:.3g}, weight-gradient max |diff| {grad_diff:.3g}, bytes equal: {equal}")
    if fast < eager:
        print(f"pays back after {(first - fast) / (eager - fast):.0f} steps (ASPL default run: 300 DreamBooth steps)")
    else:
        print("compiled is not faster: never pays back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
