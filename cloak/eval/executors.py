"""Where the steps run: ``local`` (this process, models kept warm) or ``ray`` (a Ray cluster).

Both hand each finished step's record to ``on_step(step, record)`` as soon as it exists. Neither decides
more than the order of submission: the local executor walks the cells depth first (a cell's scores come
as early as possible, so an interrupted plan has whole cells to show); the Ray executor submits every
step at once, upstream first, and lets Ray run each when its inputs are ready.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloak.eval.cells import Cell, Step, cached, run_step, step_order
from cloak.errors import UsageError

OnStep = Callable[[Step, dict[str, Any]], None]
RAY_EXTRA = "cluster"


def run_local(steps: dict[str, Step], cells: list[Cell], on_step: OnStep) -> dict[str, dict[str, Any]]:
    """One process, one device: every verb call shares one model memo (one SD load for the whole plan)."""
    from cloak.models.handle import warm_models

    results: dict[str, dict[str, Any]] = {}
    with warm_models():
        for cell in cells:
            for key in cell.steps:
                if key in results:
                    continue
                step = steps[key]
                upstream = [results[step.upstream]] if step.upstream else []
                results[key] = run_step(step, *upstream)
                on_step(step, results[key])
    return results


class StepWorker:
    """A Ray actor: one per device, each keeping its models warm across the steps it runs."""

    def __init__(self):
        from cloak.models.handle import warm_models

        self._warm = warm_models()
        self._warm.__enter__()  # held for the actor's life

    def run(self, step: Step, *upstream: dict[str, Any]) -> dict[str, Any]:
        return run_step(step, *upstream)

    def pid(self) -> int:
        return os.getpid()


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray, which is not installed",
                         hint=f"pip install 'cloak[{RAY_EXTRA}]' (or pip install 'ray>=2.9')") from None
    return ray


def _worker_env() -> dict[str, str]:
    """Workers import the cloak the driver runs and see the same cache and offline settings."""
    import cloak

    root = str(Path(cloak.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k.startswith(("CLOAK_", "HF_", "TRANSFORMERS_", "XDG_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return env


def run_ray(steps: dict[str, Step], cells: list[Cell], on_step: OnStep, *, address: str | None = None,
            workers: int | None = None, num_gpus: float | None = None, num_cpus: float | None = None
            ) -> dict[str, dict[str, Any]]:
    """Each step a Ray task on one of the device actors; a step's upstream is passed as its object ref, so
    Ray starts it when that step is done (and a protect step feeds its purifiers as soon as it finishes).

    Steps are submitted upstream first: an actor runs its tasks in submission order, and every task's
    inputs were submitted before it, so the queue always moves. A cluster this call started is shut
    down at the end; one it connected to (``address``) is left running, its actors removed.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": _worker_env()}, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
        started = True
    actors: list[Any] = []
    try:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        if num_gpus is None:
            num_gpus = 1.0 if gpus else 0.0
        if num_cpus is None:
            num_cpus = 1.0
        if workers is None:
            workers = int(gpus // num_gpus) if num_gpus else int(float(resources.get("CPU", 1)) // num_cpus)
        workers = max(1, workers)
        actor_cls = ray.remote(StepWorker)
        actors = [actor_cls.options(num_gpus=num_gpus, num_cpus=num_cpus,
                                    runtime_env={"env_vars": _worker_env()}).remote() for _ in range(workers)]
        refs: dict[str, Any] = {}
        results: dict[str, dict[str, Any]] = {}
        pending: dict[Any, Step] = {}
        turn = 0
        for step in step_order(steps):
            done = cached(step)
            if done is not None:
                refs[step.key] = results[step.key] = done
                on_step(step, done)
                continue
            upstream = [refs[step.upstream]] if step.upstream else []
            ref = actors[turn % len(actors)].run.remote(step, *upstream)
            turn += 1
            refs[step.key] = ref
            pending[ref] = step
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                step = pending.pop(ref)
                results[step.key] = ray.get(ref)
                on_step(step, results[step.key])
        return results
    finally:
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 — already gone
                pass
        if started:
            ray.shutdown()
