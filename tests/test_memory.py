"""Memory tiers (--memory low) and the LoRA surrogate (aspl-lora, -o surrogate=lora)."""

from __future__ import annotations

import copy
import json

import torch

from _groups_helper import image_set


def _grads(unet, vae, tokenizer, text_encoder, scheduler, x, params):
    from cloak.diffusion import Draw, denoising_loss, encode_latents, encode_prompts

    x = x.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    draw = Draw.sample(x.shape[0], (4, 8, 8), scheduler, gen, "cpu")
    with torch.no_grad():
        text = encode_prompts(tokenizer, text_encoder, ["a photo of sks person"])
    z = encode_latents(vae, x, posterior_noise=draw.posterior_noise)
    loss = denoising_loss(unet, scheduler, z, text, gen, timesteps=draw.timesteps, noise=draw.noise)
    return [g for g in torch.autograd.grad(loss, [x, *params])]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd):
    """UNet and VAE with checkpointing (as --memory low loads them): ∇ₓ and the weights' gradients equal the
    plain ones (allclose), and the checkpointed path really ran (recomputation counted)."""
    from cloak.diffusion.memory import apply_low_memory

    unet, vae = copy.deepcopy(tiny_sd.unet), copy.deepcopy(tiny_sd.vae)
    unet.requires_grad_(True)
    unet.train()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    params = [p for p in unet.parameters()][:: 7]
    plain = _grads(unet, vae, tiny_sd.tokenizer, tiny_sd.text_encoder, tiny_sd.noise_scheduler, x, params)
    record = apply_low_memory(unet, vae)
    assert record["gradient_checkpointing"] == ["unet", "vae"]
    calls = []
    for module in list(unet.modules()) + list(vae.modules()):
        fn = module.__dict__.get("_gradient_checkpointing_func")
        if fn is not None:
            module._gradient_checkpointing_func = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(fn)
    checked = _grads(unet, vae, tiny_sd.tokenizer, tiny_sd.text_encoder, tiny_sd.noise_scheduler, x, params)
    assert len(calls) > 4
    assert plain[0].abs().sum() > 0
    for a, b in zip(plain, checked):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def _own_objective(method, sd, x, n_draws: int = 24) -> float:
    """ASPL's PGD objective L_dn(f, x, c_inst) on the trained surrogate f, averaged over fixed draws."""
    from cloak.diffusion import encode_prompts

    gen = torch.Generator().manual_seed(123)
    saved = method.ctx.generator
    method.ctx.generator = gen
    try:
        with torch.no_grad():
            text = encode_prompts(sd.tokenizer, sd.text_encoder, [method.opts.instance_prompt])
            return sum(float(method.loss(sd, sd.unet, x, text, method.draw(sd, x))) for _ in range(n_draws)) / n_draws
    finally:
        method.ctx.generator = saved


def test_aspl_lora_beats_sign_noise_on_its_own_objective(tmp_path):
    """aspl-lora on tiny-sd (lr 1e-4 and η 0.1 as the other tiny efficacy tests: random weights move nothing at
    the published 5e-7): its surrogate's denoising loss on the protected images beats ±ε random-sign noise
    and the clean images. Seen (seed 0): clean 0.6818, noise 0.6887, protected 0.7393.
    The adapters weigh ~0.1 MiB against ~5 MiB for a UNet copy; removing them restores the base model."""
    from cloak._progress import Progress
    from cloak.diffusion.lora_surrogate import adapter_megabytes, remove_lora
    from cloak.methods import RunContext
    from cloak.models.handle import Models
    from cloak.protect.aspl_lora import AsplLora

    images = image_set([(64, 64)] * 3, seed=0)
    opts = AsplLora.Options(class_images=0, iterations=4, surrogate_steps=2, pgd_steps=4, lr=1e-4, eps=0.1,
                            alpha=0.01, unit="m11")
    ctx = RunContext(models=Models(cache_dir=tmp_path, tiny=True), model="tiny-sd", device=torch.device("cpu"),
                     dtype=torch.float32, seed=0, generator=torch.Generator().manual_seed(0), resolution=64,
                     cache_dir=tmp_path, progress=Progress())
    method = AsplLora(opts, ctx)
    sd = method.ctx.models.sd("tiny-sd")
    base_keys = sorted(sd.unet.state_dict())
    base_state = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    result = method(images)
    x0 = torch.stack(images.tensors)
    protected = torch.stack(list(result.pixels)) if not torch.is_tensor(result.pixels) else result.pixels
    signs = torch.randint(0, 2, x0.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    noise = (x0 + 0.1 * signs).clamp(-1, 1)
    trainers = method._trainers
    assert len(trainers) == 1  # released: the learner is the surrogate itself (one adapter set)
    losses = {name: _own_objective(method, sd, x) for name, x in
              (("clean", x0), ("noise", noise), ("protected", protected))}
    print("aspl-lora own objective:", losses)
    assert losses["protected"] > losses["noise"] + 0.005 and losses["protected"] > losses["clean"] + 0.005, losses
    unet_mib = sum(v.numel() * v.element_size() for v in base_state.values()) / 2**20
    assert adapter_megabytes(trainers) < unet_mib / 20
    assert (protected - x0).abs().max() <= 0.1 + 1e-6
    remove_lora(sd)
    assert sorted(sd.unet.state_dict()) == base_keys
    assert all(torch.equal(v, base_state[k]) for k, v in sd.unet.state_dict().items())


def test_memory_low_is_recorded_and_sets_the_tier(tmp_path, image_dir, cli):
    out = tmp_path / "out"
    r = cli("protect", str(image_dir), str(out), "--tiny", "--method", "aspl", "--memory", "low", "-o",
            "class_images=0", "-o", "iterations=1", "-o", "surrogate_steps=1", "-o", "pgd_steps=1",
            "-o", "pgd_batch=2")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["memory"] == {"value": "low", "source": "flag"}
    memory = report["summary"]["memory"]
    assert memory["tier"] == "low"
    assert memory["models"]["tiny-sd"]["gradient_checkpointing"] == ["unet", "vae"]
    assert report["options"]["surrogate"] == {"value": "lora", "source": "--memory low"}
    assert report["options"]["pgd_batch"] == {"value": 2, "source": "-o"}  # the user's -o wins over the tier
    bad = cli("protect", str(image_dir), str(tmp_path / "bad"), "--tiny", "--memory", "tiny")
    assert bad.exit_code == 2
