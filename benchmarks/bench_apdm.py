#!/usr/bin/env python3
"""APDM (``cloak immunize``) speed and memory: cloak's L2P loop against a straightforward one, same run.

Measures seconds per outer iteration (J inner steps + the real model's update) and peak memory on a
random-weight model (default ``mid-sd``, 128 px; ``sd21-shaped`` only makes sense on a GPU). Each variant runs
in its own process so its peak memory (ru_maxrss on CPU, max_memory_allocated on CUDA) is its own.

The straightforward baseline does what the released KU-VGI/APDM protect.py does: a deep copy of the UNet and
a new (non-fused) AdamW every outer iteration, a deep-copied reference UNet, every image VAE-encoded and both
prompts text-encoded at every use, one UNet call per loss term (plus the unused instance forward of the
protection path), and a Python loop that adds θ'.grad into θ.grad. cloak's variant is ``Apdm.accumulate``:
a preallocated scratch UNet refilled by copy_params, zeroed fused-AdamW state, latents and prompts encoded
once, the pair and the prior image in one batched call, the base UNet itself as the frozen reference, and
on CUDA bf16 autocast + gradient checkpointing.

    OMP_NUM_THREADS=1 python benchmarks/bench_apdm.py [--model mid-sd] [--inner 2] [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _harness import DEFAULT_CACHE, peak_mib, run_child, run_context, timed  # noqa: E402


def _image_set(pixels):
    from cloak.io.images import ImageItem, ImageSet

    return ImageSet([ImageItem(f"img{i}", Path(f"img{i}.png"), (1, 1), "0" * 64) for i in range(len(pixels))],
                    pixels)


def run_variant(model_id: str, variant: str, inner: int, repeats: int, n_images: int, cache: str) -> dict:
    import torch
    import torch.nn.functional as F

    from cloak._progress import Progress
    from cloak.immunize.apdm import Apdm
    from cloak.methods import build_options
    from cloak.models.handle import Models

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = Models(cache_dir=Path(cache), device=device)
    sd = models.sd(model_id)
    res = sd.resolution
    gen = torch.Generator().manual_seed(0)
    subject = torch.rand(n_images, 3, res, res, generator=gen).mul(2).sub(1)
    safe = torch.rand(n_images, 3, res, res, generator=gen).mul(2).sub(1)
    classes = torch.rand(n_images, 3, res, res, generator=gen).mul(2).sub(1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if variant == "cloak":
        ctx = run_context(models, model_id, device, gen, res, cache, Progress())
        opts, _ = build_options(Apdm.Options, [("bench", {"class_images": 2, "class_image_steps": 2})], "apdm")
        method = Apdm(opts, ctx)
        method.setup(_image_set(subject), _image_set(safe))

        def outer():
            method.opt.zero_grad(set_to_none=True)
            method.accumulate(inner)
            method.opt.step()

        seconds = timed(outer, repeats, device)
    else:
        sched, vae, te, tok = sd.noise_scheduler, sd.vae, sd.text_encoder, sd.tokenizer
        theta = copy.deepcopy(sd.unet).float().requires_grad_(True)
        source = copy.deepcopy(sd.unet).requires_grad_(False)  # released: unet_source = deepcopy(pipe.unet)
        opt = torch.optim.AdamW(theta.parameters(), lr=5e-6, weight_decay=1e-2, foreach=False)
        total_t = sched.config.num_train_timesteps

        def pick(images):
            i = int(torch.randint(0, len(images), (1,), generator=gen))
            return images[i:i + 1].to(device)

        def latents(x):
            with torch.no_grad():
                return vae.encode(x).latent_dist.sample(gen) * vae.config.scaling_factor

        def embed(prompt):
            ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            return te(ids)[0]

        def noisy(z, t):
            eps = torch.randn(z.shape, generator=gen).to(device)
            return sched.add_noise(z, eps, t), eps

        def outer():
            opt.zero_grad()
            temp = copy.deepcopy(theta)
            opt_temp = torch.optim.AdamW(temp.parameters(), lr=5e-6, weight_decay=1e-2, foreach=False)
            for _ in range(inner):
                opt_temp.zero_grad()
                t = torch.randint(0, total_t, (1,), generator=gen).to(device)
                zt, eps = noisy(latents(pick(subject)), t)
                c = embed("a photo of sks person")
                loss_db = F.mse_loss(temp(zt, t, c).sample, eps)
                zc, eps_c = noisy(latents(pick(classes)), t)
                loss_db = loss_db + F.mse_loss(temp(zc, t, embed("a photo of person")).sample, eps_c)
                loss_db.backward()
                opt_temp.step()
                t = torch.randint(0, total_t, (1,), generator=gen).to(device)
                zt, eps = noisy(latents(pick(subject)), t)
                temp(zt, t, embed("a photo of sks person"))  # released: computed, unused in DPO mode
                zc, eps_c = noisy(latents(pick(classes)), t)
                loss = F.mse_loss(temp(zc, t, embed("a photo of person")).sample, eps_c)
                zu, zs = latents(pick(subject)), latents(pick(safe))
                eps = torch.randn(zu.shape, generator=gen).to(device)
                t = torch.randint(0, total_t, (1,), generator=gen).to(device)
                xu, xs = sched.add_noise(zu, eps, t), sched.add_noise(zs, eps, t)
                with torch.no_grad():
                    ru, rs = source(xu, t, c).sample, source(xs, t, c).sample
                mu, ms = temp(xu, t, c).sample, temp(xs, t, c).sample
                delta = (F.mse_loss(eps, ms, reduction="none") - F.mse_loss(eps, rs, reduction="none")
                         - F.mse_loss(eps, mu, reduction="none") + F.mse_loss(eps, ru, reduction="none"))
                loss = loss - F.logsigmoid(-delta).mean()
                loss.backward()
                with torch.no_grad():
                    for p1, p2 in zip(theta.parameters(), temp.parameters()):
                        if p2.grad is not None:
                            if p1.grad is None:
                                p1.grad = p2.grad
                            else:
                                p1.grad += p2.grad
            opt.step()

        seconds = timed(outer, repeats, device)
    return {"model": model_id, "variant": variant, "resolution": res, "device": str(device), "inner_steps": inner,
            "s_per_outer_iteration": seconds, "s_per_inner_step": seconds / inner, "peak_mib": peak_mib(device)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mid-sd")
    parser.add_argument("--inner", type=int, default=2, help="inner steps J per outer iteration (published: 20)")
    parser.add_argument("--repeats", type=int, default=2, help="timed outer iterations (after one warm-up)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_variant(args.model, args._child, args.inner, args.repeats, args.images, args.cache)))
        return 0
    rows = []
    for variant in ("straightforward", "cloak"):
        rows.append(run_child(__file__, ["--_child", variant, "--model", args.model, "--inner", args.inner,
                                         "--repeats", args.repeats, "--images", args.images, "--cache", args.cache]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load}")
    print(f"{'model':<12} {'variant':<16} {'s/outer it':>11} {'s/inner':>9} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['model']:<12} {r['variant']:<16} {r['s_per_outer_iteration']:>11.3f} {r['s_per_inner_step']:>9.3f} "
              f"{r['peak_mib']:>9.0f}")
    base, ours = rows
    print(f"\n{args.model} @ {base['resolution']} px, J = {args.inner}, {base['device']}: cloak is "
          f"x{base['s_per_outer_iteration'] / ours['s_per_outer_iteration']:.2f} faster per outer iteration, "
          f"peak memory x{ours['peak_mib'] / base['peak_mib']:.2f}")
    print(f"published schedule (800 x 20) at this speed: "
          f"{ours['s_per_inner_step'] * 16000 / 3600:.1f} h (cloak) vs "
          f"{base['s_per_inner_step'] * 16000 / 3600:.1f} h (straightforward)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
