"""Memory tiers (--memory low) and the LoRA surrogate (aspl-lora, -o surrogate=lora)."""

from __future__ import annotations

import copy
import json

import torch

from conftest import run_cli


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


def test_aspl_lora_beats_sign_noise(domain_base, tmp_path):
    """aspl-lora as the family's efficacy test measures (test_protect_family: tiny-sd after a short DreamBooth on
    the test domain, η = 0.1): the attacker's DreamBooth loss on the protected set beats the same on ±ε
    random-sign noise and on the clean set. The surrogate's adapters weigh ~0.1 MiB (a tiny-sd UNet copy: ~5 MiB).
    Seen (seed 0): protected 0.3108, ±ε noise 0.3073, clean 0.3072 (margin 0.0035 over noise).
    """
    from test_protect_family import attacker_loss, identity_set, ok, sign_noise_copy

    subject = identity_set(tmp_path / "B", 3, 2)
    ref = identity_set(tmp_path / "A", 3, 1)
    eps = 0.1
    rep = ok(run_cli("protect", "--method", "aspl-lora", "--model", domain_base, "--json", "--seed", "0", "--eps",
                     str(eps), "--eps-unit", "m11", "-o", "class_images=0", "-o", "iterations=3", "-o",
                     "surrogate_steps=1", "-o", "pgd_steps=4", "-o", "lr=1e-4", "--ref", ref, subject, tmp_path / "P"))
    assert rep["summary"]["surrogate"]["kind"] == "lora" and rep["summary"]["surrogate"]["adapter_mib"] < 1
    noise = sign_noise_copy(subject, tmp_path / "N", eps)
    protected = attacker_loss(tmp_path / "P", tmp_path / "atk_p", domain_base)
    clean = attacker_loss(subject, tmp_path / "atk_c", domain_base)
    control = attacker_loss(noise, tmp_path / "atk_n", domain_base)
    print("aspl-lora", {"protected": protected, "clean": clean, "noise": control})
    assert protected > clean and protected > control, (protected, clean, control)


def test_lora_surrogate_is_removed_and_starts_as_the_base(tiny_sd):
    """Adapters start at B = 0 (the surrogate is the base model), and removing them restores the modules."""
    from cloak.diffusion.dreambooth import DreamBoothConfig
    from cloak.diffusion.lora_surrogate import lora_trainers, remove_lora

    sd = copy.copy(tiny_sd)
    sd.unet, sd.text_encoder = copy.deepcopy(tiny_sd.unet), copy.deepcopy(tiny_sd.text_encoder)
    keys, state = sorted(sd.unet.state_dict()), {k: v.clone() for k, v in sd.unet.state_dict().items()}
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, sd.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    with torch.no_grad():
        before = sd.unet(z, t, text).sample
    trainers = lora_trainers(sd, ("learner", "surrogate"), DreamBoothConfig(), rank=4, class_latents=None,
                             generator=torch.Generator().manual_seed(0))
    trainers[0].freeze()
    with torch.no_grad():
        assert torch.allclose(sd.unet(z, t, text).sample, before, atol=1e-6)
    assert all(p.dtype == torch.float32 for tr in trainers for p in tr.params)
    assert not set(map(id, trainers[0].params)) & set(map(id, trainers[1].params))
    remove_lora(sd)
    assert sorted(sd.unet.state_dict()) == keys
    assert all(torch.equal(v, state[k]) for k, v in sd.unet.state_dict().items())


def test_memory_low_is_recorded_and_sets_the_tier(tmp_path, image_dir, cli):
    out = tmp_path / "out"
    r = cli("protect", str(image_dir), str(out), "--tiny", "--method", "aspl", "--memory", "low", "-o",
            "class_images=0", "-o", "iterations=1", "-o", "surrogate_steps=1", "-o", "pgd_steps=1",
            "-o", "pgd_batch=2")
    assert r.exit_code == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["memory"] == {"value": "low", "source": "flag"}
    memory = report["summary"]["memory"]
    assert memory["tier"] == "low"
    assert memory["models"]["tiny-sd"]["gradient_checkpointing"] == ["unet", "vae"]
    assert report["options"]["surrogate"] == {"value": "lora", "source": "--memory low"}
    assert report["options"]["pgd_batch"] == {"value": 2, "source": "-o"}  # the user's -o wins over the tier
    bad = cli("protect", str(image_dir), str(tmp_path / "bad"), "--tiny", "--memory", "tiny")
    assert bad.exit_code == 2
