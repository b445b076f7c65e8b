"""PGD against a fixed (frozen) model, one image at a time in effect, several per forward pass.

Per-image methods (AdvDM, PhotoGuard, Mist) run several images through the model together for
speed. If every image drew its noise from one shared generator, image i's noise would depend on
its position in the set and on how many images came before it: protecting a folder and protecting
one of its files alone would give different perturbations, and ``--resume`` would change results.
So each image gets its own CPU generator, seeded from ``--seed`` and the image's own 8-bit pixels
(:func:`per_item_generator`): the stream follows the image, not its position, its batch or the shape
bucket it was run in, and not what the run drew before. Batches only share the forward pass; the
objective is a sum of per-image terms, so each image's gradient is its own. What remains
batch-dependent is floating-point rounding inside batched kernels, which the sign step can amplify
into a few changed levels: only ``batch_size=1`` is byte-identical whatever the other images are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cloak.adversarial.pgd import project

_MASK63 = (1 << 63) - 1


def pixels_key(pixels: torch.Tensor) -> bytes:
    """An image's identity for its random stream: sha256 of its 8-bit levels and shape (3×H×W in [-1,1])."""
    levels = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    digest = hashlib.sha256(repr(tuple(levels.shape)).encode())
    digest.update(levels.numpy().tobytes())
    return digest.digest()


def per_item_generator(seed: int, key: bytes | str, *, device="cpu") -> torch.Generator:
    """The random stream of one item: a generator seeded from (run seed, item identity).

    Every per-item method draws an item's randomness from this, never from one stream shared by the
    items, so a result does not depend on the order of the items, on how they are batched, or on
    which were skipped by ``--resume``. ``key`` is the item's identity (its content hash, or a name
    such as ``"<prompt>/<seed>"``); the step is the position in the item's own stream.
    """
    key = key.encode() if isinstance(key, str) else bytes(key)
    digest = hashlib.sha256(int(seed).to_bytes(8, "little", signed=True) + b"\0" + key).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & _MASK63)


class ImageStreams:
    """One independent random stream per image (see the module docstring)."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    @classmethod
    def for_images(cls, pixels: torch.Tensor, seed: int) -> ImageStreams:
        """One stream per image of ``pixels`` (B×3×H×W), from ``seed`` and the image's content."""
        if isinstance(seed, torch.Generator):
            raise TypeError("ImageStreams.for_images takes the run's seed (ctx.seed), not a generator: a draw "
                            "from a shared generator would depend on what was drawn before")
        return cls([per_item_generator(seed, pixels_key(image)) for image in pixels])

    def __len__(self) -> int:
        return len(self.generators)

    def subset(self, index: list[int]) -> ImageStreams:
        """The streams of some images (the same generator objects: draws advance them)."""
        return ImageStreams([self.generators[i] for i in index])

    def rand(self, shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
        """U[0,1) of ``shape`` per image, stacked: B×shape."""
        return torch.stack([torch.rand(shape, generator=g) for g in self.generators]).to(device, dtype)

    def randn(self, shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(device, dtype)

    def randint(self, high: int, device) -> torch.Tensor:
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self.generators]).to(device)

    def uniform_start(self, x0: torch.Tensor, eps: float) -> torch.Tensor:
        """Uniform random start in the ε-ball around ``x0``, clipped to [-1, 1]."""
        noise = self.rand(tuple(x0.shape[1:]), x0.device, x0.dtype)
        return project(x0 + (noise * 2 - 1) * eps, x0, eps)

    def draw(self, latent_shape: tuple[int, ...], scheduler, device):
        """One Monte-Carlo draw of L_dn's randomness (t, ε, posterior noise), each image from its stream."""
        from cloak.diffusion.loss import Draw

        t = self.randint(scheduler.config.num_train_timesteps, device)
        return Draw(t, self.randn(latent_shape, device), self.randn(latent_shape, device))


@dataclass
class PGDResult:
    pixels: torch.Tensor  # B×3×H×W in [-1, 1], fp32
    first_loss: torch.Tensor  # (B,) objective at the first step
    final_loss: torch.Tensor  # (B,) mean objective over the last 10 % of the steps (noisy objectives)
    steps: int


def per_image_pgd(
    x0: torch.Tensor,
    streams: ImageStreams,
    objective: Callable[[torch.Tensor, ImageStreams], torch.Tensor],
    *,
    steps: int,
    eps: float,
    alpha: float | Callable[[int], float],
    ascent: bool,
    random_start: bool,
    batch_size: int,
    task=None,
) -> PGDResult:
    """ℓ∞ PGD on ``objective`` (per-image values, shape (B,)), ``batch_size`` images per forward pass.

    ``x ← clip_[-1,1](x0 + clip_ε(x ± α_i·sign ∇ₓ objective − x0))``; ``alpha`` may be a schedule
    ``i ↦ α_i``. Pixels stay fp32 whatever the model's dtype, so small steps are not rounded away.
    ``task`` (a progress task) advances once per step of each batch.
    """
    step_size = alpha if callable(alpha) else (lambda i: alpha)
    x0 = x0.detach().float()
    outs, firsts, finals = [], [], []
    tail = max(1, steps // 10)
    for start in range(0, len(x0), batch_size):
        index = list(range(start, min(start + batch_size, len(x0))))
        chunk, chunk_streams = x0[index], streams.subset(index)
        x = chunk_streams.uniform_start(chunk, eps) if random_start else chunk.clone()
        history = []
        for i in range(steps):
            x = x.detach().requires_grad_(True)
            values = objective(x, chunk_streams)
            (grad,) = torch.autograd.grad(values.sum(), x)
            a = step_size(i)
            with torch.no_grad():
                x = project(x.detach() + (a if ascent else -a) * grad.sign(), chunk, eps)
            history.append(values.detach().float().cpu())
            if task is not None:
                task.advance(1, status=f"loss {float(values.detach().mean()):.4g}")
        outs.append(x.detach())
        if history:
            firsts.append(history[0])
            finals.append(torch.stack(history[-tail:]).mean(0))
    nan = torch.full((len(x0),), float("nan"))
    return PGDResult(torch.cat(outs), torch.cat(firsts) if firsts else nan, torch.cat(finals) if finals else nan,
                     steps)
