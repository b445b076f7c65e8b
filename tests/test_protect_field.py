"""The rest of the field (issue 18): SDS(±)/SDS-T and PID (docs/spec-additions.md §P1–P2).

Efficacy on tiny-sd, against ±ε random-sign noise of the same budget, on each method's own objective,
recomputed here from the saved 8-bit PNGs with the stand-in model (not what the method reports):
* SDS(+) raises, SDS(−) lowers the frozen model's denoising loss L_dn (the same 32 draws of (t, ε,
  posterior noise) for every image set); SDS-T pulls the posterior mean toward its target texture.
* PID pushes the VAE posterior away from the clean image's (its default add-log distance).
Runs are in-process (run_protect) to keep the tiny model loaded once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pngs, write_images, write_sign_noise

from cloak._verb import Common
from cloak.protect.run import run_protect

LEVELS = 12  # the test budget, in 8-bit levels (0.094 in [-1,1])


def protect(src, out, method, **options):
    opts = {"eps": f"{LEVELS}lv", **{k: str(v) for k, v in options.items()}}
    return run_protect(src, out, common=Common(method=method, tiny=True, seed=0, argv=[], options=opts))


def as_m11(folder) -> torch.Tensor:
    arrays = [a for _, a in sorted(pngs(folder).items())]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture
def sets(tmp_path):
    clean = write_images(tmp_path / "clean", n=2, seed=0)
    write_sign_noise(clean, tmp_path / "noise", LEVELS)
    return clean, tmp_path / "noise"


@torch.no_grad()
def denoising_loss_of(sd, pixels: torch.Tensor, draws: int = 32) -> torch.Tensor:
    from cloak.diffusion import denoising_loss, encode_latents, encode_prompts

    text = encode_prompts(sd.tokenizer, sd.text_encoder, ["a photo"])
    g = torch.Generator().manual_seed(123)
    total = 0
    for _ in range(draws):
        z = encode_latents(sd.vae, pixels, g)
        total = total + denoising_loss(sd.unet, sd.noise_scheduler, z, text, g, reduction="none")
    return total / draws


@pytest.mark.parametrize("method,direction", [("sds-plus", 1), ("sds-minus", -1)])
def test_sds_moves_the_denoising_loss_its_way_more_than_noise(sets, tmp_path, tiny_sd, method, direction):
    clean, noise = sets
    protect(clean, tmp_path / "out", method, steps=40)
    loss = {name: float(denoising_loss_of(tiny_sd, as_m11(folder)).mean())
            for name, folder in (("clean", clean), ("noise", noise), ("protected", tmp_path / "out"))}
    print(method, loss)
    assert direction * (loss["protected"] - loss["noise"]) > 0, loss
    assert direction * (loss["protected"] - loss["clean"]) > 0, loss


def test_sds_t_pulls_the_latent_to_its_target(sets, tmp_path, tiny_sd):
    from cloak.adversarial.target import load_target
    from cloak.protect.sds import DEFAULT_TARGET

    clean, noise = sets
    protect(clean, tmp_path / "out", "sds-t", steps=40)
    vae, s = tiny_sd.vae, tiny_sd.vae.config.scaling_factor
    with torch.no_grad():
        target = vae.encode(load_target(DEFAULT_TARGET, (64, 64))).latent_dist.mean
        dist = {name: float(((vae.encode(as_m11(folder)).latent_dist.mean - target) * s).pow(2).flatten(1).sum(1)
                            .mean())
                for name, folder in (("clean", clean), ("noise", noise), ("protected", tmp_path / "out"))}
    print("sds-t textural distance", dist)
    assert dist["protected"] < dist["noise"] and dist["protected"] < dist["clean"], dist


@pytest.mark.parametrize("objective", ["add-log", "kl"])
def test_pid_pushes_the_posterior_away_more_than_noise(sets, tmp_path, tiny_sd, objective):
    from cloak.diffusion.posterior import posterior_distance

    clean, noise = sets
    rep = protect(clean, tmp_path / "out", "pid", steps=8, objective=objective)
    assert rep.summary["objective"] == objective
    vae = tiny_sd.vae
    with torch.no_grad():
        ref = vae.encode(as_m11(clean)).latent_dist
        dist = {name: float(posterior_distance(vae.encode(as_m11(folder)).latent_dist, ref.mean, ref.logvar,
                                               objective).mean())
                for name, folder in (("noise", noise), ("protected", tmp_path / "out"))}
    print("pid", objective, dist)
    assert dist["protected"] > 1.5 * dist["noise"], dist


def test_pid_objectives_are_zero_at_the_clean_posterior_and_kl_is_a_kl():
    from cloak.diffusion.posterior import POSTERIOR_OBJECTIVES, posterior_distance

    class Dist:
        def __init__(self, mean, logvar):
            self.mean, self.logvar = mean, logvar

    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g) * 0.3
    for objective in set(POSTERIOR_OBJECTIVES) - {"latent"}:
        assert torch.allclose(posterior_distance(Dist(mean, logvar), mean, logvar, objective), torch.zeros(2),
                              atol=1e-6), objective
    other = Dist(mean + 0.5, logvar - 0.2)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()),
        torch.distributions.Normal(other.mean, (0.5 * other.logvar).exp())).flatten(1).mean(1)
    assert torch.allclose(posterior_distance(other, mean, logvar, "kl"), expected, atol=1e-5)


def test_pid_compat_stops_at_the_releases_last_saved_step():
    from cloak.protect.pid import released_steps

    assert released_steps(1000) == 975 and released_steps(26) == 25 and released_steps(25) == 0
    assert released_steps(0) == 0


def test_score_residual_is_the_denoising_loss_gradient_without_the_unet_jacobian(tiny_sd, tiny_sd_v):
    """g = ε̂ − ε: its mean square is L_dn on the same draw (ε-prediction), and the surrogate's gradient w.r.t.
    the latents is g itself; a v-prediction model's output is turned into ε̂ first."""
    from cloak.diffusion import denoising_loss, encode_prompts
    from cloak.diffusion.sds import score_residual

    sd = tiny_sd
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    text = encode_prompts(sd.tokenizer, sd.text_encoder, ["a photo"]).detach()
    score = score_residual(sd.unet, sd.noise_scheduler, z, text, timesteps=t, noise=noise)
    with torch.no_grad():
        ref = denoising_loss(sd.unet, sd.noise_scheduler, z, text, g, timesteps=t, noise=noise, reduction="none")
    assert torch.allclose(score.loss, ref, rtol=1e-5)
    zz = z.clone().requires_grad_(True)
    value = score.surrogate(zz)
    (grad,) = torch.autograd.grad(value.sum(), zz)
    assert torch.allclose(grad, score.residual) and torch.allclose(value.detach(), ref, rtol=1e-5)
    # v-prediction: ε̂ = √ᾱ v̂ + √(1−ᾱ) z_t recovers the noise when v̂ is the true v.
    from cloak.diffusion.sds import predicted_noise

    sched = tiny_sd_v.noise_scheduler
    noisy = sched.add_noise(z, noise, t)
    true_v = sched.get_velocity(z, noise, t)

    class Oracle:
        def __call__(self, x, tt, c):
            return type("Out", (), {"sample": true_v})()

    assert torch.allclose(predicted_noise(Oracle(), sched, noisy, t, text), noise, atol=1e-4)


@pytest.mark.parametrize("method,paper", [("sds-minus", "2311.12832"), ("sds-plus", "2311.12832"),
                                          ("sds-t", "2311.12832"), ("pid", "2406.15305")])
def test_listed_with_their_paper(cli, method, paper):
    r = cli("methods", "show", method)
    assert r.exit_code == 0, r.stderr
    assert paper in r.stdout and "-o eps=" in r.stdout
    assert method in cli("methods", "protect").stdout
