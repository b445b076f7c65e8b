#!/usr/bin/env python3
"""First-run and warm-run wall time of one tiny smoke run per verb, as a newcomer types them.

Each verb runs twice as a fresh ``python -m cloak`` process on 2 small images with ``--tiny``: first
with an empty cache (the built-in stand-ins are built, class images generated), then again into a new
output folder with the same cache (everything cached is reused). The times include the interpreter's
start and imports, as a user sees them. Targets (issue 16 item 2, a 2-core CPU, idle): protect aspl at
``--effort 0.02`` ≤ 30 s first, ≤ 10 s warm. Run it on a quiet machine; other load inflates every figure.

    python benchmarks/bench_smoke.py                 # all verbs
    python benchmarks/bench_smoke.py --verbs protect  # one
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# verb → its arguments before INPUT OUTPUT (score: before GENERATED; --ref is added)
RUNS: dict[str, list[str]] = {
    "protect": ["protect", "--method", "aspl", "--tiny", "--effort", "0.02"],
    "purify": ["purify", "--method", "diffpure", "--tiny", "--effort", "0.02"],
    "attack": ["attack", "--method", "dreambooth", "--tiny", "--effort", "0.02", "--num-images", "1",
               "--sample-steps", "4"],
    "immunize": ["immunize", "--method", "apdm", "--tiny", "--effort", "0.02"],
    "score": ["score", "--metric", "psnr"],
}


def _images(folder: Path, n: int = 2, size: int = 64) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(folder / f"img{i}.png")


def _run(verb: str, images: Path, out: Path, cache: Path) -> tuple[float, int, str]:
    args = list(RUNS[verb])
    if verb == "score":
        args += ["--ref", str(images), str(images)]
    else:
        args += [str(images), str(out)]
    env = {**os.environ, "CLOAK_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cloak", *args, "-q"], env=env, capture_output=True, text=True,
                          cwd=ROOT)
    lines = proc.stderr.strip().splitlines()
    return time.perf_counter() - start, proc.returncode, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cloak-smoke-") as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        _images(images)
        for verb in args.verbs:
            cache = tmp / f"cache-{verb}"  # a fresh cache per verb: each first run is a real first run
            first, rc1, err1 = _run(verb, images, tmp / f"{verb}-first", cache)
            warm, rc2, err2 = _run(verb, images, tmp / f"{verb}-warm", cache)
            rows.append({"verb": verb, "command": "cloak " + " ".join(RUNS[verb]), "first_s": round(first, 1),
                         "warm_s": round(warm, 1), "exit": [rc1, rc2],
                         **({"stderr": err1 or err2} if rc1 or rc2 else {})})
            print(f"{verb:9s} first {first:7.1f} s   warm {warm:7.1f} s   exit {rc1},{rc2}   {RUNS[verb]}",
                  file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("verb\tfirst_s\twarm_s\texit")
        for r in rows:
            print(f"{r['verb']}\t{r['first_s']}\t{r['warm_s']}\t{r['exit'][0]},{r['exit'][1]}")


if __name__ == "__main__":
    main()
