#!/usr/bin/env python3
"""Native-size protect: seconds and peak memory for a 12-megapixel photo, and for 4 mixed shapes against
4 squares of the same pixel counts (issue 13).

Each variant is one ``cloak protect`` run (the library call behind the CLI, same pipeline) in its own
process, so its peak RSS is its own: reported as the process's peak RSS and as the peak above the RSS
after the heavy imports (weights, working copies, the native-size resampling and the PNG encode). The
12 MP run shows that the native-size part (read, resample δ, add, round, write) stays on the CPU and
bounded: the working copy is small whatever the photo's size.

    python benchmarks/bench_native.py                       # tiny-sd, --effort 0.02, photoguard and aspl
    python benchmarks/bench_native.py --methods photoguard --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _harness import DEFAULT_CACHE, rss_mib, run_child  # noqa: E402

MIXED = [(1200, 800), (800, 1200), (1000, 1000), (1600, 600)]  # landscape, portrait, square, panorama
TWELVE_MP = (4240, 2832)  # 12.0 megapixels, a 3:2 camera frame


def _photo(path: Path, size: tuple[int, int], seed: int) -> None:
    """A smooth random photo-like image (low-frequency colour field plus grain), saved as JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.uniform(0, 255, size=(6, 6, 3)).astype(np.uint8)).resize(size, Image.BICUBIC)
    arr = np.asarray(low).astype(np.int16) + rng.integers(-6, 7, size=(size[1], size[0], 3), dtype=np.int16)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=92)


def make_inputs(root: Path) -> dict[str, Path]:
    sets = {"12mp": [TWELVE_MP], "mixed4": MIXED,
            "squares4": [(round(math.sqrt(w * h)),) * 2 for w, h in MIXED]}
    folders = {}
    for name, sizes in sets.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, size in enumerate(sizes):
            _photo(folder / f"img{i}.jpg", size, seed=i)
        folders[name] = folder
    return folders


def child(method: str, folder: str, out: str, model: str, effort: float, cache: str) -> dict:
    os.environ["CLOAK_CACHE_DIR"] = cache
    import torch  # noqa: F401  (the heavy imports, before the baseline)

    import cloak.protect.run  # noqa: F401
    from cloak.api import Common, run_protect
    from cloak.protect import PROTECT

    baseline = rss_mib()
    options = {k: str(v) for k, v in PROTECT.get(method).tiny_options.items() if k in ("class_images",)}
    common = Common(method=method, model=model, effort=effort, seed=0, argv=[], options=options, force=True)
    start = time.perf_counter()
    rep = run_protect(folder, out, common=common)
    seconds = time.perf_counter() - start
    items = [i for i in rep.items if i.status == "ok"]
    pixels = sum(i.model_dump()["native_size"][0] * i.model_dump()["native_size"][1] for i in items)
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(rss_mib(), 1),
            "peak_above_imports_mib": round(rss_mib() - baseline, 1), "images": len(items),
            "megapixels": round(pixels / 1e6, 2), "working_sizes": [i.model_dump()["working_size"] for i in items],
            "linf_255": max(i.linf_255 for i in items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--effort", type=float, default=0.02)
    parser.add_argument("--methods", default="photoguard,aspl", help="comma-separated protect methods")
    parser.add_argument("--sets", default="12mp,mixed4,squares4")
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_child", nargs=3, metavar=("METHOD", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(child(*args._child, args.model, args.effort, args.cache)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-native-") as tmp:
        folders = make_inputs(Path(tmp) / "in")
        for method in args.methods.split(","):
            for name in args.sets.split(","):
                out = Path(tmp) / "out" / f"{method}-{name}"
                row = run_child(__file__, ["--_child", method, folders[name], out, "--model", args.model,
                                           "--effort", args.effort, "--cache", args.cache], check=False)
                rows.append({"method": method, "set": name, **row})
                if not args.json:
                    print(json.dumps(rows[-1]), file=sys.stderr)
    if args.json:
        print(json.dumps({"model": args.model, "effort": args.effort, "rows": rows}, indent=1))
    else:
        print(f"{'method':<12}{'set':<10}{'MP':>7}{'seconds':>9}{'peak RSS MiB':>14}{'above imports':>15}")
        for r in rows:
            if "error" in r:
                print(f"{r['method']:<12}{r['set']:<10}  failed: {r['error'][:90]}")
            else:
                print(f"{r['method']:<12}{r['set']:<10}{r['megapixels']:>7}{r['seconds']:>9}"
                      f"{r['peak_rss_mib']:>14}{r['peak_above_imports_mib']:>15}")


if __name__ == "__main__":
    main()
