"""The fixed-model protections: advdm, photoguard, mist (protect.md §3–5).

Efficacy is measured independently of what the methods report about themselves, against clean
images with the same seeds:
* AdvDM: the attacker's denoising loss on the clean subject photos after the same DreamBooth run is
  higher when it trained on the protected photos — and higher than after training on random ±ε sign
  noise of the same budget, so the gradient matters, not just the noise. tiny-sd has a random VAE
  whose posterior noise (std ≈ 1) swamps the image (scaled mean std ≈ 0.05), so at the released
  budget nothing measurable happens in a test's few steps; as in test_efficacy.py, the test uses a
  larger budget (0.1 m11), 50 steps and an attacker at lr 1e-4. Margins seen for seeds 0, 1, 2:
  +0.005, +0.021, +0.026 over clean (losses ≈ 0.73); +0.008, +0.024, +0.011 over random noise.
* PhotoGuard and Mist (textural): the latent distance to the target, recomputed here from the
  saved 8-bit PNGs with the stand-in VAE, is lower for the protected images than for the clean ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pngs, write_images, write_sign_noise
from PIL import Image

METHODS = ["advdm", "photoguard", "mist"]
DEFAULT_MODELS = {"advdm": "sd21-base", "photoguard": "sd15", "mist": "sd14"}


def protect(cli, src: Path, out: Path, method: str, *args) -> dict:
    r = cli("protect", "--tiny", "-q", "--json", "--method", method, *args, src, out)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def as_m11(folder: Path) -> torch.Tensor:
    arrays = [a for _, a in sorted(pngs(folder).items())]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


# --- budget, determinism, independence ------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_budget_unit_determinism_and_default_model(cli, image_dir, tmp_path, method):
    args = ("--eps", "4", "--eps-unit", "255", "--steps", "3")
    runs, reports = {}, {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        reports[name] = protect(cli, image_dir, tmp_path / name, method, *args, "--seed", seed)
        runs[name] = pngs(tmp_path / name)
    rep = reports["a"]
    # 4 levels of [0,1] = 8/255 in [-1,1]: at most 4 8-bit levels either way.
    assert rep["summary"]["budget"] == {"eps": 4.0, "unit": "255", "eps_m11": pytest.approx(8 / 255)}
    assert rep["options"]["unit"] == {"value": "255", "source": "flag"}
    clean = pngs(image_dir)
    assert sorted(runs["a"]) == sorted(clean)
    diffs = [np.abs(runs["a"][k] - clean[k]).max() for k in clean]
    assert max(diffs) <= 4 and min(diffs) > 0, diffs
    assert all((runs["a"][k] == runs["b"][k]).all() for k in clean), "same seed must give the same bytes"
    assert any((runs["a"][k] != runs["c"][k]).any() for k in clean), "another seed must give another result"
    # Without --model the method's own base model applies.
    assert rep["params"]["model"] == {"value": DEFAULT_MODELS[method], "source": "default"}


@pytest.mark.parametrize("method", METHODS)
def test_an_images_result_does_not_depend_on_the_others(cli, image_dir, tmp_path, method):
    """Each image draws from its own stream: alone or in a set, it gets the same perturbation.

    With batch_size=1 the arithmetic is identical too, so the bytes must match exactly. (Larger
    batches can differ by floating-point rounding in batched kernels, amplified by the sign step.)
    """
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(image_dir / "img1.png", alone / "img1.png")
    protect(cli, image_dir, tmp_path / "set", method, "--steps", "3", "-o", "batch_size=1")
    protect(cli, alone, tmp_path / "one", method, "--steps", "3", "-o", "batch_size=1")
    assert (pngs(tmp_path / "set")["img1.png"] == pngs(tmp_path / "one")["img1.png"]).all()


def test_streams_follow_the_image_not_its_position():
    from cloak.adversarial.per_image import ImageStreams

    x = torch.rand(3, 3, 8, 8) * 2 - 1
    both = ImageStreams.for_images(x, 0)
    one = ImageStreams.for_images(x[[2]], 0)
    assert torch.equal(both.subset([2]).randn((5,), "cpu"), one.randn((5,), "cpu"))
    other_seed = ImageStreams.for_images(x[[2]], 1)
    assert not torch.equal(one.randn((5,), "cpu"), other_seed.randn((5,), "cpu"))
    assert not torch.equal(both.subset([0]).randn((5,), "cpu"), both.subset([1]).randn((5,), "cpu"))


def test_model_flag_beats_the_methods_default(cli, image_dir, tmp_path):
    from cloak.protect import PROTECT

    rep = protect(cli, image_dir, tmp_path / "b", "photoguard", "--steps", "1", "--model", "tiny-sd")
    assert rep["params"]["model"] == {"value": "tiny-sd", "source": "flag"}
    assert PROTECT.get("aspl").default_model == "sd21-base"  # methods that name none keep the verb's default


@pytest.mark.parametrize("method", METHODS)
def test_methods_show(cli, method):
    r = cli("methods", "show", method)
    assert r.exit_code == 0, r.stderr
    assert "paper:" in r.stdout and "arXiv" in r.stdout
    expected = {"advdm": (16.0, 1.0, "255", 100), "photoguard": (0.06, 0.02, "m11", 1000),
                "mist": (16.0, 1.0, "255", 100)}[method]
    eps_line = next(line for line in r.stdout.splitlines() if "-o eps=" in line)
    assert f"[{expected[2]}]" in eps_line and "-o steps=" in r.stdout  # the budget shows its unit
    assert f"Default model: {DEFAULT_MODELS[method]}" in r.stdout
    info = json.loads(cli("methods", "show", method, "--json").stdout)
    rows = {row["name"]: row for row in info["options"]}
    assert (rows["eps"]["default"], rows["alpha"]["default"], rows["unit"]["default"],
            rows["steps"]["default"]) == expected
    assert rows["eps"]["unit"] == "unit"


# --- AdvDM ------------------------------------------------------------------------------------------

ATTACK = ["--tiny", "-q", "--json", "-o", "class_images=0", "-o", "lr=1e-4", "--steps", "60", "--num-images", "0"]


def test_advdm_raises_the_attackers_denoising_loss(cli, tmp_path):
    clean = write_images(tmp_path / "clean", n=3, seed=0)
    protect(cli, clean, tmp_path / "protected", "advdm", "--eps", "0.1", "--eps-unit", "m11", "--steps", "100")
    write_sign_noise(clean, tmp_path / "noise", 12)  # the same budget (0.1 m11 = 12 levels), random signs
    losses = {}
    for name in ("clean", "protected", "noise"):
        r = cli("attack", *ATTACK, "--seed", 0, "--ref", clean, tmp_path / name, tmp_path / f"attack-{name}")
        assert r.exit_code == 0, r.stderr
        losses[name] = json.loads(r.stdout)["summary"]["ref_denoising_loss"]
    assert losses["protected"] > losses["clean"] + 0.002, losses
    assert losses["protected"] > losses["noise"], losses


# --- PhotoGuard ---------------------------------------------------------------------------------------

def _vae(shared_cache):
    from cloak.models.handle import Models

    return Models(cache_dir=shared_cache, tiny=True).sd("sd15").vae


@torch.no_grad()
def _latent_mean(vae, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels).latent_dist.mean


def test_photoguard_pulls_the_latent_to_mid_gray(cli, image_dir, tmp_path, shared_cache):
    protect(cli, image_dir, tmp_path / "out", "photoguard", "--steps", "20")
    vae = _vae(shared_cache)
    z_gray = _latent_mean(vae, torch.zeros(1, 3, 64, 64))
    before = (_latent_mean(vae, as_m11(image_dir)) - z_gray).flatten(1).norm(dim=1)
    after = (_latent_mean(vae, as_m11(tmp_path / "out")) - z_gray).flatten(1).norm(dim=1)
    assert (after < 0.8 * before).all(), (before, after)


def test_photoguard_target_image(cli, image_dir, tmp_path, shared_cache):
    target = write_images(tmp_path / "target", n=1, seed=9) / "img0.png"
    rep = protect(cli, image_dir, tmp_path / "out", "photoguard", "--steps", "20", "--target-image", target)
    assert rep["summary"]["target"]["source"] == "--target-image"
    vae = _vae(shared_cache)
    z_t = _latent_mean(vae, as_m11(target.parent))
    before = (_latent_mean(vae, as_m11(image_dir)) - z_t).flatten(1).norm(dim=1)
    after = (_latent_mean(vae, as_m11(tmp_path / "out")) - z_t).flatten(1).norm(dim=1)
    assert (after < 0.8 * before).all(), (before, after)
    # The report's own figures agree in direction with the independent measurement.
    assert all(i["latent_distance"] < i["latent_distance_clean"] for i in rep["items"])


def test_photoguard_step_decays_linearly_to_a_hundredth():
    from cloak.protect.photoguard import step_schedule

    step = step_schedule(0.02, 1000)
    assert step(0) == pytest.approx(0.02)
    assert step(500) == pytest.approx(0.02 - 0.0198 / 2)
    assert step(999) == pytest.approx(0.0002 + 0.0198 / 1000)


def test_target_image_flag_and_option_must_agree(cli, image_dir, tmp_path):
    a = write_images(tmp_path / "ta", n=1, seed=3) / "img0.png"
    b = write_images(tmp_path / "tb", n=1, seed=4) / "img0.png"
    r = cli("protect", "--tiny", "--method", "photoguard", "--steps", "1", "--target-image", a,
            "-o", f"target_image={b}", image_dir, tmp_path / "out")
    assert r.exit_code == 2 and "disagree" in r.stderr
    r = cli("protect", "--tiny", "--method", "mist", "--steps", "1", "--target-image", tmp_path / "missing.png",
            image_dir, tmp_path / "out2")
    assert r.exit_code == 3 and "missing.png" in r.stderr


# --- Mist ---------------------------------------------------------------------------------------------

def _textural_distance(vae, pixels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    s = vae.config.scaling_factor
    return ((_latent_mean(vae, pixels) - _latent_mean(vae, target)) * s).pow(2).flatten(1).sum(1)


def test_mist_textural_pulls_the_latent_to_the_packaged_texture(cli, image_dir, tmp_path, shared_cache):
    from cloak.adversarial.target import load_target
    from cloak.protect.mist import DEFAULT_TARGET

    rep = protect(cli, image_dir, tmp_path / "out", "mist", "-o", "mode=textural", "--steps", "10")
    assert rep["summary"]["target"]["source"] == "builtin" and rep["summary"]["mode_code"] == 1
    vae = _vae(shared_cache)
    target = load_target(DEFAULT_TARGET, (64, 64))
    before = _textural_distance(vae, as_m11(image_dir), target)
    after = _textural_distance(vae, as_m11(tmp_path / "out"), target)
    assert (after < 0.9 * before).all(), (before, after)


def test_mist_textural_uses_the_target_image(cli, image_dir, tmp_path, shared_cache):
    target_dir = write_images(tmp_path / "target", n=1, seed=9)
    rep = protect(cli, image_dir, tmp_path / "out", "mist", "-o", "mode=textural", "--steps", "10",
                  "-o", f"target_image={target_dir / 'img0.png'}")
    assert rep["summary"]["target"]["source"] == "option"
    vae = _vae(shared_cache)
    target = as_m11(target_dir)
    before = _textural_distance(vae, as_m11(image_dir), target)
    after = _textural_distance(vae, as_m11(tmp_path / "out"), target)
    assert (after < 0.9 * before).all(), (before, after)


def test_mist_modes_and_fusion_weight(cli, image_dir, tmp_path):
    rep = protect(cli, image_dir, tmp_path / "sem", "mist", "-o", "mode=semantic", "--steps", "2")
    assert rep["summary"]["mode_code"] == 0 and "target" not in rep["summary"]
    rep = protect(cli, image_dir, tmp_path / "fused", "mist", "-o", "rate=2", "--steps", "2")
    assert rep["summary"]["mode"] == "fused" and rep["summary"]["fusion_weight"] == pytest.approx(1e5)
    r = cli("protect", "--tiny", "--method", "mist", "-o", "mode=1", image_dir, tmp_path / "bad")
    assert r.exit_code == 2


def test_packaged_mist_target_is_what_the_script_draws():
    from cloak.data.make_mist_target import pattern
    from cloak.protect.mist import DEFAULT_TARGET

    with Image.open(DEFAULT_TARGET) as img:
        shipped = np.asarray(img.convert("RGB"))
    assert shipped.shape == (512, 512, 3)
    assert (shipped == pattern()).all()
    assert DEFAULT_TARGET.stat().st_size < 16_000
