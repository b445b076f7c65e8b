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


def _conv_output_dtypes(module: torch.nn.Module) -> tuple[list[torch.dtype], list]:
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _args, out: seen.append(out.dtype))
             for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    return seen, hooks


def test_vae_encode_in_a_loss_runs_under_the_unets_autocast(tmp_path):
    """CUDA's default run keeps fp32 weights and computes in bf16; the VAE encoder inside a PGD loss (most of
    a PGD step's FLOPs at 512²) is part of that compute. Simulated on the CPU by asking for bf16 compute with
    fp32 VAE weights: the encoder's convolutions see bf16, the latents and ∇ₓ come back fp32 and point the
    same way as fp32's. Without autocast (fp32 on the CPU) or with bf16 weights it is encode_latents, to the byte."""
    from cloak.diffusion import encode_latents, encode_latents_in_loss
    from cloak.models.handle import Models

    vae = Models(cache_dir=tmp_path, tiny=True).sd("tiny-sd").vae
    assert vae.dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    noise = torch.randn(2, 4, 8, 8, generator=gen)

    def latents_and_grad(fn, *args):
        x = pixels.clone().requires_grad_(True)
        z = fn(vae, x, *args, posterior_noise=noise)
        (grad,) = torch.autograd.grad(z.square().sum(), x)
        return z.detach(), grad

    z_ref, g_ref = latents_and_grad(encode_latents)
    for run_dtype in (None, torch.float32):  # CPU fp32: no autocast, the same bytes
        z, g = latents_and_grad(encode_latents_in_loss, run_dtype)
        assert torch.equal(z, z_ref) and torch.equal(g, g_ref)

    seen, hooks = _conv_output_dtypes(vae.encoder)
    try:
        z, g = latents_and_grad(encode_latents_in_loss, torch.bfloat16)
    finally:
        for h in hooks:
            h.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert z.dtype == torch.float32 and g.dtype == torch.float32
    assert not torch.equal(g, g_ref)  # it really ran in bf16
    cosine = torch.nn.functional.cosine_similarity(g.flatten(), g_ref.flatten(), dim=0)
    assert cosine > 0.99, float(cosine)

    vae16 = Models(cache_dir=tmp_path, tiny=True, dtype=torch.bfloat16).sd("tiny-sd").vae
    x = pixels.clone()
    assert torch.equal(encode_latents_in_loss(vae16, x, torch.bfloat16, posterior_noise=noise),
                       encode_latents(vae16, x, posterior_noise=noise))


@pytest.mark.parametrize("name", ["aspl", "dladiff", "simac"])
def test_pgd_losses_encode_under_the_run_autocast(tmp_path, name, monkeypatch):
    """ASPL's family, DLADiff and SimAC hand their VAE encode to encode_latents_in_loss with the run's dtype:
    with bf16 compute over fp32 weights (CUDA's default, simulated on the CPU) the encoder runs in bf16."""
    from cloak.adversarial.groups import Groups
    from _groups_helper import image_set, make_method

    method = make_method(name, tmp_path)
    method.ctx.dtype = torch.bfloat16  # the weights stay fp32, as CUDA's default run loads them
    sd = method.ctx.models.sd("tiny-sd")
    assert sd.vae.dtype == torch.float32
    seen, hooks = _conv_output_dtypes(sd.vae.encoder)
    x = Groups.of(image_set([(64, 64)]), torch.device("cpu"), torch.float32).parts[0].requires_grad_(True)
    text = torch.zeros(1, 77, sd.text_encoder.config.hidden_size)
    try:
        if name == "simac":
            method._grad(sd, text, x, torch.tensor([500]))
        elif name == "dladiff":
            loss = method.denoising(sd, sd.unet, text, x, method.draw(sd, x))
            loss.backward()
        else:
            loss = method.loss(sd, sd.unet, x, text, method.draw(sd, x))
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert seen and set(seen) == {torch.bfloat16}
