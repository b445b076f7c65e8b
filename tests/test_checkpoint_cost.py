"""The outer-loop checkpoint's cost: no second in-memory copy of what it writes, and at most ~10 % of the run's
time (a save is skipped while less than COST_RATIO × the last save's cost has passed since it)."""

from __future__ import annotations

import torch

from cloak.diffusion import checkpoint as ck_module
from cloak.diffusion.checkpoint import LoopCheckpoint, _to_cpu


def test_cpu_tensors_are_written_without_a_copy():
    weights = torch.randn(1000)
    view = torch.randn(10, 100)[2]
    out = _to_cpu({"surrogate": [weights], "view": view})
    assert out["surrogate"][0].data_ptr() == weights.data_ptr()  # torch.save writes it as it is
    assert out["view"].untyped_storage().nbytes() == 100 * 4  # a view is cut out of its larger storage
    assert torch.equal(out["view"], view)


def test_a_save_that_would_cost_more_than_a_tenth_of_the_time_is_skipped(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(ck_module.time, "monotonic", lambda: clock[0])
    real_save = torch.save

    def slow_save(obj, path):  # each save "takes" 2 s
        clock[0] += 2.0
        real_save(obj, path)

    monkeypatch.setattr(ck_module.torch, "save", slow_save)
    ck = LoopCheckpoint(tmp_path / "s", {"a": 1}, resume=True, unit="iteration")
    gen = torch.Generator().manual_seed(0)
    saved = []
    for count in range(1, 41):  # one unit = 1.5 s of work
        clock[0] += 1.5
        ck.save(count, 40, gen, {"x": [torch.full((2,), float(count))]}, {})
        saved.append(ck.restore(torch.Generator())["count"])
    # the first unit is always saved; then one when 9 × 2 s = 18 s (12 units) have passed since the last save
    assert sorted(set(saved)) == [1, 13, 25, 37]
