#!/usr/bin/env python3
"""ASPL against the released Anti-DreamBooth loop: seconds per outer iteration, peak memory, FLOP efficiency.

Issue 16 §1. Both sides run the same random model (``mid-sd``), the same 4 images at 128 px, the same
4 class images (PNG files in one folder) and the published schedule per outer iteration: 3 DreamBooth
steps on f' (copied from f) on the clean set, 6 PGD steps against f', 3 DreamBooth steps on f on the
poison; prior preservation on (λ = 1), the text encoder trained, lr 5e-7, fp32 on the CPU.

``released`` is this file's own re-implementation of the loop structure of VinAIResearch/Anti-DreamBooth
``attacks/aspl.py`` (written from its algorithm, fp32 instead of its bf16 cast): ``f_sur = deepcopy(f)``,
then ``train_one_epoch`` deep-copies its argument again and builds a new AdamW every call, every
DreamBooth step reads the class image from disk, re-tokenises and VAE-encodes both images, the PGD
steps run the text encoder every step and compute weight gradients (the weights still require grad),
and ``f`` is replaced by the trained copy. Its gradient clipping is kept as released: it is handed the
``itertools.chain`` the optimizer already consumed, so it clips nothing.

``cloak`` is ``cloak.protect.aspl.Aspl`` as ``cloak protect --method aspl`` runs it (the class images
through ``--class-dir``).

Each side runs in its own child process (so ``ru_maxrss`` is its own), sides alternate, ``--rounds``
rounds each (≥ 3). A child runs ``--iters`` outer iterations and times each one; the first is dropped
(lazy allocations), the median of the rest over all rounds is the figure. ``--flops`` adds one child per
side that counts one outer iteration's FLOPs (torch.utils.flop_counter.FlopCounterMode) and a GEMM
probe (a large fp32 ``torch.mm`` on the same threads): FLOP efficiency = FLOPs ÷ s/iteration ÷ GEMM peak.

    python benchmarks/bench_vs_released.py                   # 3 rounds × 3 iterations, with FLOPs
    python benchmarks/bench_vs_released.py --rounds 5 --iters 4 --json

Run it on an idle machine: wall-clock figures taken while other processes compete are not valid.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from _harness import DEFAULT_CACHE, rss_mib, run_child  # noqa: E402

MODEL = "mid-sd"
INSTANCE_PROMPT = "a photo of sks person"
CLASS_PROMPT = "a photo of person"
LR = 5e-7
EPS, ALPHA = 0.05, 0.005  # [-1, 1] units, as released (pgd_eps 0.05, pgd_alpha 0.005)


def write_inputs(folder: Path, n_images: int, n_class: int, resolution: int) -> tuple[Path, Path]:
    """Random instance and class PNGs (speed and memory do not depend on content)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for name, n in (("instance", n_images), ("class", n_class)):
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            low = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
            Image.fromarray(low).resize((resolution, resolution), Image.BICUBIC).save(d / f"{i:02d}.png")
        out.append(d)
    return out[0], out[1]


# --- the released loop structure (re-implemented) ---------------------------------------------------------
class _ReleasedData:
    """``DreamBoothDatasetFromTensor``: instance tensors in memory, class images read from disk per item."""

    def __init__(self, instance, tokenizer, class_dir: Path, resolution: int):
        from torchvision import transforms

        self.instance, self.tokenizer = instance, tokenizer
        self.class_paths = sorted(class_dir.iterdir())
        self.length = max(len(instance), len(self.class_paths))
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def ids(self, prompt):
        return self.tokenizer(prompt, truncation=True, padding="max_length", max_length=self.tokenizer.model_max_length,
                              return_tensors="pt").input_ids

    def __getitem__(self, index):
        from PIL import Image

        image = Image.open(self.class_paths[index % len(self.class_paths)]).convert("RGB")
        return {"instance_images": self.instance[index % len(self.instance)],
                "instance_prompt_ids": self.ids(INSTANCE_PROMPT),
                "class_images": self.transform(image), "class_prompt_ids": self.ids(CLASS_PROMPT)}


