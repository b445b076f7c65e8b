#!/usr/bin/env python3
"""ASPL speed and memory: cloak's implementation against a straightforward per-image one, same run.

Measures seconds per PGD step and per surrogate DreamBooth step, and peak memory, on tiny-sd and
mid-sd (and sd21-shaped when a CUDA device is present). Each (model, variant) runs in its own process
so peak memory (ru_maxrss on CPU, max_memory_allocated on CUDA) belongs to that variant alone.

The straightforward baseline does what the released Anti-DreamBooth code does: one image at a time
through the PGD step with the text encoder re-run and weight gradients computed, a deep copy of the
surrogate for every learner, and a fresh (non-fused) AdamW per DreamBooth call.

    python benchmarks/bench_aspl.py                 # all models that fit this machine
    python benchmarks/bench_aspl.py --models tiny-sd --images 4 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _harness import DEFAULT_CACHE, peak_mib, run_child, run_context, timed  # noqa: E402


def run_variant(model_id: str, variant: str, n_images: int, repeats: int, cache: str) -> dict:
    import torch

    from cloak.diffusion import denoising_loss, encode_latents
    from cloak.diffusion.dreambooth import DreamBoothConfig, DreamBoothTrainer, copy_params
    from cloak.models.handle import Models
    from cloak.protect.aspl import Aspl
    from cloak._progress import Progress

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = Models(cache_dir=Path(cache), device=device)
    sd = models.sd(model_id)
    res = sd.resolution
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(n_images, 3, res, res, generator=gen).mul(2).sub(1).to(device)
    cfg = DreamBoothConfig(lr=5e-7, train_text_encoder=True)
    prompt = cfg.instance_prompt
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if variant == "cloak":
        ctx = run_context(models, model_id, device, gen, res, cache, Progress())
        method = Aspl(Aspl.Options(class_images=0), ctx)
        learner, surrogate = method.surrogate_pair(sd, x0)

        def pgd():
            method.pgd(sd, learner.unet, learner.text_encoder, x0.clone(), x0, 1, 0.05, 0.005)

        def db():  # one learner refresh (copy + state reset) amortised over n=3 steps, as ASPL does
            copy_params(surrogate.unet, learner.unet)
            copy_params(surrogate.text_encoder, learner.text_encoder)
            learner.reset_optimizer()
            learner.unfreeze()
            for i in range(3):
                learner.step(method._ref_latents.sample([i % n_images], gen))
            learner.freeze()

        pgd_s = timed(pgd, repeats, device)
        db_s = timed(db, repeats, device) / 3
    else:
        unet, te = sd.trainable_copy()  # the persistent surrogate f (weights require grad, as released)
        ids = sd.tokenizer([prompt], padding="max_length", max_length=sd.tokenizer.model_max_length,
                           return_tensors="pt").input_ids.to(device)

        def pgd():
            x = x0.clone()
            for i in range(n_images):  # one image at a time; text encoder and weight grads every step
                xi = x[i:i + 1].detach().requires_grad_(True)
                states = te(ids)[0]
                z = encode_latents(sd.vae, xi, gen)
                loss = denoising_loss(unet, sd.noise_scheduler, z, states, gen)
                unet.zero_grad()
                te.zero_grad()
                loss.backward()
                x[i:i + 1] = (xi + 0.005 * xi.grad.sign()).detach()

        def db():  # deepcopy of the surrogate and a new AdamW for each learner, as released
            f2u, f2t = copy.deepcopy(unet), copy.deepcopy(te)
            trainer = DreamBoothTrainer(sd, f2u, f2t, cfg, class_latents=None, generator=gen)
            trainer.optimizer = torch.optim.AdamW(trainer.params, lr=5e-7, weight_decay=1e-2, foreach=False)
            for i in range(3):
                trainer.step(encode_latents(sd.vae, x0[i % n_images:i % n_images + 1], gen).detach())

        pgd_s = timed(pgd, repeats, device)
        db_s = timed(db, repeats, device) / 3
    return {"model": model_id, "variant": variant, "images": n_images, "resolution": res, "device": str(device),
            "pgd_step_s": pgd_s, "db_step_s": db_s, "peak_mb": peak_mib(device)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_variant(args._child[0], args._child[1], args.images, args.repeats, args.cache)))
        return 0
    import torch

    models = args.models or (["tiny-sd", "mid-sd"] + (["sd21-shaped"] if torch.cuda.is_available() else []))
    rows = []
    for model_id in models:
        for variant in ("straightforward", "cloak"):
            rows.append(run_child(__file__, ["--_child", model_id, variant, "--images", args.images,
                                             "--repeats", args.repeats, "--cache", args.cache]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<12} {'variant':<16} {'PGD s/step':>11} {'DB s/step':>10} {'peak MB':>9}")
    for r in rows:
        print(f"{r['model']:<12} {r['variant']:<16} {r['pgd_step_s']:>11.4f} {r['db_step_s']:>10.4f} "
              f"{r['peak_mb']:>9.0f}")
    print("\nspeed-up of cloak over the straightforward implementation (same run):")
    for model_id in models:
        base = next(r for r in rows if r["model"] == model_id and r["variant"] == "straightforward")
        ours = next(r for r in rows if r["model"] == model_id and r["variant"] == "cloak")
        print(f"  {model_id}: PGD ×{base['pgd_step_s'] / ours['pgd_step_s']:.2f}, "
              f"DreamBooth ×{base['db_step_s'] / ours['db_step_s']:.2f}, "
              f"peak memory ×{ours['peak_mb'] / base['peak_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
