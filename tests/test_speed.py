"""Speed and memory changes that must not change a result (issue 16): each optimised path against the
straightforward one it replaces, bytes equal at fp32."""

from __future__ import annotations

import hashlib

import pytest
import torch

from cloak.diffusion import dreambooth


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """This file's tests run on one intra-op thread (conftest's ``one_thread``)."""


def _aspl(cache, **opts):
    from cloak._progress import Progress
    from cloak.methods import RunContext
    from cloak.models.handle import Models
    from cloak.protect.aspl import Aspl

    ctx = RunContext(models=Models(cache_dir=cache, tiny=True), model="tiny-sd", device=torch.device("cpu"),
                     dtype=torch.float32, seed=0, generator=torch.Generator().manual_seed(0), resolution=64,
                     cache_dir=cache, progress=Progress())
    method = Aspl(Aspl.Options(**{"iterations": 2, "surrogate_steps": 2, "pgd_steps": 2, "class_images": 2,
                                  **opts}), ctx)
    method.name = "aspl"
    return method


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_aspl_memory_savings_change_nothing(shared_cache, image_dir, monkeypatch):
    """Peak memory of ASPL (issue 16 §1): each DreamBooth call's AdamW moments are released after its last step
    (none sit through the PGD steps), weight gradients are freed after each step, and f trains the loaded
    model's own weights without a copy of them ever being made. The protected set and f's weights are the bytes
    the old path gives, where f was a copy, each trainer kept its own moments between calls (zeroed at the
    next call) and its gradients lived until its next step."""
    from cloak.io.images import read_images
    from cloak.models.handle import SDModel
    from cloak.protect import aspl

    images = read_images(image_dir, 64)
    final, during_pgd = {}, []
    loop, pgd = aspl.Aspl.loop, aspl.Aspl.pgd
    copies = {"n": 0}
    trainable_copy = SDModel.trainable_copy

    def keep_final(self, sd, learner, surrogate, x0):  # the trainers at the end of the loop, before clean-up
        self._pair = (learner, surrogate)
        result = loop(self, sd, learner, surrogate, x0)
        final.update(f=_digest(*surrogate.params), learner_state=len(learner.optimizer.state),
                     surrogate_state=len(surrogate.optimizer.state),
                     grads=sum(p.grad is not None for p in learner.params + surrogate.params))
        return result

    def spy_pgd(self, *a, **k):  # what the two trainers hold while PGD runs
        during_pgd.append(sum(len(t.optimizer.state) for t in self._pair))
        return pgd(self, *a, **k)

    def count_copies(sd):
        copies["n"] += 1
        return trainable_copy(sd)

    monkeypatch.setattr(aspl.Aspl, "loop", keep_final)
    monkeypatch.setattr(aspl.Aspl, "pgd", spy_pgd)
    monkeypatch.setattr(SDModel, "trainable_copy", count_copies)
    new = _aspl(shared_cache)(images)
    # The memory claims: no moments outside a DreamBooth call, no weight gradient left over, one copy (f').
    assert during_pgd == [0, 0] and final["learner_state"] == 0 and final["surrogate_state"] == 0
    assert final["grads"] == 0
    assert copies["n"] == 1
    new_weights = final["f"]

    # The old path: f is a copy; each trainer keeps its own (zeroed) moments between calls; gradients are freed
    # only at the next step.
    zero_grad = torch.optim.Optimizer.zero_grad
    calls = {"n": 0}

    def old_zero_grad(self, set_to_none=True):
        calls["n"] += 1
        if calls["n"] % 2 == 0:  # the second call of each step is the new early free: skip it
            return None
        return zero_grad(self, set_to_none)

    monkeypatch.setattr(aspl.Aspl, "lends_base", lambda self, sd: False)
    monkeypatch.setattr(dreambooth.DreamBoothTrainer, "release_optimizer_state",
                        dreambooth.DreamBoothTrainer.reset_optimizer)
    monkeypatch.setattr(torch.optim.AdamW, "zero_grad", old_zero_grad)
    during_pgd.clear()
    copies["n"] = 0
    old = _aspl(shared_cache)(images)
    assert final["learner_state"] and final["grads"] and copies["n"] == 2 and during_pgd[-1]  # really the old path
    assert _digest(*old.pixels) == _digest(*new.pixels)
    assert final["f"] == new_weights


def test_released_optimizer_state_steps_as_a_fresh_optimizer():
    """A trainer whose AdamW state was released steps exactly as a new AdamW would (the released per-call optimizer)."""
    cfg = dreambooth.DreamBoothConfig(lr=1e-2)
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())

    class T:  # the attribute release_optimizer_state reads
        def __init__(self, module):
            self.optimizer = dreambooth.make_adamw(module.parameters(), cfg)

    ta = T(a)
    for _ in range(2):  # a used optimizer: moments and step counts filled
        ta.optimizer.zero_grad()
        a(torch.ones(1, 3)).square().sum().backward()
        ta.optimizer.step()
    b.load_state_dict(a.state_dict())
    dreambooth.DreamBoothTrainer.release_optimizer_state(ta)
    assert not ta.optimizer.state
    fresh = dreambooth.make_adamw(b.parameters(), cfg)
    for module, opt in ((a, ta.optimizer), (b, fresh)):
        for _ in range(2):
            opt.zero_grad()
            module(torch.ones(1, 3)).square().sum().backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_metacloak_pgd_batch_gives_the_whole_set_step_in_chunks(tmp_path):
    """MetaCloak's PGD through the EoT transforms takes -o pgd_batch too (issue 16 §4): each chunk gets its
    own rows of every per-image draw, so 3 images in chunks of 2 equal the one-batch run up to UNet rounding."""
    import numpy as np
    from conftest import pngs, write_images

    from cloak.api import Common, run_protect

    images = write_images(tmp_path / "in", n=3)
    outputs = {}
    for batch in (0, 2):
        options = {"class_images": "0", "pgd_batch": str(batch), "trials": "1", "pool_steps": "2",
                   "snapshot_interval": "1", "advance_steps": "1", "pgd_steps": "2"}
        run_protect(images, tmp_path / f"out{batch}", common=Common(method="metacloak", tiny=True, argv=[],
                                                                   options=options))
        outputs[batch] = pngs(tmp_path / f"out{batch}")
    for name, whole in outputs[0].items():
        diff = np.abs(whole.astype(int) - outputs[2][name].astype(int))
        assert (diff == 0).mean() > 0.95, (name, (diff == 0).mean())


def test_eot_rows_cuts_per_image_draws_and_keeps_per_set_ones():
    from cloak.diffusion import Draw
    from cloak.protect.metacloak import _eot_rows

    n = 3
    draw = Draw(torch.arange(n), torch.randn(n, 4, 2, 2), torch.randn(n, 4, 2, 2))
    params = [None, torch.tensor([0.7]), torch.tensor([True]), torch.rand(n, 4)]
    cut, cut_draw = _eot_rows((params, draw), slice(1, 3))
    assert cut[0] is None and cut[1] is params[1] and cut[2] is params[2]
    assert torch.equal(cut[3], params[3][1:3]) and torch.equal(cut_draw.timesteps, torch.arange(1, 3))


def test_aspl_gives_the_loaded_base_weights_back(shared_cache, image_dir):
    """f trains the shared handle's UNet and text encoder during the loop; afterwards they hold the base
    weights again (read back from the model folder), frozen, so a second run in the same process is the
    bytes of the first."""
    from cloak.io.images import read_images

    images = read_images(image_dir, 64)
    method = _aspl(shared_cache)
    sd = method.ctx.models.sd("tiny-sd")
    before = _digest(*sd.unet.parameters(), *sd.text_encoder.parameters())
    seen = {}
    inner = method.iteration

    def spy(sd_, learner, surrogate, *a):
        seen["f is the base"] = surrogate.unet is sd.unet and surrogate.text_encoder is sd.text_encoder
        return inner(sd_, learner, surrogate, *a)

    method.iteration = spy
    first = method(images)
    assert seen["f is the base"]
    assert _digest(*sd.unet.parameters(), *sd.text_encoder.parameters()) == before
    assert not any(p.requires_grad for p in sd.unet.parameters()) and not sd.unet.training
    again = _aspl(shared_cache)
    again.ctx.models = method.ctx.models  # the same loaded handle
    assert _digest(*again(images).pixels) == _digest(*first.pixels)


def test_aspl_frees_the_trainers_before_the_base_is_read_back(shared_cache, image_dir, monkeypatch):
    """Peak memory (issue 16 §1): f trains the loaded base (no copy of it is made: test_aspl_memory_savings_change_
    nothing), and f', its optimizer and the rest are freed before the base weights are read back (they sat under
    the reload's file mapping, which became the run's peak). The dtype record still names the trainers' dtypes."""
    import gc
    import weakref

    from cloak.io.images import read_images
    from cloak.protect import aspl

    images = read_images(image_dir, 64)
    method = _aspl(shared_cache)
    refs = {}
    pair = aspl.Aspl.surrogate_pair

    def spy_pair(self, sd, clean):
        learner, surrogate = pair(self, sd, clean)
        refs["learner"] = weakref.ref(learner.unet)
        refs["moments"] = weakref.ref(learner.optimizer)
        return learner, surrogate

    alive = {}

    back = aspl.Aspl.return_base

    def spy_return(self, sd):
        gc.collect()
        alive["learner at reload"] = refs["learner"]() is not None
        alive["optimizer at reload"] = refs["moments"]() is not None
        return back(self, sd)

    monkeypatch.setattr(aspl.Aspl, "surrogate_pair", spy_pair)
    monkeypatch.setattr(aspl.Aspl, "return_base", spy_return)
    result = method(images)
    assert alive == {"learner at reload": False, "optimizer at reload": False}
    assert result.summary["dtypes"]["trained_weights"] == "float32"
    assert method.dtype_record()["trained_optimizer_state"] == "float32"  # kept after the trainers went


def test_base_weights_read_back_from_safetensors_without_mapping_the_file(tmp_path, monkeypatch):
    """ASPL's read-back of the base weights reads each tensor into the module's own storage (no file mapping in
    the process's resident memory) and converts a tensor stored in another dtype; it gives the bytes
    safetensors' own loader gives, and declines a file whose names or shapes differ."""
    from safetensors.torch import load_file, save_file

    from cloak.protect.aspl import _copy_from_safetensors

    gen = torch.Generator().manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.LayerNorm(3))
    for p in source.parameters():
        p.data = torch.randn(p.shape, generator=gen)
    (tmp_path / "m").mkdir()
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["1.bias"] = state["1.bias"].to(torch.float16)  # one tensor stored in another dtype
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    target = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.LayerNorm(3))
    import safetensors

    def mapped(*a, **k):
        raise AssertionError("safe_open maps the whole file into the process")

    monkeypatch.setattr(safetensors, "safe_open", mapped)
    assert _copy_from_safetensors(target, tmp_path / "m")
    expected = load_file(str(tmp_path / "m" / "model.safetensors"))
    for name, value in target.state_dict().items():
        assert torch.equal(value, expected[name].to(value.dtype)), name
    other = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4))
    before = [p.clone() for p in other.parameters()]
    assert not _copy_from_safetensors(other, tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))  # nothing written


def test_metacloak_releases_the_moments_and_changes_nothing(shared_cache, image_dir, monkeypatch):
    """MetaCloak's learner drops AdamW's moments after the pool is built and after each round's DreamBooth call
    (a fresh optimizer per call, as released), so none sit through the PGD steps; the protected set is the bytes
    of the old path, where the zeroed moments stayed allocated between calls."""
    from cloak._progress import Progress
    from cloak.io.images import read_images
    from cloak.methods import RunContext
    from cloak.models.handle import Models
    from cloak.protect import metacloak

    images = read_images(image_dir, 64)
    during_pgd = []
    pgd = metacloak.MetaCloak.pgd

    def spy_pgd(self, *a, **k):
        during_pgd.append(sum(len(t.optimizer.state) for t in self._trainers))
        return pgd(self, *a, **k)

    def run():
        ctx = RunContext(models=Models(cache_dir=shared_cache, tiny=True), model="tiny-sd",
                         device=torch.device("cpu"), dtype=torch.float32, seed=0,
                         generator=torch.Generator().manual_seed(0), resolution=64, cache_dir=shared_cache,
                         progress=Progress())
        opts = {"class_images": 0, "trials": 1, "pool_steps": 2, "snapshot_interval": 1, "advance_steps": 1,
                "pgd_steps": 1}
        method = metacloak.MetaCloak(metacloak.MetaCloak.Options(**opts), ctx)
        method.name = "metacloak"
        result = method(images)
        assert method.dtype_record()["trained_optimizer_state"] == "float32"
        return _digest(*result.pixels)

    monkeypatch.setattr(metacloak.MetaCloak, "pgd", spy_pgd)
    new = run()
    assert during_pgd and not any(during_pgd)
    monkeypatch.setattr(dreambooth.DreamBoothTrainer, "release_optimizer_state",
                        dreambooth.DreamBoothTrainer.reset_optimizer)
    during_pgd.clear()
    old = run()
    assert all(during_pgd)  # really the old path: the moments sat through PGD
    assert old == new
