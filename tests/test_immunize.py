"""``cloak immunize`` / APDM: the DPO loss, the L2P schedule, the model directory, resume, efficacy.

A note on the stand-in used by the objective and efficacy tests. tiny-sd's random VAE is blind to image
content: two different photos give latent means that differ by ~15 % of the posterior noise, which is
resampled at every draw, so no method can tell the subject's images from the safe ones through it. Those
tests therefore use ``sharp_sd``: tiny-sd with its VAE's posterior made near-deterministic (the
``quant_conv`` that produces (mean, log-variance) rescaled: log-variance −8, mean ×5). Same architecture,
random weights, loaded through ``from_pretrained`` as a local model directory like any other.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_images

from cloak._progress import Progress, Task
from cloak.api import Common
from cloak.config import Config
from cloak.diffusion.dpo import LOG2, dpo_loss, dpo_target
from cloak.errors import OutputExistsError, UsageError
from cloak.immunize.apdm import Apdm, shell_mangled, transfer_gradients
from cloak.immunize.run import partial_dir, run_immunize
from cloak.io.report import Report

# Seconds on tiny-sd: one outer iteration of one inner step, 2 class images, generated safe set.
FAST = {"class_images": 2, "class_image_steps": 2, "safe_image_steps": 2, "iterations": 1, "inner_steps": 1}

# Objective/efficacy setting on sharp_sd (the published defaults otherwise: released gradient quirk, prior
# preservation in both paths, per-element DPO):
# * lr 1e-4 and 8 pairs per draw, so that 6 x 2 inner steps move the model measurably; 24 timesteps per image
#   in the fixed-draw evaluation (with these settings the DPO objective fell for each of 9 seeds tried);
# * beta 0.01: the per-element loss is ln 2 + βΔ/2 + β²Δ²/8; on a random network every Adam step changes
#   each prediction by a random amount, and the quadratic term of that noise outweighs the (first-order)
#   preference learned in a few steps unless β is small. AdamW is invariant to the loss scale, so the
#   training trajectory is the same as with β = 1 up to the curvature of log σ.
OBJECTIVE = {"class_images": 2, "class_image_steps": 2, "iterations": 6, "inner_steps": 2, "batch_size": 8,
             "lr": 1e-4, "beta": 0.01, "eval_timesteps": 24}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests are many small UNet calls: on the shared two-core machine a second intra-op thread only
    spins against the other processes (fused AdamW on 1.6 M parameters took seconds per step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _common(**kw) -> Common:
    kw.setdefault("argv", [])
    kw.setdefault("config", Config())
    return Common(**kw)


# ------------------------------------------------------------------------------------------------
# the DPO loss (shared math)


def test_dpo_loss_is_log2_at_the_reference_and_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    e = [torch.rand(2, 4, 8, 8, generator=g) for _ in range(4)]
    assert float(dpo_loss(e[0], e[0], e[1], e[1])) == pytest.approx(LOG2, abs=1e-7)
    delta = (e[0] - e[1]) - (e[2] - e[3])
    for beta in (1.0, 5.0):
        want = -torch.nn.functional.logsigmoid(-beta * delta).mean()
        torch.testing.assert_close(dpo_loss(*e, beta=beta), want)
        want_sample = -torch.nn.functional.logsigmoid(-beta * delta.sum((1, 2, 3))).mean()
        torch.testing.assert_close(dpo_loss(*e, beta=beta, reduce="sample"), want_sample)
    with pytest.raises(ValueError):
        dpo_loss(*e, reduce="pixel")


def test_dpo_prefers_the_safe_image():
    """Lower error on the safe image (or higher on the subject), against the reference, lowers the loss."""
    ref = torch.ones(1, 4, 4, 4)
    assert float(dpo_loss(ref * 0.5, ref, ref, ref)) < LOG2  # safe denoised better than the reference
    assert float(dpo_loss(ref, ref, ref * 2, ref)) < LOG2  # subject denoised worse
    assert float(dpo_loss(ref, ref, ref * 0.5, ref)) > LOG2  # subject learned: penalised
    safe, unsafe = ref.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    dpo_loss(safe, ref, unsafe, ref).backward()
    assert (safe.grad > 0).all() and (unsafe.grad < 0).all()


def test_dpo_target_epsilon_only_is_the_released_quirk(tiny_sd_v):
    sched = tiny_sd_v.noise_scheduler
    z, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    assert torch.equal(dpo_target(sched, z, noise, t, epsilon_only=True), noise)
    torch.testing.assert_close(dpo_target(sched, z, noise, t, epsilon_only=False), sched.get_velocity(z, noise, t))


def test_shell_mangled_prompt():
    assert shell_mangled("a photo of sks person") == '"a_photo_of_sks_person"'


# ------------------------------------------------------------------------------------------------
# the L2P schedule


def test_transfer_gradients_sums_and_skips_missing():
    dst = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    src = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    src[0].grad = torch.ones(3)
    transfer_gradients(dst, src)
    assert torch.equal(dst[0].grad, torch.ones(3)) and dst[1].grad is None
    src[0].grad = torch.full((3,), 2.0)  # θ'.grad is a new tensor after each zero_grad(set_to_none)
    src[1].grad = torch.ones(2)
    transfer_gradients(dst, src)
    assert torch.equal(dst[0].grad, torch.full((3,), 3.0)) and torch.equal(dst[1].grad, torch.ones(2))


def _method(shared_cache, options: dict, *, seed: int = 0) -> Apdm:
    from cloak.methods import RunContext, build_options
    from cloak.models.handle import Models

    opts, _ = build_options(Apdm.Options, [("test", options)], "apdm")
    ctx = RunContext(models=Models(cache_dir=shared_cache, tiny=True), model="sd15", device=torch.device("cpu"),
                     dtype=torch.float32, seed=seed, generator=torch.Generator().manual_seed(seed), resolution=64,
                     cache_dir=shared_cache, progress=Progress())
    return Apdm(opts, ctx)


def test_released_quirk_transfers_the_personalization_gradient_too(shared_cache, tmp_path):
    """With J = 1, θ.grad is ∇L_db(θ) + ∇L_prot(θ'_1) by default and ∇L_prot(θ'_1) with l2p_pure."""
    from cloak.diffusion.dreambooth import copy_params
    from cloak.io.images import read_images

    m = _method(shared_cache, {**FAST})
    m.setup(read_images(write_images(tmp_path / "s", n=2), 64), read_images(write_images(tmp_path / "p", n=2,
                                                                                         seed=7), 64))
    gen_state = m.ctx.generator.get_state()
    loaders = [m.instance_loader, m.pair_loader, m.class_loader]
    loader_states = [ld.state() for ld in loaders]

    def rewind():
        m.ctx.generator.set_state(gen_state)
        for ld, st in zip(loaders, loader_states):
            ld.restore(st)

    def accumulated(pure: bool) -> list[torch.Tensor]:
        rewind()
        m.opts.l2p_pure = pure
        m.opt.zero_grad(set_to_none=True)
        m.accumulate(1)
        return [p.grad.clone() for p in m.theta.parameters()]

    quirk, pure = accumulated(False), accumulated(True)
    rewind()  # the personalization step's own draws: the first ones of the iteration
    copy_params(m.theta, m.scratch)
    m.scratch.zero_grad(set_to_none=True)
    m.personalization_loss(m.scratch).backward()
    db = [p.grad for p in m.scratch.parameters()]
    assert sum(float(g.abs().sum()) for g in db) > 0 and sum(float(g.abs().sum()) for g in pure) > 0
    for q, p, d in zip(quirk, pure, db):
        torch.testing.assert_close(q - p, d, rtol=1e-4, atol=1e-6)


def test_unfreeze_restricts_the_transfer(shared_cache, tiny_sd):
    m = _method(shared_cache, {"unfreeze": "up_blocks,mid_block"})
    assert m.opts.unfreeze == ["up_blocks", "mid_block"]
    names = [n for n, _ in tiny_sd.unet.named_parameters()]
    mask = m.transfer_mask(tiny_sd.unet)
    assert any(mask) and not all(mask)
    assert all(("up_blocks" in n or "mid_block" in n) == k for n, k in zip(names, mask))
    with pytest.raises(UsageError):
        _method(shared_cache, {"unfreeze": "no_such_block"}).transfer_mask(tiny_sd.unet)


# ------------------------------------------------------------------------------------------------
# the verb: model directory, report, CLI


def test_cli_writes_a_model_directory_that_round_trips(cli, tmp_path):
    from diffusers import StableDiffusionPipeline

    subject = write_images(tmp_path / "subject", n=2)
    out = tmp_path / "immunized"
    opts = [x for k, v in FAST.items() for x in ("-o", f"{k}={v}")]
    r = cli("immunize", "--tiny", *opts, subject, out, "--json")
    assert r.exit_code == 0, r.stderr
    report = Report.model_validate(json.loads(r.stdout))
    assert report.verb == "immunize" and report.method == "apdm" and report.summary["stand_in"] is True
    s = report.summary
    assert s["safe_set"] == "generated" and s["changed_components"] == ["unet"]
    assert s["eval_start"]["dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"db", "prot", "dpo"} <= set(s["loss_start"]) and s["train_seconds"] > 0
    assert Report.model_validate_json((out / "report.json").read_text()).summary["model_dir"] == str(out)
    assert not partial_dir(out).exists() and not list(tmp_path.glob(".immunized*"))

    # Only the UNet changes: every other component is the base's, byte for byte.
    base = Path(report.models[0].path)
    for comp in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in (base / comp).iterdir():
            assert (out / comp / f.name).read_bytes() == f.read_bytes(), f
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    base_pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    changed = [not torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(),
                                                     base_pipe.unet.state_dict().values())]
    assert any(changed)

    # Existing output: refused, kept by --resume, replaced by --force.
    again = cli("immunize", "--tiny", *opts, subject, out)
    assert again.exit_code == 2 and "--force" in again.stderr
    kept = cli("immunize", "--tiny", *opts, subject, out, "--resume", "--json")
    assert kept.exit_code == 0 and json.loads(kept.stdout)["started"] == report.started
    forced = cli("immunize", "--tiny", *opts, subject, out, "--force", "-q")
    assert forced.exit_code == 0 and forced.stdout.strip() == str(out)


def test_help_and_methods(cli):
    r = cli("immunize", "--help")
    assert r.exit_code == 0 and "Examples" in r.stdout and "--safe" in r.stdout and "--resume" in r.stdout
    shown = cli("methods", "show", "apdm")
    assert shown.exit_code == 0 and "l2p_pure" in shown.stdout and "loss" in shown.stdout


def test_safe_set_must_pair_with_the_subject(cli, tmp_path):
    subject = write_images(tmp_path / "subject", n=2)
    safe = write_images(tmp_path / "safe", n=3, seed=3)
    r = cli("immunize", "--tiny", "-o", "class_images=0", "--safe", safe, subject, tmp_path / "out")
    assert r.exit_code == 3 and "pairs" in r.stderr
    assert not (tmp_path / "out").exists()


def test_naive_loss_is_available_for_ablation(tmp_path):
    """-o loss=naive ascends the subject's denoising loss (released --negative_loss)."""
    subject = write_images(tmp_path / "subject", n=2)
    opts = {**FAST, "class_images": 0, "loss": "naive", "l2p_pure": True, "lr": 1e-4, "iterations": 2}
    rep = run_immunize(subject, tmp_path / "out", common=_common(tiny=True, options=opts))
    s = rep.summary
    assert s["loss"] == "naive" and "naive" in s["loss_end"]
    assert s["eval_end"]["subject_dn"] > s["eval_start"]["subject_dn"]


