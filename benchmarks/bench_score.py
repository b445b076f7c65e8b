"""Seconds per image of every `cloak score` metric on CPU (512² images, 4 generated + 2 reference photos).

Weights: real where they install offline (dlib, MTCNN, BRISQUE's SVR, LPIPS' linear layers); full-size random
networks of the real architectures elsewhere — RetinaFace-R50/ArcFace stand-ins (--tiny), and CLIP ViT-B/32,
RN50 and LIQE written here at their real widths (random weights cost what real ones cost; the tiny stand-ins
would not). Random RetinaFace weights fire on many anchors, so retinaface-backed timings are an upper bound.
Reported: the marginal seconds per generated image (a run on N images minus a run on one, after a warm-up run
that pays for imports and, for LIQE, encodes its 495 prompts once into the cache).

    OMP_NUM_THREADS=1 python benchmarks/bench_score.py [--threads N] [--images N] [--only M ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

METRICS = [
    ("psnr", {}), ("ssim", {}), ("linf", {}), ("lpips", {}),
    ("fdfr", {}), ("fdfr", {"backend": "dlib"}), ("ism", {}), ("ism", {"backend": "dlib"}),
    ("ims", {}), ("serfiq", {}), ("brisque", {}), ("niqe", {}), ("liqe", {}), ("clipiqa", {}), ("clipiqa-c", {}),
]

CLIP_METRICS = ("liqe", "clipiqa", "clipiqa-c")


def _photos(n: int) -> list[np.ndarray]:
    from skimage import data

    astro = data.astronaut()
    buf = io.BytesIO()
    Image.fromarray(astro).save(buf, "JPEG", quality=40)
    pool = [astro, np.asarray(Image.open(buf).convert("RGB")), data.chelsea(), data.coffee()]
    out = []
    for i in range(n):
        img = Image.fromarray(pool[i % len(pool)])
        s = 512 / min(img.size)
        img = img.resize((max(512, round(img.width * s)), max(512, round(img.height * s))), Image.BICUBIC)
        out.append(np.asarray(img.crop((0, 0, 512, 512))))
    return out


def _full_size_clip(root: Path) -> dict[str, str]:
    """Random CLIP ViT-B/32 and RN50 at OpenAI's real widths, in the files cloak reads."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from cloak.models.clip_openai import CLIP_FILE, LIQE_FILES

    torch.manual_seed(0)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
    vit = open_clip.CLIP(512, open_clip.CLIPVisionCfg(layers=12, width=768, patch_size=32, image_size=224), text,
                         quick_gelu=True)
    rn = open_clip.CLIP(1024, open_clip.CLIPVisionCfg(layers=(3, 4, 6, 3), width=64, image_size=224), text,
                        quick_gelu=True)
    paths = {}
    for model_id, model, name in (("clip-vit-b32", vit, CLIP_FILE), ("clip-rn50", rn, CLIP_FILE),
                                  ("liqe-mix", vit, LIQE_FILES[0])):
        d = root / model_id
        d.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if name.endswith(".safetensors"):
            save_file(state, str(d / name))
        else:
            torch.save(state, d / name)
        paths[model_id] = str(d)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4, help="generated images (≥ 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", nargs="*", help="metrics to time (default: all)")
    args = ap.parse_args()
    import torch

    from cloak.api import Common, run_score
    from cloak.config import Config

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one, gen, ref = tmp / "one", tmp / "gen", tmp / "ref"
        for d in (one, gen, ref):
            d.mkdir()
        photos = _photos(args.images)
        for i, arr in enumerate(photos):
            Image.fromarray(arr).save(gen / f"{i}.png")
            if i == 0:
                Image.fromarray(arr).save(one / f"{i}.png")
            if i < 2:
                Image.fromarray(arr).save(ref / f"{i}.png")
        overrides = _full_size_clip(tmp / "models")
        cache = os.environ.get("CLOAK_CACHE_DIR") or str(tmp / "cache")
        rows = []
        for name, opts in METRICS:
            if args.only and name not in args.only:
                continue
            # Each run loads its models inside compute(); the difference between a run on N images and one on a
            # single image is the marginal cost of an image, free of loading and of reference embeddings.
            seconds = {}
            # the first pass (discarded) pays for imports (scipy, open_clip, dlib, ...) once
            # --tiny swaps catalog ids for their stand-ins before [models] overrides apply: the CLIP metrics run
            # without it, on the full-size random models written above.
            tiny = name not in CLIP_METRICS
            for folder, n in ((one, 0), (one, 1), (gen, len(photos))):
                common = Common(tiny=tiny, config=Config(data={"models": overrides}), cache_dir=cache, argv=[],
                                options={f"{name}.{k}": v for k, v in opts.items()})
                rep = run_score(folder, ref=str(ref), metrics=[name], common=common)
                seconds[n] = rep.summary["metrics"][name]["seconds_per_image"] * max(n, 1)
            n = len(photos)
            row = {"metric": name, "options": opts, "seconds_per_image": round((seconds[n] - seconds[1]) / (n - 1), 4),
                   "seconds_one_image_run": round(seconds[1], 3)}
            rows.append(row)
            label = name + "".join(f" {k}={v}" for k, v in opts.items())
            print(f"{label:24s} {row['seconds_per_image']:8.3f} s/image   (a 1-image run, with model loading: "
                  f"{row['seconds_one_image_run']:.2f} s)", flush=True)
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "images": args.images, "size": 512, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
