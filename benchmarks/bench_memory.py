#!/usr/bin/env python3
"""Memory tiers of ASPL: peak memory of one outer iteration, and what the LoRA surrogate costs in efficacy.

1. Peak memory of one ASPL outer iteration (published schedule: 3 DreamBooth steps of f' on the clean set,
   6 PGD steps on the whole set, 3 DreamBooth steps of f on the poison; one instance + one class image per
   DreamBooth step) on ``sd21-shaped`` (SD 2.1-base tensor shapes, random weights) at 512², for
   {fp32, --dtype bf16} × {--memory default, --memory low}. Each configuration runs in a fresh child
   process: on CPU the figure is the peak resident set (ru_maxrss) — the proxy for accelerator memory —
   also shown minus the RSS after imports (libraries); on CUDA ``max_memory_allocated``.
   Class images are random pixels (generating 200 of them at 512² is not what is measured).
   Per phase (DreamBooth of f', the PGD steps, DreamBooth of f): the phase's own peak (CPU: VmHWM reset through
   /proc/self/clear_refs; set MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS) and the full-size
   state alive as it starts (weights of f' and f, weight gradients, AdamW state).

2. Efficacy cost of the LoRA surrogate on tiny-sd, same seeds and options (lr 1e-4, η = 0.1 as the tiny
   efficacy tests; random weights move nothing at 5e-7): full-weight ASPL, ASPL with ``-o surrogate=lora``
   (two adapter sets, f' a copy of f) and ``aspl-lora`` (released: f' is f). For each: the method's own
   PGD objective — L_dn of its final learner on the protected set, fixed draws — minus the same on ±ε
   random-sign noise, and the base model's L_dn on the protected set minus on noise (one common judge).

    python benchmarks/bench_memory.py                                   # the lead's idle run (slow on CPU)
    python benchmarks/bench_memory.py --model mid-sd --resolution 128 --images 2 --surrogate-steps 1 \\
        --pgd-steps 1 --seeds 0                                         # a quick check that it works
    python benchmarks/bench_memory.py --skip-efficacy / --skip-memory / --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _harness import DEFAULT_CACHE, peak_mib, rss_mib, run_child  # noqa: E402

CONFIGS = [("fp32", "default"), ("bf16", "default"), ("fp32", "low"), ("bf16", "low")]


def _context(model_id: str, dtype_name: str, tier: str, resolution: int, cache: str):
    import torch

    from cloak._progress import Progress
    from cloak.methods import RunContext
    from cloak.models.handle import Models

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    models = Models(cache_dir=Path(cache), device=device, dtype=dtype)
    models.memory = tier
    return RunContext(models=models, model=model_id, device=device, dtype=dtype, seed=0,
                      generator=torch.Generator().manual_seed(0), resolution=resolution, cache_dir=Path(cache),
                      progress=Progress())


def memory_child(model_id: str, dtype_name: str, tier: str, resolution: int, n_images: int, n_db: int, n_pgd: int,
                 cache: str) -> dict:
    """One ASPL outer iteration in this process; its peak memory."""
    import torch

    from cloak.adversarial.groups import Groups
    from cloak.diffusion import LatentCache
    from cloak.diffusion.lora_surrogate import adapter_megabytes
    from cloak.diffusion.memory import tier_options
    from cloak.protect.aspl import Aspl

    ctx = _context(model_id, dtype_name, tier, resolution, cache)
    device = ctx.device
    base_rss = rss_mib()  # libraries imported, nothing loaded yet
    options = {"class_images": 1, "iterations": 1, "surrogate_steps": n_db, "pgd_steps": n_pgd,
               **tier_options(tier, Aspl.Options)}
    method = Aspl(Aspl.Options(**options), ctx)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(n_images, 3, resolution, resolution, generator=gen) * 2 - 1
    sd = ctx.models.sd(model_id)
    loaded_rss = rss_mib()

    def random_class_latents(sd_):  # class images: random pixels through the VAE, one per instance image
        with torch.no_grad():
            cls = torch.rand(n_images, 3, resolution, resolution, generator=gen) * 2 - 1
            return LatentCache.encode(sd_.vae, cls.to(device, ctx.dtype), batch_size=1)

    method.class_latents = random_class_latents
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    x0 = Groups.of(pixels, device, torch.float32)
    clean = pixels.to(device)
    method._crop_size = resolution
    learner, surrogate = method.surrogate_pair(sd, clean)
    method.prepare(sd, x0)
    method.lend_base(surrogate)
    state = {"ref": method._ref_latents, "cursors": [0, 0]}
    phases, peaks_seen = _phase_peaks(method, learner, surrogate, device, base_rss)
    method.iteration(sd, learner, surrogate, x0.clone(), x0, state)
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = max([peak_mib(device), *peaks_seen])  # the phases restart the peak reading: the highest one counts
    trainers = method.__dict__.get("_trainers", [])
    return {"model": model_id, "dtype": dtype_name, "memory": tier, "resolution": resolution, "images": n_images,
            "device": str(device), "peak_mib": round(peak, 1),
            "peak_minus_libraries_mib": round(peak - base_rss, 1) if device.type == "cpu" else round(peak, 1),
            "after_load_mib": round(loaded_rss, 1) if device.type == "cpu" else None,
            "surrogate": options.get("surrogate", "full"), "pgd_batch": options.get("pgd_batch", 0),
            "trained_mib": round(sum(p.numel() * p.element_size() for t in {id(t): t for t in trainers}.values()
                                     for p in t.params) / 2**20, 2),
            "adapter_mib": round(adapter_megabytes(trainers), 3) if options.get("surrogate") == "lora" else None,
            "dtypes": method.dtype_record(), "phases": phases}


def _reset_peak(device) -> bool:
    """Start a new peak reading: CUDA's allocator statistics, or the kernel's VmHWM (/proc/self/clear_refs)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _current_and_peak_mib(device) -> tuple[float, float]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    found = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def _phase_peaks(method, learner, surrogate, device, base_rss: float) -> tuple[list[dict], list[float]]:
    """Wrap the iteration's three phases (DreamBooth of f', the PGD steps, DreamBooth of f) so each reports its
    own peak and what full-size state is alive as it starts (weights of f' and f, weight gradients, AdamW's
    moments), in MiB; on CPU both less the RSS after imports. Filled in as the iteration runs; the second list
    gets the raw peak reading before each restart of it (the run's overall peak is the highest)."""
    import torch

    rows: list[dict] = []
    seen: list[float] = []
    names = iter(["dreambooth f'", "pgd", "dreambooth f"])
    offset = base_rss if device.type == "cpu" else 0.0

    def mib(tensors) -> float:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
        return round(sum(storages.values()) / 2**20, 1)

    def alive() -> dict:
        params = learner.params + surrogate.params
        state = [v for t in {id(learner): learner, id(surrogate): surrogate}.values()
                 for s in t.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
        return {"f'_and_f_weights": mib(params), "grads": mib(p.grad for p in params), "adamw_state": mib(state)}

    def wrap(fn):
        def phase(*a, **k):
            row = {"phase": next(names, "other"), "alive_at_start_mib": alive()}
            current, peak = _current_and_peak_mib(device)
            row["start_mib"] = round(current - offset, 1)
            seen.append(peak)
            if not _reset_peak(device):
                return fn(*a, **k)
            out = fn(*a, **k)
            peak = _current_and_peak_mib(device)[1]
            seen.append(peak)
            row["peak_mib"] = round(peak - offset, 1)
            rows.append(row)
            return out
        return phase

    method.tune = wrap(method.tune)
    method.pgd = wrap(method.pgd)
    return rows, seen


def _objective(method, trainer, sd, x, n_draws: int = 24) -> float:
    """L_dn(trainer's model, x, c_inst) averaged over fixed draws (the generator is restored after)."""
    import torch

    from cloak.diffusion import encode_prompts

    saved, method.ctx.generator = method.ctx.generator, torch.Generator().manual_seed(123)
    try:
        if trainer is not None:
            trainer.freeze()
        unet = trainer.unet if trainer is not None else sd.unet
        te = trainer.text_encoder if trainer is not None else sd.text_encoder
        with torch.no_grad():
            text = encode_prompts(sd.tokenizer, te, [method.opts.instance_prompt])
            total = sum(float(method.loss(sd, unet, x, text, method.draw(sd, x))) for _ in range(n_draws))
        return total / n_draws
    finally:
        method.ctx.generator = saved


def efficacy(seeds: list[int], cache: str, iterations: int, draws: int = 24) -> list[dict]:
    import torch

    from cloak.diffusion.lora_surrogate import remove_lora
    from cloak.io.images import ImageItem, ImageSet
    from cloak.protect.aspl import Aspl
    from cloak.protect.aspl_lora import AsplLora

    rows = []
    common = {"class_images": 0, "iterations": iterations, "surrogate_steps": 2, "pgd_steps": 4, "lr": 1e-4,
              "eps": 0.1, "alpha": 0.01, "unit": "m11"}
    variants = [("full", Aspl, {}), ("surrogate=lora", Aspl, {"surrogate": "lora"}), ("aspl-lora", AsplLora, {})]
    for seed in seeds:
        gen = torch.Generator().manual_seed(1000 + seed)
        x0 = torch.rand(3, 3, 64, 64, generator=gen) * 2 - 1
        x0 = torch.nn.functional.avg_pool2d(x0, 5, 1, 2)  # smooth, image-like
        signs = torch.randint(0, 2, x0.shape, generator=gen) * 2 - 1
        noise = (x0 + 0.1 * signs).clamp(-1, 1)
        items = [ImageItem(f"img{i}", Path(f"img{i}.png"), (64, 64), "") for i in range(3)]
        for label, cls, extra in variants:
            ctx = _context("tiny-sd", "fp32", "default", 64, cache)
            ctx.models.tiny = True
            ctx.seed, ctx.generator = seed, torch.Generator().manual_seed(seed)
            method = cls(cls.Options(**common, **extra), ctx)
            result = method(ImageSet(items, x0.clone()))
            protected = result.pixels if torch.is_tensor(result.pixels) else torch.stack(list(result.pixels))
            sd = ctx.models.sd("tiny-sd")
            learner = method._trainers[0]
            own = {name: _objective(method, learner, sd, x, draws) for name, x in
                   (("clean", x0), ("noise", noise), ("protected", protected))}
            remove_lora(sd)
            base = {name: _objective(method, None, sd, x, draws) for name, x in (("noise", noise), ("protected", protected))}
            rows.append({"seed": seed, "variant": label, "own_clean": own["clean"], "own_noise": own["noise"],
                         "own_protected": own["protected"], "own_gain_over_noise": own["protected"] - own["noise"],
                         "base_gain_over_noise": base["protected"] - base["noise"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd21-shaped")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--surrogate-steps", type=int, default=3)
    parser.add_argument("--pgd-steps", type=int, default=6)
    parser.add_argument("--configs", nargs="*", default=None, help="subset, e.g. fp32:default bf16:low")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--efficacy-iterations", type=int, default=4)
    parser.add_argument("--draws", type=int, default=24, help="fixed draws per objective evaluation")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-efficacy", action="store_true")
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(memory_child(args.model, args._child[0], args._child[1], args.resolution, args.images,
                                      args.surrogate_steps, args.pgd_steps, args.cache)))
        return 0
    out: dict = {}
    if not args.skip_memory:
        configs = [tuple(c.split(":")) for c in args.configs] if args.configs else CONFIGS
        out["memory"] = [run_child(__file__, ["--_child", d, t, "--model", args.model, "--resolution",
                                              args.resolution, "--images", args.images, "--surrogate-steps",
                                              args.surrogate_steps, "--pgd-steps", args.pgd_steps, "--cache",
                                              args.cache], check=False) for d, t in configs]
    if not args.skip_efficacy:
        out["efficacy"] = efficacy(args.seeds, args.cache, args.efficacy_iterations, args.draws)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if "memory" in out:
        print(f"peak memory of one ASPL outer iteration ({args.model}, {args.resolution}², {args.images} images, "
              f"{args.surrogate_steps}+{args.pgd_steps}+{args.surrogate_steps} steps)")
        print(f"{'dtype':<6} {'memory':<8} {'surrogate':<10} {'peak MiB':>10} {'- libs MiB':>11} {'trained MiB':>12}")
        for r in out["memory"]:
            if "error" in r:
                print(f"  error: {r['error']}")
                continue
            print(f"{r['dtype']:<6} {r['memory']:<8} {r['surrogate']:<10} {r['peak_mib']:>10.0f} "
                  f"{r['peak_minus_libraries_mib']:>11.0f} {r['trained_mib']:>12.1f}")
        print("(CPU: peak RSS, the proxy for accelerator memory; CUDA: max_memory_allocated)")
        print("\nper phase (peak within the phase; alive at its start: f' and f weights / weight gradients / "
              "AdamW state)")
        for r in out["memory"]:
            for ph in r.get("phases", []):
                a = ph["alive_at_start_mib"]
                weights = a["f'_and_f_weights"]
                print(f"{r['dtype']:<6} {r['memory']:<8} {ph['phase']:<14} peak {ph['peak_mib']:>9.0f} MiB   start "
                      f"{ph['start_mib']:>9.0f}   weights {weights:>8.0f} grads {a['grads']:>7.0f} "
                      f"adamw {a['adamw_state']:>8.0f}")
    if "efficacy" in out:
        print("\nefficacy of the LoRA surrogate on tiny-sd (objective gain of protected over ±ε sign noise; "
              "same seeds and options)")
        print(f"{'variant':<16} {'seed':>4} {'own objective gain':>19} {'base-model gain':>16}")
        for r in out["efficacy"]:
            print(f"{r['variant']:<16} {r['seed']:>4} {r['own_gain_over_noise']:>19.4f} "
                  f"{r['base_gain_over_noise']:>16.4f}")
        for label in dict.fromkeys(r["variant"] for r in out["efficacy"]):
            rows = [r for r in out["efficacy"] if r["variant"] == label]
            own = sum(r["own_gain_over_noise"] for r in rows) / len(rows)
            base = sum(r["base_gain_over_noise"] for r in rows) / len(rows)
            print(f"  mean {label:<16} own {own:.4f}   base {base:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
