"""Surrogate models shared by the fine-tuning family of protections.

``cached_dreambooth``: a DreamBooth of the base model on a clean image set, trained once and stored
in the cache (FSMG's fully-trained surrogate θ_ref, protect.md §1; DLADiff's static surrogate UNet_s,
§9). The key covers everything the result depends on — the base model, the sha256 of the clean
images as 8-bit pixels at the working resolution, and every hyper-parameter including the seed — so
a second run on the same set reuses it and a changed recipe trains a new one. Weights are written as
safetensors into a temporary directory that is renamed into place (atomic; a concurrent writer that
wins the race is simply used).

``SnapshotPool``: preallocated weight buffers for snapshots of a model being trained (MetaCloak's
pool of DreamBooth checkpoints, §7) and for surrogates parked off the device (E-ASPL, §2). Loading
a snapshot copies into existing parameters; nothing is deep-copied inside a loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cloak.diffusion.class_images import class_image_plan, class_images, model_key
from cloak.diffusion.dreambooth import DreamBoothConfig, DreamBoothTrainer
from cloak.diffusion.loss import LatentCache
from cloak.diffusion.precision import DtypeLedger, autocast_dtype, to_master
from cloak.diffusion.precision import name as precision_name

log = logging.getLogger("cloak.diffusion")

FORMAT = 1  # bump when the stored layout or the training loop changes meaning


def pixels_sha256(pixels: torch.Tensor) -> str:
    """sha256 of images as the 8-bit levels they came from (B×3×H×W in [-1,1]); shape included."""
    q = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    digest = hashlib.sha256(repr(tuple(q.shape)).encode())
    digest.update(q.numpy().tobytes())
    return digest.hexdigest()


def surrogate_recipe(sd, clean_pixels: torch.Tensor, steps: int, cfg: DreamBoothConfig, *, batch_size: int,
                     n_class_images: int, class_image_steps: int, seed: int) -> dict[str, Any]:
    """Everything a cached surrogate depends on (its key is the hash of this)."""
    config = asdict(cfg)
    config["betas"] = list(config["betas"])
    # The base model by content (model_key), not by path: a folder replaced in place trains anew.
    return {"format": FORMAT, "base": model_key(sd),
            "prediction_type": sd.prediction_type, "images_sha256": pixels_sha256(clean_pixels),
            "n_images": int(clean_pixels.shape[0]), "resolution": int(clean_pixels.shape[-1]), "steps": int(steps),
            "batch_size": int(batch_size), "n_class_images": int(n_class_images),
            "class_image_steps": int(class_image_steps), "seed": int(seed), "dreambooth": config}


def recipe_key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]


def train_dreambooth(trainer: DreamBoothTrainer, instances: LatentCache, steps: int, batch_size: int,
                     generator: torch.Generator, bar=None) -> list[float]:
    """``steps`` DreamBooth steps of ``batch_size`` instance (+ as many class) images, reshuffled every
    epoch as a DataLoader with ``shuffle=True`` does (attack.md §1)."""
    n = len(instances)
    n_cls = len(trainer.class_latents) if trainer.class_latents is not None else 0
    batch = min(batch_size, n)
    order, cursor = [], n
    cls_order, cls_cursor = [], n_cls
    losses = []
    for _ in range(steps):
        idx = []
        for _ in range(batch):
            if cursor == n:
                order, cursor = torch.randperm(n, generator=generator).tolist(), 0
            idx.append(order[cursor])
            cursor += 1
        cls_idx = None
        if n_cls:
            cls_idx = []
            for _ in range(batch):
                if cls_cursor == n_cls:
                    cls_order, cls_cursor = torch.randperm(n_cls, generator=generator).tolist(), 0
                cls_idx.append(cls_order[cls_cursor])
                cls_cursor += 1
        losses.append(trainer.step(instances.sample(idx, generator), cls_idx))
        if bar is not None:
            bar.advance(1, status=f"loss {losses[-1]:.4f}")
    return losses


def cached_dreambooth(ctx, sd, clean_pixels: torch.Tensor, steps: int, cfg: DreamBoothConfig, *,
                      batch_size: int = 2, n_class_images: int = 200, class_image_steps: int = 50,
                      seed: int | None = None, info: dict | None = None) -> tuple[Any, Any]:
    """A DreamBooth of ``sd`` on ``clean_pixels`` for ``steps`` steps, from the cache when it exists.

    Args:
        ctx: the run context (cache_dir, device, resolution, seed, progress).
        sd: the base ``SDModel`` (left untouched; training happens on a copy).
        clean_pixels: B×3×H×W in [-1,1], the clean images of the subject (set A).
        steps: optimizer steps, already scaled by the caller (``ctx.iters``).
        cfg: the DreamBooth recipe (lr, prior weight, prompts, text encoder, bf16 weights).
        batch_size: instance images per step (as many class images join); attack.md §1a uses 2.
        n_class_images: class images for prior preservation (0 = no prior).
        class_image_steps: sampling steps used to make the class images.
        seed: seed of the surrogate's own generator (default ``ctx.seed``). The surrogate never draws
            from ``ctx.generator``, so a cache hit and a cache miss leave the run's randomness alike.
        info: if given, filled with ``key``, ``path``, ``cache_hit``, ``seconds`` (and ``final_loss``).

    Returns:
        (unet, text_encoder): frozen (no grad, eval) modules on ``ctx.device``, owned by the caller.
    """
    seed = ctx.seed if seed is None else int(seed)
    use_prior = n_class_images > 0 and cfg.prior_weight > 0
    # The class images this run really uses (--effort, the fast sampler, --class-dir) key the recipe.
    plan = class_image_plan(ctx, n_class_images, class_image_steps)
    recipe = surrogate_recipe(sd, clean_pixels, steps, cfg, batch_size=batch_size,
                              n_class_images=plan.count if use_prior else 0,
                              class_image_steps=plan.steps if use_prior else 0, seed=seed)
    compute = autocast_dtype(ctx.device, sd.unet.dtype)
    if compute is not None:  # autocast compute trains a (slightly) different surrogate than fp32
        recipe["compute"] = precision_name(compute)
    if use_prior:
        recipe["class_sampler"] = plan.sampler
        if plan.class_dir:
            recipe["class_dir"] = str(Path(plan.class_dir).resolve())
    key = recipe_key(recipe)
    folder = Path(ctx.cache_dir) / "surrogates" / model_key(sd) / key
    started = time.perf_counter()
    unet, text_encoder = sd.trainable_copy()
    # Master weights (fp32; bf16 only for --compat) before loading, so a cached fp32 surrogate stays fp32.
    to_master(list(unet.parameters()) + list(text_encoder.parameters()), cfg.bf16_weights)
    hit = _load(folder, unet, text_encoder)
    record: dict[str, Any] = {"key": key, "path": str(folder), "cache_hit": hit, "steps": steps}
    if not hit:
        gen = torch.Generator("cpu").manual_seed(seed)
        class_latents = None
        if use_prior:
            cls = class_images(sd, cfg.class_prompt, n_class_images, ctx.cache_dir, steps=class_image_steps,
                               resolution=ctx.resolution or clean_pixels.shape[-1], ctx=ctx)
            class_latents = LatentCache.encode(sd.vae, cls.to(ctx.device, sd.vae.dtype))
        instances = LatentCache.encode(sd.vae, clean_pixels.to(ctx.device, sd.vae.dtype))
        trainer = DreamBoothTrainer(sd, unet, text_encoder, cfg, class_latents=class_latents, generator=gen)
        with ctx.progress.task("surrogate dreambooth", steps) as bar:
            losses = train_dreambooth(trainer, instances, steps, batch_size, gen, bar)
        ledger = DtypeLedger()
        ledger.note_trainer(trainer)
        record["dtypes"] = ledger.record()
        del trainer  # drops the optimizer state; the modules stay with the caller
        record["final_loss"] = losses[-1] if losses else None
        _store(folder, unet, text_encoder, recipe)
    for module in (unet, text_encoder):
        module.requires_grad_(False)
        module.eval()
    record["seconds"] = round(time.perf_counter() - started, 3)
    log.info("surrogate %s %s (%s)", key, "loaded from cache" if hit else "trained and cached", folder)
    if info is not None:
        info.update(record)
    return unet, text_encoder


def _load(folder: Path, unet, text_encoder) -> bool:
    from safetensors.torch import load_model

    if not (folder / "recipe.json").is_file():
        return False
    device = str(next(unet.parameters()).device)
    try:
        load_model(unet, folder / "unet.safetensors", strict=True, device=device)
        load_model(text_encoder, folder / "text_encoder.safetensors", strict=True, device=device)
    except (OSError, RuntimeError, ValueError) as exc:  # a damaged entry is retrained, not trusted
        log.warning("cached surrogate in %s is unreadable (%s); training it again", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return False
    return True


def _store(folder: Path, unet, text_encoder, recipe: dict) -> None:
    from safetensors.torch import save_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_model(unet, str(staging / "unet.safetensors"))
        save_model(text_encoder, str(staging / "text_encoder.safetensors"))
        # recipe.json last: its presence marks a complete entry.
        (staging / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True), encoding="utf-8")
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "recipe.json").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process stored the same surrogate first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class SnapshotPool:
    """``slots`` preallocated copies of the parameters of some modules (e.g. UNet + text encoder).

    ``store_device`` defaults to the CPU when the modules live on an accelerator (snapshots of a full
    SD model are several GB each) and to the modules' own device otherwise.
    """

    def __init__(self, modules: tuple[torch.nn.Module, ...], slots: int,
                 store_device: torch.device | str | None = None):
        params = [p for m in modules for p in m.parameters()]
        device = params[0].device
        if store_device is None:
            store_device = "cpu" if device.type != "cpu" else device
        self.store_device = torch.device(store_device)
        self.slots = [[torch.empty_like(p, device=self.store_device) for p in params] for _ in range(slots)]
        self.filled = [False] * slots

    def __len__(self) -> int:
        return len(self.slots)

    @staticmethod
    def _params(modules) -> list[torch.Tensor]:
        return [p.data for m in modules for p in m.parameters()]

    @torch.no_grad()
    def save(self, slot: int, *modules: torch.nn.Module) -> None:
        _copy(self.slots[slot], self._params(modules))
        self.filled[slot] = True

    @torch.no_grad()
    def load(self, slot: int, *modules: torch.nn.Module) -> None:
        if not self.filled[slot]:
            raise RuntimeError(f"snapshot slot {slot} is empty")
        _copy(self._params(modules), self.slots[slot])


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if len(dst) != len(src):
        raise ValueError(f"parameter count mismatch: {len(dst)} vs {len(src)}")
    if dst and dst[0].device == src[0].device:
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s, non_blocking=True)
        if any(t.device.type == "cuda" for t in (dst[0], src[0])):
            torch.cuda.synchronize()
