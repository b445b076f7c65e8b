#!/usr/bin/env python3
"""How much of a protective perturbation each purifier removes, and its seconds per image.

Protects a few small real images with ASPL on the built-in tiny-sd (``--tiny``), purifies the protected set
with every registered purifier, and reports per method (means over images, 8-bit PNGs, pixels in [0,1]):

* ``l2_protected`` = ‖protected − clean‖₂ and ``l2_purified`` = ‖purified − clean‖₂ (whole image);
* ``ratio`` = l2_purified / l2_protected (< 1: the purified image is closer to the clean one);
* ``delta_removed`` = ⟨protected − purified, δ⟩ / ‖δ‖² with δ = protected − clean: the share of the
  perturbation the purifier took away (1 = exactly δ removed, 0 = its change is orthogonal to δ);
* seconds per image with model loading (DiffShortcut Table 2 counts loading: "time cost … per sample with
  consideration of model loading") and without; LPIPS(purified, protected input) from the purify report.

Stand-in weights are built into the cache by a warm-up run first, so loading means reading files, as it
would with real weights. The learned purifiers run here on random-weight stand-ins: their ℓ2 figures say
nothing about the real models (a random diffusion model does not denoise), only the model-free purifiers'
figures (gaussian, jpeg, tvm with bicubic upsampling) are meaningful. Timings are CPU timings of tiny models.

    python benchmarks/bench_purify.py                        # all purifiers, 3 images, effort 1
    python benchmarks/bench_purify.py --methods gaussian jpeg --images 2 --effort impress=0.1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _images(folder: Path, n: int, size: int) -> None:
    """Crops of scikit-image's public-domain photographs (faces and objects), resized to size²."""
    import numpy as np
    from PIL import Image
    from skimage import data

    sources = [data.astronaut()[0:300, 80:380], data.chelsea()[0:300, 50:350], data.coffee()[0:400, 100:500],
               data.rocket()[100:400, 200:500], data.astronaut()[150:512, 150:512]]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.ascontiguousarray(sources[i % len(sources)])
        Image.fromarray(arr).resize((size, size), Image.LANCZOS).save(folder / f"img{i}.png")


def _load(folder: Path) -> dict:
    import numpy as np
    from PIL import Image

    return {p.name: np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255.0
            for p in sorted(folder.glob("*.png"))}


def _figures(clean: dict, protected: dict, purified: dict) -> dict:
    import numpy as np

    l2p, l2q, removed = [], [], []
    for name, c in clean.items():
        p, q = protected[name], purified[name]
        delta = p - c
        l2p.append(float(np.linalg.norm(delta)))
        l2q.append(float(np.linalg.norm(q - c)))
        removed.append(float(((p - q) * delta).sum() / max((delta * delta).sum(), 1e-12)))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"l2_protected": mean(l2p), "l2_purified": mean(l2q), "ratio": mean(l2q) / mean(l2p),
            "delta_removed": mean(removed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="*", default=None, metavar="NAME[:K=V,...]",
                    help="purifiers, optionally with options (default: all registered, plus tvm:upsample=bicubic)")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="image side (tiny-sd works at 64)")
    ap.add_argument("--effort", nargs="*", default=[], metavar="[METHOD=]E",
                    help="--effort for every purifier (E) or one (METHOD=E); default 1 (the spec's settings)")
    ap.add_argument("--protect", default="class_images=2,iterations=10,surrogate_steps=1,pgd_steps=6",
                    help="ASPL options (K=V,...): enough PGD steps (60 × α 0.005) to use the 0.05 (m11) budget")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=None, help="model cache (default: a temporary directory)")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from cloak.api import Common, run_protect, run_purify
    from cloak.purify import PURIFY

    efforts: dict[str, float] = {}
    default_effort = 1.0
    for item in args.effort:
        name, sep, value = item.rpartition("=")
        if sep:
            efforts[name] = float(value)
        else:
            default_effort = float(value)
    methods = args.methods or [*PURIFY.names(), "tvm:upsample=bicubic"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-purify-"))
    cache = args.cache or str(tmp / "cache")
    os.environ["CLOAK_CACHE_DIR"] = cache
    clean_dir, prot_dir = tmp / "clean", tmp / "protected"
    _images(clean_dir, args.images, args.size)

    protect_options = dict(kv.split("=", 1) for kv in args.protect.split(",")) if args.protect else {}
    t0 = time.perf_counter()
    prot_rep = run_protect(clean_dir, prot_dir, common=Common(method="aspl", tiny=True, seed=0, device=args.device,
                                                              options=protect_options, argv=[]))
    protect_seconds = time.perf_counter() - t0
    clean, protected = _load(clean_dir), _load(prot_dir)

    rows = [{"method": "(none)", **_figures(clean, protected, protected), "effort": None,
             "s_per_image": None, "s_per_image_with_loading": None, "lpips_to_input": 0.0}]
    for label in methods:
        name, _, extra = label.partition(":")
        options = dict(kv.split("=", 1) for kv in extra.split(",")) if extra else {}
        cls = PURIFY.get(name)
        effort = efforts.get(label, efforts.get(name, default_effort))
        slug = label.replace(":", "-").replace("=", "-").replace(",", "-")
        # Warm-up: builds the stand-ins into the cache so the timed run only reads files.
        run_purify(clean_dir, tmp / f"warm-{slug}", common=Common(method=name, tiny=True, effort=0.01,
                                                                   device=args.device, argv=[],
                                                                   options={**cls.tiny_options, **options}))
        t0 = time.perf_counter()
        rep = run_purify(prot_dir, tmp / f"pur-{slug}", common=Common(method=name, tiny=True, effort=effort, seed=0,
                                                                      device=args.device, options=options, argv=[]))
        wall = time.perf_counter() - t0
        lp = [i.model_extra.get("lpips_to_input") for i in rep.items]
        lp = [v for v in lp if v is not None]
        rows.append({"method": label, **_figures(clean, protected, _load(tmp / f"pur-{slug}")), "effort": effort,
                     "s_per_image": rep.summary["seconds_per_image"],
                     "s_per_image_with_loading": rep.summary["seconds_per_image_with_loading"],
                     "prepare_seconds": rep.summary["prepare_seconds"], "wall_seconds": round(wall, 2),
                     "lpips_to_input": sum(lp) / len(lp) if lp else None})
        print(f"done {label} ({wall:.1f}s)", file=sys.stderr, flush=True)

    meta = {"images": args.images, "size": args.size, "protection": "aspl --tiny (tiny-sd), eps "
            f"{prot_rep.summary['budget']['eps']} {prot_rep.summary['budget']['unit']}, {args.protect}",
            "linf_255_protected": max(i.model_extra.get("linf_255", 0) for i in prot_rep.items),
            "protect_seconds": round(protect_seconds, 1), "device": args.device,
            "loadavg_at_end": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count(),
            "torch_threads": __import__("torch").get_num_threads()}
    print("| purifier | effort | ℓ2(x,clean) | ratio to protected | δ removed | LPIPS to input (stand-in) "
          "| s/img | s/img incl. loading |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        def f(v, spec):
            return "—" if v is None else format(v, spec)
        print(f"| {r['method']} | {f(r['effort'], 'g')} | {r['l2_purified']:.3f} | {r['ratio']:.3f} | "
              f"{r['delta_removed']:.3f} | {f(r['lpips_to_input'], '.4f')} | {f(r['s_per_image'], '.3f')} | "
              f"{f(r['s_per_image_with_loading'], '.3f')} |")
    print(f"\n{json.dumps(meta)}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
