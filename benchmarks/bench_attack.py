#!/usr/bin/env python3
"""Seconds per training step and per generated image of every `cloak attack` method, same run.

Each method runs through ``run_attack`` (the real code path: class images, LatentCache, trainer, pipeline)
on a random-weight model (default ``mid-sd``, 128 px). Training steps are timed from the progress bar's
ticks (the first step, which pays for lazy initialisation, is left out); images from the report's
``sample_seconds_per_image``. Ratios are against ``dreambooth`` measured in the same run: LoRA's step vs
the full fine-tune's, and the zero-shot IP-Adapter's image vs plain sampling.

The zero-shot methods need adapters that fit the model: random ones are written for the model's shape
(cloak.models.adapters.write_standin_*) and given to the run through a ``[models]`` override, with the
built-in random face detector/embedder and CLIP tower. Random RetinaFace fires on many anchors, so the
reference-embedding time is an upper bound (it is per reference, not per image, and not in s/image).

    OMP_NUM_THREADS=1 python benchmarks/bench_attack.py [--model mid-sd] [--steps 5] [--images 2]
        [--sample-steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class TickProgress:
    """A Progress that records when each task advanced (no output)."""

    def __init__(self):
        self.ticks: dict[str, list[float]] = {}

    def task(self, description: str, total):
        ticks = self.ticks.setdefault(description, [])

        class _Task:
            def advance(self, n: int = 1, status=None):
                ticks.extend([time.perf_counter()] * n)

            def __enter__(self):
                ticks.append(time.perf_counter())  # the start
                return self

            def __exit__(self, *exc):
                pass

            def close(self):
                pass

        return _Task()


def write_images(folder: Path, n: int, size: int) -> Path:
    """Seeded smooth colour fields (image-like, like the test fixtures)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(folder / f"img{i}.png")
    return folder


def seconds_per_step(ticks: list[float]) -> float | None:
    # ticks[0] is the start, ticks[1] the end of step 1 (lazy set-up inside): time steps 2..n.
    gaps = [b - a for a, b in zip(ticks[1:], ticks[2:])]
    return statistics.median(gaps) if gaps else None


def standin_config(cache: Path, model: str, work: Path) -> Path:
    from cloak.models import adapters
    from cloak.models.cache import ensure_builtin

    adapters.write_standin_faceid(work / "faceid", model)
    adapters.write_standin_ip_adapter(work / "ipadapter", model)
    paths = {"ip-adapter-faceid-sd15": work / "faceid", "ip-adapter-sd15": work / "ipadapter",
             "ip-adapter-image-encoder": ensure_builtin(cache, "tiny-clip-vision"),
             "retinaface-r50": ensure_builtin(cache, "tiny-retinaface"),
             "arcface-irse50": ensure_builtin(cache, "tiny-arcface")}
    toml = work / "cloak.toml"
    toml.write_text("[models]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in paths.items()), encoding="utf-8")
    return toml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mid-sd")
    ap.add_argument("--steps", type=int, default=5, help="training steps per method")
    ap.add_argument("--images", type=int, default=2, help="images per prompt (one prompt)")
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--inputs", type=int, default=4, help="instance images")
    ap.add_argument("--json", help="write the table as JSON here")
    args = ap.parse_args()

    import torch

    from cloak.api import Common, run_attack

    cache = Path(os.environ.get("CLOAK_CACHE_DIR") or tempfile.mkdtemp(prefix="cloak-bench-cache-"))
    os.environ["CLOAK_CACHE_DIR"] = str(cache)
    work = Path(tempfile.mkdtemp(prefix="cloak-bench-attack-"))
    images = write_images(work / "in", args.inputs, 160)
    config = standin_config(cache, args.model, work)
    common_opts = {"num_images": args.images, "sample_steps": args.sample_steps, "prompts": ["a photo of sks person"]}
    train_opts = {"steps": args.steps, "class_images": 2, "class_image_steps": 2, "checkpoint_every": 0}
    runs = {
        "dreambooth": {**common_opts, **train_opts},
        "lora": {**common_opts, **train_opts},
        "lora[batch 2]": {**common_opts, **train_opts, "batch_size": 2},  # same batch as dreambooth's step
        "diffshortcut": {**common_opts, **train_opts},
        "ipadapter[faceid]": {**common_opts, "variant": "faceid", "reference": 0, "sampler": "default"},
        "ipadapter[ipadapter]": {**common_opts, "variant": "ipadapter", "reference": 0, "sampler": "default"},
    }
    rows = {}
    for label, options in runs.items():
        method = label.split("[")[0]
        progress = TickProgress()
        t = time.perf_counter()
        rep = run_attack(images, work / label, common=Common(method=method, model=args.model, options=options,
                                                            config=str(config), progress=progress, argv=[],
                                                            force=True))
        training = next((v for k, v in progress.ticks.items() if k.endswith("training")), [])
        rows[label] = {"s_per_train_step": seconds_per_step(training),
                       "s_per_image": rep.summary["sample_seconds_per_image"],
                       "setup_and_train_s": rep.summary["train_seconds"], "total_s": time.perf_counter() - t,
                       "batch": (options.get("batch_size") or {"dreambooth": 2, "lora": 1, "diffshortcut": 2}
                                 .get(method)),
                       "trained_parameters": rep.summary.get("lora_parameters")}
    base = rows["dreambooth"]
    for label, row in rows.items():
        if row["s_per_train_step"] and base["s_per_train_step"]:
            row["train_step_vs_dreambooth"] = round(row["s_per_train_step"] / base["s_per_train_step"], 3)
        if row["s_per_image"] and base["s_per_image"]:
            row["image_vs_dreambooth_sampling"] = round(row["s_per_image"] / base["s_per_image"], 3)
    meta = {"model": args.model, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "steps": args.steps, "sample_steps": args.sample_steps,
            "images_per_method": args.images, "python": platform.python_version(), "torch": torch.__version__,
            "load_average": os.getloadavg()}
    print(json.dumps(meta))
    print(f"{'method':22} {'s/train step':>12} {'batch':>5} {'s/image':>9} {'step ×DB':>9} {'image ×DB':>9}")
    for label, row in rows.items():
        step = f"{row['s_per_train_step']:.3f}" if row["s_per_train_step"] else "-"
        image = f"{row['s_per_image']:.3f}" if row["s_per_image"] else "-"
        print(f"{label:22} {step:>12} {row['batch'] or '-':>5} {image:>9} "
              f"{row.get('train_step_vs_dreambooth', '-'):>9} {row.get('image_vs_dreambooth_sampling', '-'):>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