# ------------------------------------------------------------------------------------------------
# long runs: checkpoints, interruption, resume


class _InterruptAt(Progress):
    """Raises KeyboardInterrupt (as Ctrl-C would) after the n-th finished outer iteration."""

    def __init__(self, n: int):
        self.n = n

    def task(self, description, total):
        outer = self

        class _T(Task):
            done = 0

            def advance(self, n=1, status=None):
                self.done += n
                if self.done >= outer.n:
                    raise KeyboardInterrupt

        return _T()


def _unet_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_resume_after_interruption_is_bit_for_bit(tmp_path):
    subject = write_images(tmp_path / "subject", n=2)
    opts = {**FAST, "iterations": 4, "lr": 1e-4}

    full = run_immunize(subject, tmp_path / "full", checkpoint_every=2, common=_common(tiny=True, options=opts))
    assert full.summary["checkpoints_written"] == 1 and not partial_dir(tmp_path / "full").exists()

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_immunize(subject, out, checkpoint_every=2, common=_common(tiny=True, options=opts,
                                                                       progress=_InterruptAt(3)))
    ckpt = partial_dir(out) / "checkpoint.safetensors"
    assert ckpt.is_file() and not out.exists()

    # Without --resume the checkpoint is protected; with other settings it is refused.
    with pytest.raises(OutputExistsError, match="--resume"):
        run_immunize(subject, out, checkpoint_every=2, common=_common(tiny=True, options=opts))
    with pytest.raises(UsageError, match="different settings"):
        run_immunize(subject, out, common=_common(tiny=True, options={**opts, "lr": 2e-4}, resume=True))

    resumed = run_immunize(subject, out, checkpoint_every=2, common=_common(tiny=True, options=opts, resume=True))
    assert resumed.summary["resumed_from"] == 2
    assert resumed.summary["history"] == full.summary["history"]
    a, b = _unet_tensors(tmp_path / "full"), _unet_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not partial_dir(out).exists()


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    import safetensors.torch

    from cloak.immunize.base import Checkpoints

    subject = write_images(tmp_path / "subject", n=2)
    real_save = safetensors.torch.save_file
    calls = []

    def save_then_ctrl_c(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half-written when Ctrl-C arrives
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_ctrl_c)
    out = tmp_path / "out"
    opts = {**FAST, "iterations": 4}
    with pytest.raises(KeyboardInterrupt):
        run_immunize(subject, out, checkpoint_every=1, common=_common(tiny=True, options=opts))
    folder = partial_dir(out)
    assert [p.name for p in folder.iterdir()] == ["checkpoint.safetensors"]  # no temporary file left
    ckpt = Checkpoints(folder, 1, {}, resume=True)
    with safetensors.safe_open(str(ckpt.path), framework="pt") as fh:
        ckpt.fingerprint = json.loads(fh.metadata()["fingerprint"])
    tensors, state = ckpt.load()
    assert state["iteration"] == 1 and any(k.startswith("adam.") for k in tensors) and "rng.generator" in tensors


