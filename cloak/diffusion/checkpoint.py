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
            theirs, ours = _flat(state.get("identity", {})), _flat(json.loads(json.dumps(self.identity, default=str)))
            changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise UsageError(f"the training checkpoint in {self.directory} was made with other settings "
                             f"(differs in: {', '.join(changed) or 'unknown'})",
                             hint="drop --resume (or delete the .checkpoint directory) to start over")
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
