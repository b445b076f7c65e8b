#!/usr/bin/env bash
# ASPL on one GPU at real size (issue 16 §5): the random sd21-shaped model (exact SD 2.1-base tensor shapes),
# 4 images at 512², 4 class images from a folder (nothing is sampled, nothing is downloaded), 2 outer
# iterations of the published schedule (3 DreamBooth + 6 PGD + 3 DreamBooth steps), in three modes:
#
#   fp32   fp32 weights, autocast switched off (every op in fp32)
#   bf16   cloak's CUDA default: fp32 master weights, compute under bf16 autocast
#   low    the low-memory tier, `--memory low` (skipped cleanly when this build's CLI has no such flag)
#   bf16w, low-bf16w   the same with bf16 weights (`--dtype bf16`); not in the default MODES
#
# Each mode runs `cloak protect --method aspl` in its own process (so peak VRAM is its own) and prints:
# seconds per outer iteration (the second iteration; the first pays for lazy allocations and is where the
# FLOPs are counted), peak VRAM (torch.cuda.max_memory_allocated), TFLOP/s (FLOPs of one outer iteration
# counted with torch.utils.flop_counter's formulas ÷ s/iteration) against the device's dense bf16 peak
# (from a table of known devices; a measured bf16 GEMM figure is printed beside it).
#
#   bash benchmarks/gpu_check.sh            # ≈ 2–4 min on one H100/H200-class GPU, ≤ 5 min budgeted
#   MODES="bf16 low" bash benchmarks/gpu_check.sh
#   GPU_CHECK_PROFILE=/some/dir bash benchmarks/gpu_check.sh   # + torch.profiler tables of the 2nd iteration
#                                                             # per mode there (a 3rd iteration is timed)
#
# Needs: the venv's python (PYTHON=...), a CUDA device. The model folder is built once into the cache.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
MODES="${MODES:-fp32 bf16 low}"
export HF_HUB_OFFLINE=1
export CLOAK_CACHE_DIR="${CLOAK_CACHE_DIR:-${TMPDIR:-/tmp}/cloak-gpu-check-cache}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cloak-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

cat > "$WORK/driver.py" <<'EOF'
"""One mode of the GPU check: runs the CLI in this process, times each ASPL outer iteration, prints one JSON row."""
import json
import os
import sys
import time

import torch


def flop_counter():
    # torch's FLOP formulas without FlopCounterMode's module tracker (its hooks refuse autograd.grad on a leaf).
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    registry = FlopCounterMode(display=False).flop_registry

    class FlopCount(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            count = registry.get(func._overloadpacket)
            if count is not None:
                self.total += count(*args, **kwargs, out_val=out)
            return out

    return FlopCount()


def main(mode, images, classes, out):
    if mode == "fp32":  # every torch.autocast cloak (or diffusers) opens becomes a disabled one
        real = torch.autocast

        def no_autocast(device_type, *a, **kw):
            kw["enabled"] = False
            return real(device_type, *a, **kw)

        torch.autocast = no_autocast
    from cloak.cli import main as cli
    from cloak.protect.aspl import Aspl

    times, flops = [], []
    inner = Aspl.iteration

    profile_dir = os.environ.get("GPU_CHECK_PROFILE")

    def timed(self, *a, **kw):
        counter = flop_counter() if not times else None
        profiling = profile_dir and len(times) == 1  # the second iteration; the third is the timed one then
        torch.cuda.synchronize()
        start = time.perf_counter()
        if counter is not None:
            with counter:
                result = inner(self, *a, **kw)
            flops.append(counter.total)
        elif profiling:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                result = inner(self, *a, **kw)
                torch.cuda.synchronize()
            table = prof.key_averages()
            with open(os.path.join(profile_dir, f"profile-{mode}.txt"), "w") as fh:
                for key in ("self_cuda_time_total", "self_cpu_time_total"):
                    fh.write(f"--- top 30 by {key}\n{table.table(sort_by=key, row_limit=30)}\n")
        else:
            result = inner(self, *a, **kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        return result

    Aspl.iteration = timed
    torch.cuda.reset_peak_memory_stats()
    args = ["protect", "--method", "aspl", "--model", "sd21-shaped", "--device", "cuda", "--fit", "crop",
            "--class-dir", classes, "-o", f"iterations={3 if profile_dir else 2}", "-o", "class_images=4",
            "-o", "surrogate_steps=3",
            "-o", "pgd_steps=6", "-q", images, out]
    if mode in ("low", "low-bf16w"):
        args[1:1] = ["--memory", "low"]
    if mode.endswith("bf16w"):  # bf16 weights (--dtype bf16): the trained copies' masters stay fp32
        args[1:1] = ["--dtype", "bf16"]
    rc = cli(args)
    if rc != 0 or len(times) < 2:
        print(json.dumps({"mode": mode, "error": f"exit code {rc}, {len(times)} iteration(s) timed"}))
        return 1
    print(json.dumps({"mode": mode, "s_per_iteration": times[-1], "first_iteration_s": times[0],
                      "flops_per_iteration": flops[0] if flops else None,
                      "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30}))
    return 0


def probe():
    """Device name, table bf16 peak (dense, TFLOP/s) and a measured bf16 GEMM figure."""
    name = torch.cuda.get_device_name()
    table = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0,
             "L40S": 362.0, "L40": 181.0, "A10": 125.0, "L4": 121.0, "4090": 165.0, "3090": 71.0, "A6000": 155.0}
    peak = next((v for k, v in table.items() if k in name), None)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    measured = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    print(json.dumps({"device": name, "table_bf16_tflops": peak, "measured_bf16_gemm_tflops": measured}))


def build():
    """Build (once) the sd21-shaped folder and the 512² inputs: random PNGs, nothing downloaded."""
    import os
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from cloak.models.handle import Models

    # resolving the built-in id writes its random-weight folder on first use
    Models(cache_dir=Path(os.environ["CLOAK_CACHE_DIR"])).resolve("sd21-shaped", "gpu-check")
    rng = np.random.default_rng(0)
    for folder in sys.argv[2:4]:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            low = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
            Image.fromarray(low).resize((512, 512), Image.BICUBIC).save(Path(folder) / f"{i:02d}.png")


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        probe()
    elif sys.argv[1] == "build":
        build()
    else:
        sys.exit(main(*sys.argv[1:5]))
EOF

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
echo "gpu_check: building sd21-shaped (once) and the inputs ..." >&2
"$PYTHON" "$WORK/driver.py" build "$WORK/images" "$WORK/class"
"$PYTHON" "$WORK/driver.py" probe > "$WORK/probe.json"

HAS_MEMORY_FLAG=0
# The help goes to a variable first: `--help | grep -q` under pipefail fails when grep stops reading early.
PROTECT_HELP="$(COLUMNS=200 "$PYTHON" -m cloak protect --help 2>/dev/null || true)"
if grep -q -- "--memory" <<< "$PROTECT_HELP"; then HAS_MEMORY_FLAG=1; fi

: > "$WORK/rows.jsonl"
for mode in $MODES; do
  if [ "${mode#low}" != "$mode" ] && [ "$HAS_MEMORY_FLAG" = 0 ]; then
    echo "{\"mode\": \"$mode\", \"skipped\": \"this build's 'cloak protect' has no --memory flag\"}" >> "$WORK/rows.jsonl"
    continue
  fi
  echo "gpu_check: mode $mode ..." >&2
  if ! timeout 240 "$PYTHON" "$WORK/driver.py" "$mode" "$WORK/images" "$WORK/class" "$WORK/out-$mode" \
      > "$WORK/$mode.out" 2> "$WORK/$mode.err"; then
    tail -n 3 "$WORK/$mode.err" >&2 || true
  fi
  last="$(tail -n 1 "$WORK/$mode.out" 2>/dev/null || true)"
  if [ -z "$last" ]; then
    last="{\"mode\": \"$mode\", \"error\": \"no result (timed out or crashed; see the lines above)\"}"
  fi
  echo "$last" >> "$WORK/rows.jsonl"
done

"$PYTHON" - "$WORK/probe.json" "$WORK/rows.jsonl" <<'EOF'
import json
import sys

probe = json.load(open(sys.argv[1]))
rows = [json.loads(line) for line in open(sys.argv[2]) if line.strip()]
peak = probe["table_bf16_tflops"]
print(f"device: {probe['device']}; dense bf16 peak {peak if peak else 'unknown'} TFLOP/s (table), "
      f"measured bf16 GEMM {probe['measured_bf16_gemm_tflops']:.0f} TFLOP/s")
print("ASPL, sd21-shaped, 4 images at 512², 4 class images, 3 DB + 6 PGD + 3 DB steps per outer iteration")
print(f"{'mode':<10} {'s/iteration':>12} {'peak VRAM GiB':>14} {'TFLOP/it':>9} {'TFLOP/s':>9} {'of bf16 peak':>13}")
flops = next((r.get("flops_per_iteration") for r in rows if r.get("flops_per_iteration")), None)
for r in rows:
    if "skipped" in r or "error" in r:
        print(f"{r['mode']:<10} {r.get('skipped') or r.get('error')}")
        continue
    f = r.get("flops_per_iteration") or flops
    tflops = f / r["s_per_iteration"] / 1e12 if f else None
    share = f"{tflops / peak:13.1%}" if tflops and peak else f"{'-':>13}"
    print(f"{r['mode']:<10} {r['s_per_iteration']:>12.2f} {r['peak_vram_gib']:>14.2f} "
          f"{(f or float('nan')) / 1e12:>9.2f} {tflops if tflops is not None else float('nan'):>9.1f} {share}")
print("TFLOP/it: FLOPs of one outer iteration, counted in each mode's first (the low tier's checkpointing recomputes)")
EOF
