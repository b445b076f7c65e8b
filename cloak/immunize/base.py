"""The immunize interface: a method turns a base model's UNet into one that resists personalization
on a subject, and the pieces a long training run needs (checkpoints, resumable data order).

A method takes the subject's images (and optionally the paired safe set), trains, and returns the
new UNet; ``cloak.immunize.run`` writes the model directory and the report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from cloak.errors import UsageError
from cloak.io.images import ImageSet
from cloak.methods import Method

log = logging.getLogger("cloak.immunize")

# Safe images are drawn from seeds far from the class images' (seed i → class image i), so the
# paired set never repeats a prior-preservation image.
SAFE_SEED_OFFSET = 1_000_000


@dataclass
class ImmunizeResult:
    unet: Any  # the immunized UNet (fp32 master weights)
    summary: dict[str, Any] = field(default_factory=dict)
    safe_paths: list[str] = field(default_factory=list)  # the safe image paired with each subject image


class ImmunizeMethod(Method):
    # Name of the option that is the method's main iteration count.
    steps_option: ClassVar[str | None] = None
    default_model: ClassVar[str | None] = None

    def __call__(self, subject: ImageSet, safe: ImageSet | None = None,
                 checkpoints: Checkpoints | None = None) -> ImmunizeResult:
        raise NotImplementedError


class ShuffledLoader:
    """An endless stream of indices in shuffled epochs (a DataLoader with ``shuffle=True`` that is
    iterated forever), drawn from an explicit generator; its position can be saved and restored."""

    def __init__(self, n: int, generator: torch.Generator):
        if n < 1:
            raise ValueError("a loader needs at least one item")
        self.n = n
        self.generator = generator
        self.order: list[int] = []
        self.cursor = 0

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.cursor >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
                self.cursor = 0
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "order": list(self.order), "cursor": self.cursor}

    def restore(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n:
            raise UsageError(f"checkpoint loader covers {state['n']} items, this run has {self.n}")
        self.order, self.cursor = list(state["order"]), int(state["cursor"])


class Checkpoints:
    """Periodic checkpoints of a long training run, in a hidden staging directory next to the output.

    One file, ``checkpoint.safetensors``: every tensor (weights, optimizer moments, RNG state) plus
    JSON metadata (iteration, data order, loss history, the run's fingerprint). It is written to a
    temporary name, synced and renamed, so an interruption at any moment — Ctrl-C included — leaves
    the previous checkpoint intact. No pickle is involved in either direction.
    """

    FILE = "checkpoint.safetensors"

    def __init__(self, folder: Path, every: int, fingerprint: dict[str, Any], *, resume: bool):
        self.folder = Path(folder)
        self.every = int(every)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.resume = resume
        self.saved = 0

    @property
    def path(self) -> Path:
        return self.folder / self.FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def due(self, done: int, total: int) -> bool:
        """After ``done`` of ``total`` iterations: save every ``every`` (not after the last one —
        the finished model is written instead)."""
        return self.every > 0 and done < total and done % self.every == 0

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        metadata = {"format": "cloak.checkpoint/1", "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                    "state": json.dumps(state)}
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            save_file(cpu, tmp, metadata=metadata)
            with open(tmp, "rb") as fh:  # on disk before it replaces the previous checkpoint
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.saved += 1
        log.info("checkpoint after iteration %s written to %s", state.get("iteration"), self.path)
        return self.path

    def check(self) -> dict[str, Any] | None:
        """The last checkpoint's state (metadata only, cheap), or None; a different run's is a usage error."""
        from safetensors import SafetensorError, safe_open

        if not self.exists():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                metadata = fh.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"cannot read the checkpoint {self.path}: {exc}",
                             hint="pass --force to start over") from None
        if metadata.get("format") != "cloak.checkpoint/1":
            raise UsageError(f"{self.path} is not a cloak checkpoint", hint="pass --force to start over")
        theirs = json.loads(metadata.get("fingerprint", "{}"))
        if theirs != self.fingerprint:
            keys = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            raise UsageError(f"the checkpoint in {self.folder} was made by a run with different settings "
                             f"(differs in: {', '.join(keys)})",
                             hint="repeat the original command with --resume, or pass --force to start over")
        return json.loads(metadata["state"])

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The last checkpoint (tensors on CPU, state), or None; a different run's is a usage error."""
        from safetensors.torch import load_file

        state = self.check()
        if state is None:
            return None
        return load_file(str(self.path)), state

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def paired_safe_images(sd, prompt: str, n: int, cache_dir: Path, *, steps: int, guidance: float = 7.5,
                       resolution: int | None = None) -> tuple[torch.Tensor, list[Path]]:
    """``n`` images of the class prompt from the base model, one per subject image, cached [PROP].

    The released code ships a hand-made ``paired_set/<subject>``; without one, the base model's own
    samples of the class are the natural "other members of the class". Image i comes from seed
    ``SAFE_SEED_OFFSET + i``: cached per (base model, prompt, resolution, steps) and distinct from the
    class images used for prior preservation.
    """
    from cloak.diffusion.class_images import model_key
    from cloak.diffusion.sampling import build_pipeline, generate, slug
    from cloak.io.images import read_images, write_png

    resolution = resolution or sd.resolution
    folder = Path(cache_dir) / "safe-images" / model_key(sd) / f"{slug(prompt)}-{resolution}px-{steps}st"
    missing = [i for i in range(n) if not (folder / f"{i}.png").is_file()]
    if missing:
        log.info("generating %d paired safe images for %r with %s into %s", len(missing), prompt, sd.id, folder)
        pipe = build_pipeline(sd)

        def save(k: int, arr) -> None:
            write_png(folder / f"{missing[k]}.png", arr, force=True)

        generate(pipe, prompt, [SAFE_SEED_OFFSET + i for i in missing], steps=steps, guidance=guidance,
                 resolution=resolution, on_image=save)
    paths = [folder / f"{i}.png" for i in range(n)]
    return read_images(folder, resolution, paths=paths).pixels, paths
