"""Resumable training loops: a checkpoint of everything an interrupted run needs to continue exactly.

A checkpoint holds the trainable tensors, the optimizer state, the step, the state of the run's one
random generator and the loop's own bookkeeping (data order, cursors, losses). It is written every
N steps into ``<output>/.checkpoint/`` and read back by ``--resume``; a resumed run then takes the
same steps with the same draws as an uninterrupted one, so it ends with the same bytes.

The directory is replaced atomically (a new one is written, then renamed over the old), so a crash
while saving leaves the previous checkpoint intact. A fingerprint of what determines training
(method, options, base model, seed, input image hashes, step count) is stored with it: resuming
with different settings is a usage error rather than a silently mixed model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cloak.errors import UsageError

log = logging.getLogger("cloak.diffusion")

STATE = "state.json"
TENSORS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _mismatch(directory: Path, theirs: dict, ours: dict, what: str) -> UsageError:
    theirs, ours = _flat(theirs), _flat(json.loads(json.dumps(ours, default=str)))
    changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    return UsageError(f"the {what} in {directory} was made with other settings "
                      f"(differs in: {', '.join(changed) or 'unknown'})",
                      hint=f"drop --resume (or delete the {directory.name} directory) to start over")


class TrainingCheckpoint:
    """Save / restore one training loop's state in ``directory`` every ``every`` steps."""

    def __init__(self, directory: Path, identity: dict[str, Any], every: int, *, resume: bool):
        self.directory = Path(directory)
        self.identity = identity
        self.fingerprint = fingerprint(identity)
        self.every = every
        self.resume = resume

    @classmethod
    def for_run(cls, ctx, identity: dict[str, Any], every: int) -> TrainingCheckpoint | None:
        """The checkpoint of this run, or None when the runner gave no place for one or ``every`` is 0."""
        directory = ctx.extras.get("checkpoint_dir")
        if directory is None or every <= 0:
            return None
        return cls(Path(directory), identity, every, resume=bool(ctx.extras.get("resume")))

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def save(self, step: int, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
             generator: torch.Generator, loop: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        parent = self.directory.parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f"{self.directory.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            tensors = {f"param.{i}": p.detach().contiguous().cpu() for i, p in enumerate(params)}
            tensors["rng"] = generator.get_state()
            save_file(tensors, str(staging / TENSORS))
            torch.save(optimizer.state_dict(), staging / OPTIMIZER)
            state = {"step": step, "fingerprint": self.fingerprint, "identity": self.identity, "loop": loop}
            (staging / STATE).write_text(json.dumps(state, default=str), encoding="utf-8")
            old = parent / f"{self.directory.name}.old-{os.getpid()}"
            if self.directory.exists():
                self.directory.rename(old)
            staging.rename(self.directory)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("checkpoint at step %d written to %s", step, self.directory)

    def restore(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> tuple[int, dict[str, Any]] | None:
        """Load a matching checkpoint into ``params``/``optimizer``/``generator``: (step, loop state).

        None when not resuming or there is none. A checkpoint made with other settings is an error.
        """
        if not self.resume or not (self.directory / STATE).is_file():
            if self.resume:
                log.info("--resume: no training checkpoint in %s; training from the start", self.directory)
            return None
        from safetensors.torch import load_file

        state = json.loads((self.directory / STATE).read_text(encoding="utf-8"))
        if state.get("fingerprint") != self.fingerprint:
            raise _mismatch(self.directory, state.get("identity", {}), self.identity, "training checkpoint")
        tensors = load_file(str(self.directory / TENSORS))
        if len(tensors) - 1 != len(params):
            raise UsageError(f"the training checkpoint in {self.directory} does not match this model")
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
        optimizer.load_state_dict(torch.load(self.directory / OPTIMIZER, map_location="cpu", weights_only=True))
        generator.set_state(tensors["rng"])
        log.info("resuming training at step %d from %s", state["step"], self.directory)
        return int(state["step"]), state.get("loop", {})

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class LoopCheckpoint:
    """The state of a group protect method's outer loop in one file, ``<output>/.cloak-state/state.pt``.

    Same contract as :class:`TrainingCheckpoint` (fingerprinted settings, the run's generator state,
    the loop's bookkeeping) for loops that hold several models or none: the caller hands named tensors
    (the perturbed set, surrogate weights, optimizer state dicts) and gets them back. The file is
    written to a temporary name and moved over the old one with ``os.replace``, so a kill at any moment
    leaves either the previous checkpoint or the new one, never half a file. ``progress.json`` beside it
    says which iteration it holds (for people and for the interrupt message).
    """

    FILE = "state.pt"
    INFO = "progress.json"
    # A save is skipped while less time than this many times the last save's cost has passed since it: the
    # checkpoint then costs at most ~1/(1 + COST_RATIO) of the run. A tiny model saves after every unit; ASPL's
    # surrogate on SD 2.1 (a 4.9 GB file) took seconds to write against 2.6 s per outer iteration on an H200,
    # so it saves about every 10 iterations' time there, and an interrupt redoes at most that much.
    COST_RATIO = 9.0

    def __init__(self, directory: Path | None, identity: dict[str, Any], *, resume: bool, unit: str):
        self.directory = Path(directory) if directory is not None else None
        self.identity = identity
        self.fingerprint = fingerprint(identity)
        self.resume = resume
        self.unit = unit
        self._last_end: float | None = None  # time.monotonic() when the last save ended
        self._last_cost = 0.0  # seconds the last save took

    @classmethod
    def for_run(cls, ctx, identity: dict[str, Any], unit: str) -> LoopCheckpoint:
        """This run's checkpoint; a disabled one (saves and restores nothing) when the runner gave no place."""
        extras = getattr(ctx, "extras", None) or {}
        return cls(extras.get("state_dir"), identity, resume=bool(extras.get("resume")), unit=unit)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _replace(self, name: str, write) -> None:
        tmp = self.directory / f".{name}.tmp-{os.getpid()}"
        try:
            write(tmp)
            os.replace(tmp, self.directory / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def save(self, count: int, total: int, generator: torch.Generator, tensors: dict[str, Any],
             loop: dict[str, Any]) -> None:
        """Checkpoint after ``count`` of ``total`` units; ``tensors`` may nest lists/dicts of tensors."""
        if not self.enabled:
            return
        start = time.monotonic()
        if self._last_end is not None and start - self._last_end < self.COST_RATIO * self._last_cost:
            return  # a resumed run only redoes the units since the last save: same draws, same bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {"fingerprint": self.fingerprint, "count": count, "rng": generator.get_state(),
                   "tensors": _to_cpu(tensors), "loop": loop}
        self._replace(self.FILE, lambda path: torch.save(payload, path))
        info = {"unit": self.unit, "done": count, "total": total, "fingerprint": self.fingerprint,
                "identity": self.identity}
        self._replace(self.INFO, lambda path: path.write_text(json.dumps(info, default=str), encoding="utf-8"))
        self._last_end = time.monotonic()
        self._last_cost = self._last_end - start
        log.debug("checkpoint: %s %d of %d saved in %s (%.2f s)", self.unit, count, total, self.directory,
                  self._last_cost)

    def restore(self, generator: torch.Generator) -> dict[str, Any] | None:
        """The saved state ({count, tensors, loop}) with ``generator`` set to the saved state; None when not
        resuming or nothing was saved. A checkpoint made with other settings is a usage error."""
        if not (self.enabled and self.resume):
            return None
        path = self.directory / self.FILE
        if not path.is_file():
            log.info("--resume: no checkpoint in %s; starting from the beginning", self.directory)
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            theirs = {}
            info = self.directory / self.INFO
            if info.is_file():
                theirs = json.loads(info.read_text(encoding="utf-8")).get("identity", {})
            raise _mismatch(self.directory, theirs, self.identity, "checkpoint")
        generator.set_state(state["rng"])
        log.info("resuming after %s %d from %s", self.unit, state["count"], self.directory)
        return state

    def clear(self) -> None:
        """The run finished: its state is no longer needed."""
        if self.enabled:
            shutil.rmtree(self.directory, ignore_errors=True)


def _to_cpu(tree: Any) -> Any:
    """The tensors as CPU tensors torch.save can write without holding a second copy of a model in memory:
    a device tensor is copied once (``.cpu()``), a CPU tensor that owns its storage is written as it is, and only
    a view into a larger storage is cloned (torch.save would write the whole storage)."""
    if isinstance(tree, torch.Tensor):
        t = tree.detach()
        if t.device.type != "cpu":
            return t.cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
            return t.clone()
        return t
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree
