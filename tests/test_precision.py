"""--dtype bf16 must not bring back Anti-DreamBooth's lost-update bug (protect.md §0 [Q]), and the report
states which tensors ran in which dtype, read off what ran."""

from __future__ import annotations

import json

import pytest
import torch

from _groups_helper import make_method


def _bf16_method(name: str, cache, compat: bool = False, **options):
    method = make_method(name, cache, options)
    from cloak.models.handle import Models

    method.ctx.dtype = torch.bfloat16
    method.ctx.compat = compat
    method.ctx.models = Models(cache_dir=cache, tiny=True, dtype=torch.bfloat16)
    return method


def _changed_fraction(trainer, sd, method) -> float:
    """Fraction of the trainer's UNet weights that one DreamBooth step changes."""
    before = [p.detach().clone() for p in trainer.unet.parameters()]
    latents = method._ref_latents.sample([0], method.ctx.generator)
    trainer.step(latents, [0] if method._n_class else None)
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(trainer.unet.parameters(), before))
    return changed / sum(b.numel() for b in before)


@pytest.mark.parametrize("compat", [False, True])
def test_bf16_aspl_surrogate_step_moves_most_weights(tmp_path, compat):
    """At lr 5e-7 one AdamW step under --dtype bf16 changes most fp32 master weights (measured: 0.743 of the
    UNet's); trained bf16 weights (--compat, as released) keep almost all of them (measured: 0.0052)."""
    method = _bf16_method("aspl", tmp_path, compat=compat, class_images=0)
    sd = method.ctx.models.sd("tiny-sd")
    assert sd.unet.dtype == torch.bfloat16  # the base really is bf16
    clean = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    learner, surrogate = method.surrogate_pair(sd, clean)
    fraction = _changed_fraction(surrogate, sd, method)
    if compat:
        assert next(surrogate.unet.parameters()).dtype == torch.bfloat16
        assert fraction < 0.1, fraction
    else:
        assert all(p.dtype == torch.float32 for p in surrogate.params)
        state = [v for s in surrogate.optimizer.state.values() for k, v in s.items() if k != "step"]
        assert state and all(v.dtype == torch.float32 for v in state)
        assert fraction > 0.5, fraction


def test_bf16_pgd_keeps_fp32_perturbation(tmp_path):
    """A PGD step of α = 5e-3 survives on fp32 pixels; on bf16 pixels near ±1 (ulp 2⁻⁷) most would round away."""
    from cloak.adversarial.groups import Groups
    from _groups_helper import image_set

    method = _bf16_method("aspl", tmp_path, class_images=0)
    images = image_set([(64, 64), (64, 64)])
    x0 = Groups.of(images, torch.device("cpu"), torch.float32)
    sd = method.ctx.models.sd("tiny-sd")
    clean = method.clean_set(images)
    learner, _ = method.surrogate_pair(sd, clean)
    learner.freeze()
    x, _ = method.pgd(sd, learner.unet, learner.text_encoder, x0.clone(), x0, 1, 0.05, 5e-3)
    assert x.parts[0].dtype == torch.float32
    record = method.dtype_record()
    assert record["perturbation"] == "float32" and record["perturbation_grad"] == "float32"
    moved = (x.parts[0] - x0.parts[0]).abs()
    assert float((moved > 0).float().mean()) > 0.9  # nearly every pixel took its step (none lost to rounding)


def test_bf16_report_dtypes_match_what_ran(tmp_path, image_dir, cli, monkeypatch):
    """The report's ``dtypes`` equal the dtypes a spy saw in every DreamBooth step and every PGD gradient."""
    from cloak.diffusion import dreambooth
    from cloak.protect import aspl

    seen: dict[str, set] = {"weights": set(), "state": set(), "grad": set(), "x": set()}
    step = dreambooth.DreamBoothTrainer.step

    def spy_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        seen["weights"].update(str(p.dtype) for p in self.params)
        seen["state"].update(str(v.dtype) for s in self.optimizer.state.values() for k, v in s.items()
                             if k != "step")
        return out

    lag = aspl.loss_and_grad

    def spy_grad(x, loss_fn, chunks=None):
        loss, grad = lag(x, loss_fn, chunks)
        seen["x"].update(str(p.dtype) for p in x.parts)
        seen["grad"].update(str(g.dtype) for g in grad.parts)
        return loss, grad

    monkeypatch.setattr(dreambooth.DreamBoothTrainer, "step", spy_step)
    monkeypatch.setattr(aspl, "loss_and_grad", spy_grad)
    out = tmp_path / "out"
    result = cli("protect", str(image_dir), str(out), "--tiny", "--method", "aspl", "--dtype", "bf16",
                 "-o", "class_images=1", "-o", "iterations=1", "-o", "surrogate_steps=1", "-o", "pgd_steps=1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    record = report["summary"]["dtypes"]
    assert seen == {"weights": {"torch.float32"}, "state": {"torch.float32"}, "grad": {"torch.float32"},
                    "x": {"torch.float32"}}
    assert record["trained_weights"] == "float32"
    assert record["trained_optimizer_state"] == "float32"
    assert record["perturbation"] == "float32" and record["perturbation_grad"] == "float32"
    assert record["frozen_weights"] == "bfloat16"
    assert record["compute"] == "bfloat16 autocast"
    assert report["summary"]["surrogate_weights"] == "float32 master weights"
    assert report["dtype"] == "bfloat16"


def test_compat_report_says_bf16_weights(tmp_path, image_dir, cli):
    out = tmp_path / "out"
    result = cli("protect", str(image_dir), str(out), "--tiny", "--method", "aspl", "--compat",
                 "-o", "class_images=1", "-o", "iterations=1", "-o", "surrogate_steps=1", "-o", "pgd_steps=1")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["dtypes"]["trained_weights"] == "bfloat16"
    assert summary["surrogate_weights"].startswith("bf16 weights trained directly")
    assert summary["dtypes"]["frozen_weights"] == "float32"
