"""The fine-tuning family of protections: FSMG, ASPL (+E-ASPL, T-ASPL/T-FSMG), SimAC, MetaCloak, and
the shared pieces they are built from (EoT transforms, cached surrogate, snapshot pool).

Efficacy on tiny models. On the random tiny-sd the denoising loss does not depend on the image at
all (measured: 1.1284 on clean images, 1.1285 on images with ±12/255 sign noise), so no protection
can move it and "protected vs clean" comparisons there are noise. The efficacy tests therefore first
teach tiny-sd the image domain (a short DreamBooth at lr 1e-3 on a separate set of the same kind of
images, kept as a local model directory — the same code path as any ``--model DIR``); on that model
the loss does depend on the image. Each method then protects a set on that base, ``cloak attack
--method dreambooth`` (published recipe: lr 5e-7) is run with identical seeds on the protected
images, on the clean images and on a control with random ±ε sign noise, and the attacker's
denoising loss on the images it was trained on (``--ref`` = its training set, the quantity the
methods maximise) must be higher for the protected set than for both.

The brief's stronger form — the attacker's loss on *other* clean photos of the subject rising — was
not robust on tiny models (its sign changed with the protection seed for every method tried), so it
is not asserted; see the report. Budgets are 0.1 in [-1,1] (twice the 0.05 default) to get well
clear of the noise control on 64-px images; step counts are cut to seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, attacker_loss, identity_set, pngs, run_cli, write_images
from PIL import Image

from cloak.adversarial.eot import (
    Compose,
    GaussianBlur,
    RandomHFlip,
    RandomResizedCrop,
    crop_resize,
    gaussian_blur,
    hflip,
    metacloak_transforms,
    resize_center_crop,
)
from cloak.adversarial.groups import Groups
from cloak.diffusion.dreambooth import DreamBoothConfig
from cloak.diffusion.surrogate import SnapshotPool, cached_dreambooth, pixels_sha256

# ------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """This file's tests run on one intra-op thread (conftest's ``one_thread``)."""


def sign_noise_copy(src: Path, dst: Path, eps_m11: float, seed: int = 5) -> Path:
    """Control: every pixel moved by ±ε (the largest-energy perturbation in the budget), at random."""
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    levels = int(eps_m11 * 127.5 + 1e-6)
    for p in sorted(src.glob("*.png")):
        a = np.asarray(Image.open(p)).astype(np.int16)
        Image.fromarray(np.clip(a + rng.choice([-levels, levels], size=a.shape), 0, 255).astype(np.uint8)).save(
            dst / p.name)
    return dst


def ok(result):
    assert result.exit_code == 0, result.stderr[-3000:]
    return json.loads(result.stdout) if result.stdout.strip().startswith("{") else result


def tiny_opts(name: str) -> list[str]:
    from cloak.protect import PROTECT

    out = []
    for k, v in PROTECT.get(name).tiny_options.items():
        out += ["-o", f"{k}={v}"]
    return out


EFFICACY = {
    "aspl": ["-o", "iterations=3", "-o", "surrogate_steps=1", "-o", "pgd_steps=4"],
    "fsmg": ["-o", "surrogate_steps=4", "--steps", "12"],
    "simac": ["-o", "iterations=3", "-o", "surrogate_steps=1", "-o", "pgd_steps=4", "-o", "select_rounds=3"],
    "metacloak": ["-o", "trials=1", "-o", "pool_steps=4", "-o", "snapshot_interval=2", "-o", "advance_steps=1",
                  "-o", "pgd_steps=4"],
}


@pytest.mark.parametrize("method", list(EFFICACY))
def test_efficacy_attacker_loss_rises(method, domain_base, tmp_path):
    subject = identity_set(tmp_path / "B", 3, 2)
    ref = identity_set(tmp_path / "A", 3, 1)
    eps = 0.1  # m11; see the module docstring
    args = ["protect", "--method", method, "--model", domain_base, "--json", "--seed", "0", "--eps", str(eps),
            "--eps-unit", "m11", "-o", "class_images=0", *EFFICACY[method]]
    if method != "metacloak":
        args += ["--ref", ref]
    rep = ok(run_cli(*args, subject, tmp_path / "P"))
    assert rep["summary"]["budget"]["eps_m11"] == pytest.approx(eps)
    noise = sign_noise_copy(subject, tmp_path / "N", eps)
    protected = attacker_loss(tmp_path / "P", tmp_path / "atk_p", domain_base)
    clean = attacker_loss(subject, tmp_path / "atk_c", domain_base)
    control = attacker_loss(noise, tmp_path / "atk_n", domain_base)
    print(method, {"protected": protected, "clean": clean, "noise": control})
    assert protected > clean and protected > control, (method, protected, clean, control)


# ------------------------------------------------------------------------------------------------
# EoT transforms


def test_gaussian_blur_matches_a_direct_2d_convolution():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 17, 19, generator=gen)
    k, sigma = 7, 1.3
    grid = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    g1 = torch.exp(-0.5 * (grid / sigma) ** 2)
    g1 = g1 / g1.sum()
    kernel = (g1[:, None] * g1[None, :]).expand(3, 1, k, k)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (3, 3, 3, 3), mode="reflect"), kernel, groups=3)
    assert torch.allclose(gaussian_blur(x, k, sigma), ref, atol=1e-6)
    # Per-image σ: each image blurred with its own.
    both = gaussian_blur(x, k, torch.tensor([1.3, 0.4]))
    assert torch.allclose(both[1:], gaussian_blur(x[1:], k, 0.4), atol=1e-6)
    assert torch.allclose(both[:1], ref[:1], atol=1e-6)


def test_eot_transforms_are_differentiable_and_seeded():
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    pipe = Compose([RandomResizedCrop(16, scale=(0.5, 0.9)), GaussianBlur(5, (0.5, 1.5), per_image=True),
                    RandomHFlip(0.5, per_image=True)])
    a = pipe.sample(2, torch.Generator().manual_seed(3))
    b = pipe.sample(2, torch.Generator().manual_seed(3))
    y1, y2 = pipe.apply(x, a), pipe.apply(x, b)
    assert torch.equal(y1, y2), "the same generator state gives the same transforms"
    (g,) = torch.autograd.grad(y1.square().sum(), x)
    assert g.abs().sum() > 0 and torch.isfinite(g).all()
    # Identity crop box and no-op resize leave the image as it was; flipping twice is the identity.
    assert torch.allclose(crop_resize(x, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), 16), x, atol=1e-5)
    assert torch.equal(resize_center_crop(x, 16), x)
    assert resize_center_crop(torch.rand(1, 3, 20, 30), 10).shape == (1, 3, 10, 10)
    assert torch.equal(hflip(hflip(x, torch.tensor([True, False])), torch.tensor([True, False])), x)


def test_metacloak_pipeline_draws_once_per_call_like_torchvision():
    pipe = metacloak_transforms(16)
    params = pipe.sample(4, torch.Generator().manual_seed(0))
    assert params[0] is None  # resize/crop has no randomness
    assert params[1].numel() == 1 and 0.1 <= float(params[1]) <= 2.0
    assert params[2].numel() == 1


# ------------------------------------------------------------------------------------------------
# cached surrogate, snapshot pool


class _Ctx:
    """The parts of RunContext that cached_dreambooth reads."""

    def __init__(self, cache_dir: Path, seed: int = 0):
        from cloak._progress import Progress

        self.cache_dir, self.seed, self.device, self.resolution = cache_dir, seed, torch.device("cpu"), 64
        self.progress = Progress()


def test_cached_dreambooth_trains_once_then_reuses(tiny_sd, tmp_path):
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in
                                        sorted(write_images(tmp_path / "a", n=2).glob("*.png"))]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    cfg = DreamBoothConfig(lr=1e-4)
    ctx = _Ctx(tmp_path / "cache")
    first, second, other = {}, {}, {}
    u1, t1 = cached_dreambooth(ctx, tiny_sd, pixels, 3, cfg, n_class_images=0, info=first)
    u2, t2 = cached_dreambooth(ctx, tiny_sd, pixels, 3, cfg, n_class_images=0, info=second)
    assert not first["cache_hit"] and second["cache_hit"] and first["key"] == second["key"]
    for a, b in zip(list(u1.parameters()) + list(t1.parameters()), list(u2.parameters()) + list(t2.parameters())):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in u2.parameters())
    changed = any(not torch.equal(a, b) for a, b in zip(u1.parameters(), tiny_sd.unet.parameters()))
    assert changed, "the surrogate was trained"
    # Another image set, step count or seed is another surrogate; no staging directory is left behind.
    cached_dreambooth(ctx, tiny_sd, pixels.flip(-1), 3, cfg, n_class_images=0, info=other)
    assert other["key"] != first["key"] and not other["cache_hit"]
    folder = Path(first["path"]).parent
    assert sorted(p.name for p in folder.iterdir()) == sorted([first["key"], other["key"]])
    assert (Path(first["path"]) / "unet.safetensors").is_file()
    assert pixels_sha256(pixels) == pixels_sha256(pixels.clone()) != pixels_sha256(pixels.flip(-1))


def test_snapshot_pool_roundtrip():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    pool = SnapshotPool((net,), 2)
    before = [p.detach().clone() for p in net.parameters()]
    pool.save(0, net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    pool.save(1, net)
    pool.load(0, net)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before))
    pool.load(1, net)
    assert all(torch.equal(a, b + 1) for a, b in zip(net.parameters(), before))
    with pytest.raises(RuntimeError):
        SnapshotPool((net,), 1).load(0, net)


def test_fsmg_reuses_its_surrogate_on_a_second_run(tmp_path, image_dir, ref_dir):
    args = ["protect", "--method", "fsmg", *TINY, *tiny_opts("fsmg"), "--json", "--ref", ref_dir, image_dir]
    a = ok(run_cli(*args, tmp_path / "a"))
    b = ok(run_cli(*args, tmp_path / "b"))
    assert b["summary"]["surrogate"]["cache_hit"] is True
    assert a["summary"]["surrogate"]["key"] == b["summary"]["surrogate"]["key"]
    for p in sorted((tmp_path / "a").glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "b" / p.name)))


# ------------------------------------------------------------------------------------------------
# targeted loss (T-ASPL / T-FSMG)


def test_ddpm_prev_sample_matches_diffusers_step(tiny_sd):
    from cloak.protect.aspl import ddpm_prev_sample

    sched = tiny_sd.noise_scheduler
    gen = torch.Generator().manual_seed(0)
    sample, out = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 637])
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    ours = ddpm_prev_sample(sched, out, t, sample, noise)
    for i in range(3):
        step_gen = torch.Generator().manual_seed(9)
        torch.randn(i, 4, 8, 8, generator=step_gen)  # advance to image i's noise
        ref = sched.step(out[i:i + 1], int(t[i]), sample[i:i + 1], generator=step_gen).prev_sample
        assert torch.allclose(ours[i:i + 1], ref, atol=1e-5), i


def test_targeted_fsmg_pulls_the_denoised_latent_to_the_target(tmp_path, image_dir, ref_dir, tiny_sd):
    """T-FSMG's own objective: MSE(ẑ_{t−1}, q(z_tgt, ε, t−1)) on fixed draws is lower after T-FSMG than
    after plain FSMG with the same seeds (the denoised latent depends on the image even on a random
    model). Weight 10 instead of 1: on a random UNet the L_dn gradient is mostly noise and at weight 1
    the margin is ~0.2 %; 10 makes the comparison robust without changing what is tested."""
    from cloak.adversarial.target import load_target
    from cloak.diffusion import encode_latents, encode_prompts
    from cloak.io.images import read_images
    from cloak.protect.aspl import ddpm_prev_sample

    target = tmp_path / "target.png"
    Image.fromarray(np.tile(np.array([[0, 255], [255, 0]], np.uint8).repeat(8, 0).repeat(8, 1)[..., None],
                            (4, 4, 3))).save(target)
    common = ["protect", "--method", "fsmg", "--tiny", "-o", "class_images=0", "-o", "surrogate_steps=1",
              "--steps", "8", "--json", "--ref", ref_dir, image_dir]
    rep = ok(run_cli(*common, tmp_path / "t", "--target-image", target, "-o", "target_weight=10"))
    assert rep["summary"]["targeted"]["path"] == str(target) and rep["summary"]["targeted"]["weight"] == 10
    plain = ok(run_cli(*common, tmp_path / "u"))
    assert "targeted" not in plain["summary"]

    sd = tiny_sd
    with torch.no_grad():
        z_tgt = encode_latents(sd.vae, load_target(target, (64, 64)), torch.Generator().manual_seed(0))
        text = encode_prompts(sd.tokenizer, sd.text_encoder, ["a photo of sks person"])

        def distance(folder):
            x = read_images(folder, 64).pixels
            g = torch.Generator().manual_seed(1)
            total = 0.0
            for _ in range(8):
                z = encode_latents(sd.vae, x, g)
                eps = torch.randn(z.shape, generator=g)
                t = torch.randint(1, 1000, (len(z),), generator=g)
                noisy = sd.noise_scheduler.add_noise(z, eps, t)
                pred = sd.unet(noisy, t, text.expand(len(z), -1, -1)).sample
                prev = ddpm_prev_sample(sd.noise_scheduler, pred, t, noisy, torch.randn(z.shape, generator=g))
                total += float(torch.mean((prev - sd.noise_scheduler.add_noise(z_tgt.expand_as(z), eps, t - 1)) ** 2))
            return total

        assert distance(tmp_path / "t") < distance(tmp_path / "u")


# ------------------------------------------------------------------------------------------------
# SimAC


def _simac(ctx_kwargs=None, **opts):
    from cloak._progress import Progress
    from cloak.methods import RunContext
    from cloak.models.handle import Models
    from cloak.protect.simac import Simac

    return Simac, lambda cache, **kw: Simac(Simac.Options(**opts), RunContext(
        models=Models(cache_dir=cache, tiny=True), model="tiny-sd", device=torch.device("cpu"), dtype=torch.float32,
        seed=0, generator=torch.Generator().manual_seed(0), resolution=64, cache_dir=cache, progress=Progress(),
        **(ctx_kwargs or {}), **kw))


def test_simac_timestep_selection_cuts_windows(tiny_sd, shared_cache, image_dir):
    from cloak.io.images import read_images

    _, make = _simac(select_rounds=3, select_candidates=2, min_timesteps=100)
    method = make(shared_cache)
    x0 = read_images(image_dir, 64).pixels
    sets, rounds = method.select_timesteps(tiny_sd, x0)
    assert rounds == 3 and len(sets) == len(x0)
    for s in sets:
        assert 1000 - 3 * 40 <= len(s) < 1000  # each round removes a window of at most 2·20
        removed = sorted(set(range(1000)) - set(s.tolist()))
        assert removed and removed[0] >= 0 and removed[-1] < 1000
    # Selection runs until at most min_timesteps remain when given enough rounds.
    method = make(shared_cache)
    method.opts.min_timesteps = 960
    sets, rounds = method.select_timesteps(tiny_sd, x0[:1])
    assert len(sets[0]) <= 960 and rounds < 3
    # PGD draws each image's timestep from its own set.
    method.timestep_sets = [torch.tensor([5, 6]), torch.tensor([700])]
    t = method.draw_timesteps(tiny_sd, x0[:2])
    assert int(t[0]) in (5, 6) and int(t[1]) == 700


@pytest.mark.parametrize("compat", [False, True])
def test_simac_feature_term_gradient_only_without_compat(tiny_sd, shared_cache, image_dir, compat):
    from cloak.diffusion import LatentCache, encode_prompts
    from cloak.io.images import read_images

    x0 = read_images(image_dir, 64).pixels
    x = (x0 + 0.05 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    text = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, ["a photo of sks person"])
    grads = {}
    for lam in (0.0, 1.0):
        _, make = _simac(feature_weight=lam)
        m = make(shared_cache, compat=compat)
        m._clean_latents = [LatentCache.encode(tiny_sd.vae, x0)]  # one per shape bucket
        m.ctx.generator.manual_seed(3)
        draw = m.draw(tiny_sd, x)
        xg = x.clone().requires_grad_(True)
        loss = m.loss(tiny_sd, tiny_sd.unet, xg, text, draw)
        (grads[lam],) = torch.autograd.grad(loss, xg)
        if lam:
            assert m._last_feature_loss > 0
    same = torch.allclose(grads[0.0], grads[1.0])
    assert same == compat  # [Q] detached under --compat; the default carries the term's gradient


@pytest.mark.parametrize("anchor, compat", [(None, False), (None, True), ("pgd_start", False), ("clean", True)])
def test_simac_feature_term_anchors_where_the_option_says(tiny_sd, shared_cache, image_dir, anchor, compat):
    """The clean branch of the feature term: the original images (default [PROP]) or, as released, the images
    at the start of each PGD call (``feature_anchor=pgd_start``, the default under --compat). With the same
    posterior sample in both branches the term is 0 exactly when the anchor is the image being scored: here
    x, the images entering the PGD call."""
    from cloak.diffusion import LatentCache, encode_prompts
    from cloak.io.images import read_images

    x0 = read_images(image_dir, 64).pixels
    x = (x0 + 0.05 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    text = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, ["a photo of sks person"])
    _, make = _simac(**({"feature_anchor": anchor} if anchor else {}))
    m = make(shared_cache, compat=compat)
    m._clean_latents = [LatentCache.encode(tiny_sd.vae, x0)]  # as prepare() leaves them
    expected = anchor or ("pgd_start" if compat else "clean")
    assert m.feature_anchor() == expected
    groups = Groups.of(x)
    out, _ = m.pgd(tiny_sd, tiny_sd.unet, tiny_sd.text_encoder, groups, Groups.of(x0), 0, 0.1, 0.01)
    assert torch.equal(out.parts[0], x)
    m.ctx.generator.manual_seed(3)
    draw = m.draw(tiny_sd, x)
    draw.extra["clean_posterior_noise"] = draw.posterior_noise  # one posterior sample for both branches
    with torch.no_grad():
        m.loss(tiny_sd, tiny_sd.unet, x, text, draw)
    if expected == "pgd_start":
        assert m._last_feature_loss < 1e-10, m._last_feature_loss
    else:
        assert m._last_feature_loss > 1e-6, m._last_feature_loss
    assert m.summary([])["feature_term"]["anchor"] == expected


# ------------------------------------------------------------------------------------------------
# E-ASPL, MetaCloak schedule, CAP's step counting


def test_easpl_ensemble_runs_each_model_and_averages(tmp_path, image_dir, ref_dir):
    rep = ok(run_cli("protect", "--method", "aspl", *TINY, "-o", "models=sd14,sd15,sd21-base", "-o", "iterations=2",
                     "-o", "surrogate_steps=1", "-o", "pgd_steps=1", "--json", "--ref", ref_dir, image_dir,
                     tmp_path / "e"))
    assert rep["summary"]["ensemble"] == ["sd14", "sd15", "sd21-base"]
    assert rep["summary"]["pgd_steps"] == 2 * 1 * 3
    roles = {m["role"] for m in rep["models"]}
    assert {"ensemble-0", "ensemble-1", "ensemble-2"} <= roles
    single = ok(run_cli("protect", "--method", "aspl", *TINY, "-o", "iterations=2", "-o", "surrogate_steps=1",
                        "-o", "pgd_steps=1", "--json", "--ref", ref_dir, image_dir, tmp_path / "s"))
    diff = [np.abs(np.asarray(Image.open(tmp_path / "e" / p.name), np.int16)
                   - np.asarray(Image.open(tmp_path / "s" / p.name), np.int16)).max()
            for p in sorted((tmp_path / "s").glob("*.png"))]
    assert max(diff) > 0 and single["summary"].get("ensemble") is None


def test_metacloak_published_schedule():
    from cloak.protect.metacloak import MetaCloak

    class Ctx:
        def iters(self, n):
            return n

    m = MetaCloak(MetaCloak.Options(), Ctx())
    assert m.snapshot_steps() == [0, 199, 399, 599, 799, 999]
    assert m.rounds() == 100
    assert m.total_pgd_steps() == 4 * 6 * 100 * 6
    assert m.opts.eps_m11 == pytest.approx(22 / 255) and m.opts.alpha_m11 == pytest.approx(2.2 / 255)


@pytest.mark.parametrize("name", ["aspl", "fsmg", "simac", "metacloak"])
def test_total_pgd_steps_matches_the_run(name, tmp_path, image_dir, ref_dir, monkeypatch):
    """CAP needs K (k̂ = K/2) before the run; every PGD step must go through ``update``."""
    from cloak.protect import PROTECT

    cls = PROTECT.get(name)
    seen = {}
    original_update = cls.update

    def counting_update(self, *a, **kw):
        seen["K"] = self.total_pgd_steps()
        seen["calls"] = seen.get("calls", 0) + 1
        return original_update(self, *a, **kw)

    monkeypatch.setattr(cls, "update", counting_update)
    rep = ok(run_cli("protect", "--method", name, *TINY, *tiny_opts(name), "--json", "--ref", ref_dir, image_dir,
                     tmp_path / "o"))
    assert seen["calls"] == seen["K"] == rep["summary"]["pgd_steps"]


@pytest.mark.parametrize("method, opts, labels", [
    ("aspl", {"iterations": 2, "surrogate_steps": 1, "pgd_steps": 1, "save_every": 1},
     ["iteration-0001", "iteration-0002"]),
    ("fsmg", {"steps": 4, "surrogate_steps": 1, "save_every": 2}, ["step-0002", "step-0004"]),
    ("cap", {"host": "fsmg", "steps": 2, "surrogate_steps": 1, "save_every": 1, "ratio_max": 2},
     ["step-0001", "step-0002"]),
])
def test_save_every_writes_the_set_mid_run(tmp_path, method, opts, labels):
    """The released scripts save x every 10 iterations (ASPL) / 20 steps (FSMG): -o save_every does that, in
    OUTPUT/.steps/<label>/, quantised within the budget; the last snapshot is the final output, byte for byte
    (for CAP this also checks that its canonical order is undone)."""
    from cloak.api import Common, run_protect

    images = write_images(tmp_path / "in", n=3)
    files = sorted(p.name for p in images.iterdir())
    common = Common(method=method, tiny=True, argv=[], options={"class_images": "0", **{k: str(v)
                                                                                      for k, v in opts.items()}})
    rep = run_protect(images, tmp_path / "out", common=common)
    steps = tmp_path / "out" / ".steps"
    assert sorted(p.name for p in steps.iterdir()) == labels
    assert rep.summary["snapshots"] == [str(steps / label) for label in labels]
    for label in labels:
        assert sorted(p.name for p in (steps / label).iterdir()) == files
    for name in files:
        assert (steps / labels[-1] / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    eps_levels = int(rep.summary["budget"]["eps_m11"] * 127.5 + 1e-6)
    first = pngs(steps / labels[0])
    for name, arr in pngs(images).items():
        assert np.abs(first[name].astype(int) - arr.astype(int)).max() <= eps_levels


@pytest.mark.parametrize("method, opts", [
    ("aspl", {"iterations": 1, "surrogate_steps": 1, "pgd_steps": 2}),
    ("simac", {"iterations": 1, "surrogate_steps": 1, "pgd_steps": 2, "select_rounds": 1}),
    ("fsmg", {"steps": 2, "surrogate_steps": 1, "target_weight": 1.0}),
    ("cap", {"host": "fsmg", "steps": 2, "surrogate_steps": 1, "ratio_max": 2, "start_fraction": 0}),
])
def test_pgd_batch_gives_the_whole_set_step_in_chunks(tmp_path, method, opts):
    """-o pgd_batch=2 on 3 images: the chunks' weighted losses and gradients are the whole set's, on the same
    draws, so the protected images equal the one-batch run's up to float rounding in the UNet."""
    from cloak.api import Common, run_protect

    images = write_images(tmp_path / "in", n=3)
    outputs = {}
    for batch in (0, 2):
        options = {"class_images": "0", "pgd_batch": str(batch), **{k: str(v) for k, v in opts.items()}}
        rep = run_protect(images, tmp_path / f"out{batch}", common=Common(method=method, tiny=True, argv=[],
                                                                         options=options))
        outputs[batch] = pngs(tmp_path / f"out{batch}")
        assert rep.summary.get("final_pgd_loss") is None or np.isfinite(rep.summary["final_pgd_loss"])
    for name, whole in outputs[0].items():
        diff = np.abs(whole.astype(int) - outputs[2][name].astype(int))
        assert (diff == 0).mean() > 0.95, (name, (diff == 0).mean())
