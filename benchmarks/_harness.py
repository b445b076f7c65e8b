"""What the benchmarks share: each variant runs in a child process of the benchmark script (so its peak
memory is its own), the default cache, peak-memory readings, and the random inputs built from a model's
own configuration.

Peak memory: on CUDA ``max_memory_allocated``; on CPU the peak RSS (``ru_maxrss``), optionally minus a
baseline read after the heavy imports, so it counts loaded weights and activations rather than libraries.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CACHE = os.environ.get("CLOAK_CACHE_DIR") or str(Path(tempfile.gettempdir()) / "cloak-bench-cache")


def run_child(script: str, args: list, check: bool = True) -> dict:
    """Run ``script ARGS`` in a fresh interpreter; its last stdout line is the JSON row. A failing child
    stops the benchmark with the child's stderr (a figure from a broken variant would mislead), or with
    ``check=False`` gives ``{"error": its last stderr line}`` so the other variants still run."""
    out = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        if not check:
            lines = out.stderr.strip().splitlines()
            return {"error": lines[-1] if lines else f"exit code {out.returncode}"}
        sys.stderr.write(out.stderr)
        raise SystemExit(1)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mib(device, baseline_mib: float = 0.0) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mib() - baseline_mib


def native_resolution(model_dir: Path) -> int:
    """SD's pixel resolution from the UNet and VAE configs, without loading the weights (loading the UNet
    would inflate the peak memory of methods that use the VAE alone)."""
    unet_cfg = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    vae_cfg = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    return unet_cfg["sample_size"] * 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def random_image_set(n_images: int, resolution: int, generator):
    """An ImageSet of uniform noise in [-1, 1]: speed and memory do not depend on the content."""
    import torch

    from cloak.io.images import ImageItem, ImageSet

    pixels = torch.rand(n_images, 3, resolution, resolution, generator=generator).mul(2).sub(1)
    items = [ImageItem(f"img{i}", Path(f"img{i}.png"), (resolution, resolution), "") for i in range(n_images)]
    return ImageSet(items, list(pixels))  # one 3×H×W tensor per image


def timed(fn, repeats: int, device, warmup: int = 1) -> float:
    """Mean seconds per call of ``fn`` over ``repeats`` calls, after ``warmup`` untimed calls (lazy
    allocations, optimizer state); CUDA work is synchronised at both ends."""
    import time

    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def run_context(models, model_id: str, device, generator, resolution: int, cache: str, progress):
    """The RunContext a verb would build: fp32, seed 0, no reference set."""
    import torch

    from cloak.methods import RunContext

    return RunContext(models=models, model=model_id, device=device, dtype=torch.float32, seed=0, generator=generator,
                      resolution=resolution, cache_dir=Path(cache), progress=progress, extras={})


def random_protect_run(model_id: str, n_images: int, cache: str, device, progress):
    """(images, context) for running a protect method class directly: a random set at the model's native
    resolution (read from its configs, so no weights load here) and the context a verb would build. On CUDA
    the peak-memory counter starts here."""
    import torch

    from cloak.models.handle import Models

    models = Models(cache_dir=Path(cache), device=device)
    resolution = native_resolution(models.resolve(model_id, "probe")[1])
    generator = torch.Generator().manual_seed(0)
    images = random_image_set(n_images, resolution, generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return images, run_context(models, model_id, device, generator, resolution, cache, progress)