# ------------------------------------------------------------------------------------------------
# objective and efficacy on sharp_sd


@pytest.fixture(scope="session")
def sharp_sd(shared_cache, tmp_path_factory) -> Path:
    """tiny-sd with a content-preserving VAE posterior (see the module docstring)."""
    from diffusers import AutoencoderKL

    from cloak.models.handle import Models

    _, base, _ = Models(cache_dir=shared_cache).resolve("tiny-sd", "base")
    target = tmp_path_factory.mktemp("sharp") / "sharp-sd"
    shutil.copytree(base, target, ignore=shutil.ignore_patterns(".*", "cloak_builtin.json"))
    vae = AutoencoderKL.from_pretrained(target / "vae", local_files_only=True)
    with torch.no_grad():
        vae.quant_conv.weight[:4] *= 5.0
        vae.quant_conv.bias[:4] *= 5.0
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -8.0
    vae.save_pretrained(target / "vae", safe_serialization=True)
    (target / "cloak_model.json").write_text(json.dumps({"stand_in": True, "note": "tiny-sd, sharpened VAE"}))
    return target


@pytest.fixture(scope="module")
def immunized(sharp_sd, shared_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("immunized")
    subject, safe = write_images(root / "subject", n=3, seed=0), write_images(root / "safe", n=3, seed=7)
    report = run_immunize(subject, root / "model", safe=str(safe),
                          common=_common(model=str(sharp_sd), options=dict(OBJECTIVE), cache_dir=str(shared_cache)))
    return report, root


def test_dpo_objective_decreases(immunized):
    """The fixed-draw DPO objective of the real model falls from ln 2 (θ = θ_ref) during training."""
    report, _ = immunized
    s = report.summary
    assert s["eval_start"]["dpo"] == pytest.approx(LOG2, abs=1e-6) and s["eval_start"]["dpo_margin"] == 0
    assert s["eval_end"]["dpo"] < s["eval_start"]["dpo"]
    assert s["eval_end"]["dpo_margin"] > 0  # the subject's error rose more than the safe images'
    assert len(s["history"]["dpo"]) == OBJECTIVE["iterations"] and s["safe_set"] == "given"


def test_personalizing_the_immunized_model_learns_the_subject_worse(immunized, cli, shared_cache, sharp_sd):
    """DreamBooth (same seeds) on the subject, from the base and from the immunized model.

    Measured: the attacker's denoising loss on the subject minus the same loss on the paired safe images (other
    members of the class), after personalization, on fixed draws (the report's ref_denoising_loss estimator with
    25 timesteps x 6 noise draws per image: its default 10 x 2 is too coarse for differences of ~1e-3; with
    this one the comparison held for each of 7 seeds tried). On a random network every
    term of APDM's objective (prior preservation, the safe images' preference, the released quirk's
    personalization gradient) also teaches generic denoising, which lowers every loss of the immunized model,
    so the absolute subject loss is no measure of protection here; how much worse the subject is learned than
    the rest of the class is (DPO's preference), and it is what this test requires to rise.
    The attacker's lr is 1e-4 so that six steps really personalize the tiny model.
    """
    from cloak.diffusion.evaluate import fixed_denoising_loss
    from cloak.io.images import read_images
    from cloak.models.handle import Models

    _, root = immunized
    attack = ["-o", "class_images=2", "-o", "class_image_steps=2", "-o", "num_images=1", "-o", "sample_steps=1",
              "-o", "steps=6", "-o", "lr=1e-4", "-o", "batch_size=1", "--prompt", "a photo of sks person",
              "--seed", "0", "--cache-dir", shared_cache]
    gaps = {}
    for name, model in (("base", sharp_sd), ("immunized", root / "model")):
        r = cli("attack", "--method", "dreambooth", "--model", model, root / "subject", root / f"attack-{name}",
                "--ref", root / "subject", "--save-model", root / f"personalized-{name}", "--json", *attack)
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["summary"]["ref_denoising_loss"] > 0
        sd = Models(cache_dir=shared_cache).sd(str(root / f"personalized-{name}"))
        loss = {which: fixed_denoising_loss(sd.unet, sd.text_encoder, sd, read_images(root / which, 64).pixels,
                                            "a photo of sks person", timesteps=25, repeats=6)
                for which in ("subject", "safe")}
        gaps[name] = loss["subject"] - loss["safe"]
    assert gaps["immunized"] > gaps["base"], gaps