def released_train_one_epoch(models, tokenizer, scheduler, vae, data, class_dir, resolution, steps):
    import copy
    import itertools

    import torch
    import torch.nn.functional as F

    unet, text_encoder = copy.deepcopy(models[0]), copy.deepcopy(models[1])
    params_to_optimize = itertools.chain(unet.parameters(), text_encoder.parameters())
    optimizer = torch.optim.AdamW(params_to_optimize, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    dataset = _ReleasedData(data, tokenizer, class_dir, resolution)
    for step in range(steps):
        unet.train()
        text_encoder.train()
        item = dataset[step % dataset.length]
        pixel_values = torch.stack([item["instance_images"], item["class_images"]])
        input_ids = torch.cat([item["instance_prompt_ids"], item["class_prompt_ids"]], dim=0)
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(input_ids)[0]
        pred = unet(noisy, timesteps, states).sample
        target = noise if scheduler.config.prediction_type == "epsilon" else \
            scheduler.get_velocity(latents, noise, timesteps)
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        loss = F.mse_loss(pred.float(), target.float()) + F.mse_loss(pred_prior.float(), target_prior.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_to_optimize, 1.0)  # the consumed chain: clips nothing, as released
        optimizer.step()
        optimizer.zero_grad()
        unet.zero_grad()
        text_encoder.zero_grad()
    return [unet, text_encoder]


def released_pgd_attack(models, tokenizer, scheduler, vae, data, original, steps):
    import torch
    import torch.nn.functional as F

    unet, text_encoder = models
    perturbed = data.detach().clone()
    perturbed.requires_grad_(True)
    input_ids = tokenizer(INSTANCE_PROMPT, truncation=True, padding="max_length",
                          max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.repeat(len(data), 1)
    for _ in range(steps):
        perturbed.requires_grad = True
        latents = vae.encode(perturbed).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(input_ids)[0]
        pred = unet(noisy, timesteps, states).sample
        target = noise if scheduler.config.prediction_type == "epsilon" else \
            scheduler.get_velocity(latents, noise, timesteps)
        unet.zero_grad()
        text_encoder.zero_grad()
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        adv = perturbed + ALPHA * perturbed.grad.sign()
        eta = torch.clamp(adv - original, min=-EPS, max=EPS)
        perturbed = torch.clamp(original + eta, min=-1, max=1).detach_()
        unet.zero_grad()
        text_encoder.zero_grad()
    return perturbed


def run_released(sd, instance_dir: Path, class_dir: Path, resolution: int, iters: int, flops: bool):
    import copy

    from cloak.io.images import read_images

    clean = read_images(instance_dir, resolution).pixels
    perturbed, original = clean.clone(), clean.clone()
    unet, text_encoder, vae = sd.unet, sd.text_encoder, sd.vae
    unet.requires_grad_(True)  # as loaded by from_pretrained in aspl.py (only the VAE is frozen there)
    text_encoder.requires_grad_(True)
    f = [unet, text_encoder]
    del unet, text_encoder
    sd.unet = sd.text_encoder = None  # f is the only reference to the loaded weights, as in aspl.py
    times, counted = [], None
    for i in range(iters):
        counter = _flop_counter() if flops and i == iters - 1 else None
        start = time.perf_counter()
        with counter or _null():
            f_sur = copy.deepcopy(f)
            f_sur = released_train_one_epoch(f_sur, sd.tokenizer, sd.noise_scheduler, vae, clean, class_dir,
                                             resolution, 3)
            perturbed = released_pgd_attack(f_sur, sd.tokenizer, sd.noise_scheduler, vae, perturbed, original, 6)
            f = released_train_one_epoch(f, sd.tokenizer, sd.noise_scheduler, vae, perturbed, class_dir,
                                         resolution, 3)
            del f_sur
        times.append(time.perf_counter() - start)
        if counter is not None:
            counted = counter.get_total_flops()
    return times, counted


# --- cloak --------------------------------------------------------------------------------------------------
def run_cloak(models, model: str, cache: str, instance_dir: Path, class_dir: Path, resolution: int, iters: int,
              flops: bool):
    import torch

    from cloak._progress import Progress
    from cloak.io.images import read_images
    from cloak.methods import RunContext
    from cloak.protect.aspl import Aspl

    generator = torch.Generator().manual_seed(0)
    ctx = RunContext(models=models, model=model, device=torch.device("cpu"), dtype=torch.float32, seed=0,
                     generator=generator, resolution=resolution, cache_dir=Path(cache), progress=Progress(),
                     extras={"class_dir": str(class_dir)})
    method = Aspl(Aspl.Options(iterations=iters, class_images=4, surrogate_steps=3, pgd_steps=6,
                               instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT, lr=LR), ctx)
    method.name = "aspl"
    times, counted = [], [None]
    inner = method.iteration

    def timed_iteration(*a, **kw):
        counter = _flop_counter() if flops and len(times) == iters - 1 else None
        start = time.perf_counter()
        with counter or _null():
            out = inner(*a, **kw)
        times.append(time.perf_counter() - start)
        if counter is not None:
            counted[0] = counter.get_total_flops()
        return out

    method.iteration = timed_iteration
    method(read_images(instance_dir, resolution))
    return times, counted[0]


def _flop_counter():
    """torch's FLOP formulas (``torch.utils.flop_counter``) without FlopCounterMode's module tracker, whose
    backward hooks refuse ``torch.autograd.grad`` on a leaf (cloak's PGD step asks for ∇ₓ that way)."""
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

        def get_total_flops(self) -> int:
            return self.total

    return FlopCount()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def gemm_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GEMM FLOP/s of this machine on torch's current threads: best of ``repeats`` n×n matmuls."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def child(side: str, iters: int, flops: bool, folder: Path, cache: str, model: str) -> dict:
    import torch

    from cloak.models.handle import Models

    models = Models(cache_dir=Path(cache), device=torch.device("cpu"))
    sd = models.sd(model)
    resolution = sd.resolution
    instance_dir, class_dir = folder / "instance", folder / "class"
    baseline = rss_mib()
    if side == "released":
        times, counted = run_released(sd, instance_dir, class_dir, resolution, iters, flops)
    else:
        times, counted = run_cloak(models, model, cache, instance_dir, class_dir, resolution, iters, flops)
    row = {"side": side, "iteration_s": times, "peak_rss_mib": rss_mib(), "after_load_rss_mib": baseline,
           "threads": torch.get_num_threads()}
    if flops:
        row["flops"] = counted
        row["gemm_flops_per_s"] = gemm_peak_flops()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (one child per side each)")
    parser.add_argument("--iters", type=int, default=3, help="outer iterations per child (the first is not timed)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--class-images", type=int, default=4)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count and the GEMM probe")
    parser.add_argument("--model", default=MODEL, help="built-in model (tiny-sd for a quick check of the script)")
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)  # side, folder, flops (0/1)
    args = parser.parse_args()
    if args._child:
        side, folder, flops = args._child
        print(json.dumps(child(side, args.iters, flops == "1", Path(folder), args.cache, args.model)))
        return 0
    if args.iters < 2:
        parser.error("--iters must be at least 2 (the first iteration is not timed)")
    from _harness import native_resolution

    import torch

    from cloak.models.handle import Models

    resolution = native_resolution(Models(cache_dir=Path(args.cache)).resolve(args.model, "probe")[1])
    rows: dict[str, list[dict]] = {"released": [], "cloak": []}
    with tempfile.TemporaryDirectory(prefix="cloak-vs-released-") as tmp:
        write_inputs(Path(tmp), args.images, args.class_images, resolution)
        common = ["--iters", args.iters, "--cache", args.cache, "--model", args.model]
        for r in range(args.rounds):
            for side in ("released", "cloak") if r % 2 == 0 else ("cloak", "released"):
                row = run_child(__file__, ["--_child", side, tmp, "0", *common])
                rows[side].append(row)
                print(f"round {r + 1} {side:8s} s/iteration {[round(t, 2) for t in row['iteration_s']]} "
                      f"peak RSS {row['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
        flops = {}
        if not args.no_flops:
            for side in ("released", "cloak"):
                flops[side] = run_child(__file__, ["--_child", side, tmp, "1", *common])
    summary = {"model": args.model, "resolution": resolution, "images": args.images, "class_images": args.class_images,
               "schedule": "3 DreamBooth + 6 PGD + 3 DreamBooth per outer iteration",
               "threads": torch.get_num_threads()}
    for side, side_rows in rows.items():
        per_iter = [t for row in side_rows for t in row["iteration_s"][1:]]
        summary[side] = {"median_s_per_iteration": statistics.median(per_iter), "timed_iterations": len(per_iter),
                         "peak_rss_mib": max(row["peak_rss_mib"] for row in side_rows),
                         "after_load_rss_mib": max(row["after_load_rss_mib"] for row in side_rows)}
        if side in flops:
            f = flops[side]
            summary[side]["flops_per_iteration"] = f["flops"]
            summary[side]["gemm_peak_gflops"] = f["gemm_flops_per_s"] / 1e9
            summary[side]["flop_efficiency"] = (f["flops"] / summary[side]["median_s_per_iteration"]
                                                / f["gemm_flops_per_s"])
    summary["time_ratio_cloak_over_released"] = (summary["cloak"]["median_s_per_iteration"]
                                                 / summary["released"]["median_s_per_iteration"])
    summary["rss_ratio_cloak_over_released"] = summary["cloak"]["peak_rss_mib"] / summary["released"]["peak_rss_mib"]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"ASPL on {args.model} at {resolution} px, {args.images} images, {args.class_images} class images, "
          f"{summary['schedule']}, fp32 CPU, {summary['threads']} threads, {args.rounds} alternating rounds")
    print(f"{'side':<10} {'median s/iter':>14} {'peak RSS MiB':>13} {'GFLOP/iter':>11} {'FLOP eff.':>10}")
    for side in ("released", "cloak"):
        s = summary[side]
        gflop = f"{s['flops_per_iteration'] / 1e9:11.1f}" if "flops_per_iteration" in s else f"{'-':>11}"
        eff = f"{s['flop_efficiency']:10.1%}" if "flop_efficiency" in s else f"{'-':>10}"
        print(f"{side:<10} {s['median_s_per_iteration']:>14.2f} {s['peak_rss_mib']:>13.0f} {gflop} {eff}")
    print(f"time ratio cloak/released: {summary['time_ratio_cloak_over_released']:.2f} (target ≤ 0.5)")
    print(f"peak RSS ratio cloak/released: {summary['rss_ratio_cloak_over_released']:.2f} (target ≤ 1)")
    if "gemm_peak_gflops" in summary["cloak"]:
        print(f"fp32 GEMM peak on these threads: {summary['cloak']['gemm_peak_gflops']:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
