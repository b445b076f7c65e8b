"""The attack methods beyond plain DreamBooth, on tiny-sd: LoRA, DiffShortcut, the zero-shot IP-Adapter.

What each test pins down: LoRA really trains (its loss on the instance images drops) and saves only an
adapter that reloads into diffusers; DiffShortcut trains on both negative-token prompt sets and samples
with the negative prompt it should (checked on the pipeline call itself); the zero-shot attack's output
follows the reference image; training resumes from a checkpoint to the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images
from PIL import Image

from cloak.api import Common, run_attack
from cloak.diffusion.sampling import slug
from cloak.errors import UsageError


def _common(method: str, options: dict, **kw) -> Common:
    return Common(method=method, tiny=True, argv=[], options=dict(options), **kw)


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


@pytest.fixture
def pipeline_calls(monkeypatch):
    """Every StableDiffusionPipeline call's arguments, recorded on the way to the real call."""
    from diffusers import StableDiffusionPipeline

    calls: list[dict] = []
    original = StableDiffusionPipeline.__call__

    def recording(self, *args, **kwargs):
        calls.append({"prompt": args[0] if args else kwargs.get("prompt"), **kwargs})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recording)
    return calls


# --- LoRA -------------------------------------------------------------------------------------------

def test_lora_lowers_its_training_loss_on_the_instance_images(tmp_path):
    images = write_images(tmp_path / "in", n=2)
    # Same seed, same fixed (t, ε) draws: 0 steps is the base model (LoRA B starts at 0).
    opts = {"class_images": 0, "lr": 2e-2, "num_images": 0}
    before = run_attack(images, tmp_path / "a", ref=str(images), common=_common("lora", {**opts, "steps": 0}))
    after = run_attack(images, tmp_path / "b", ref=str(images), common=_common("lora", {**opts, "steps": 8}))
    loss0, loss1 = before.summary["ref_denoising_loss"], after.summary["ref_denoising_loss"]
    assert loss1 < 0.97 * loss0, (loss0, loss1)
    assert after.summary["lora_parameters"] > 0 and after.summary["lora_rank"] == 4


def test_lora_save_model_is_a_small_adapter_that_reloads_in_diffusers(tmp_path, tiny_sd):
    import copy

    from cloak.diffusion.sampling import build_pipeline, generate

    images = write_images(tmp_path / "in", n=2)
    saved = tmp_path / "adapter"
    rep = run_attack(images, tmp_path / "out", save_model=str(saved), num_images=1, sample_steps=2,
                     prompts=["a photo of sks person"],
                     common=_common("lora", {"class_images": 0, "steps": 3, "lr": 1e-2}))
    assert sorted(p.name for p in saved.iterdir()) == ["cloak_model.json", "pytorch_lora_weights.safetensors"]
    unet_bytes = (Path(tiny_sd.path) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (saved / "pytorch_lora_weights.safetensors").stat().st_size < unet_bytes / 10
    note = json.loads((saved / "cloak_model.json").read_text())
    assert note["lora_rank"] == 4 and note["base"] == "tiny-sd"
    # The adapter on a fresh base pipeline draws the image the attack drew.
    pipe = build_pipeline(tiny_sd, unet=copy.deepcopy(tiny_sd.unet), text_encoder=copy.deepcopy(tiny_sd.text_encoder))
    pipe.load_lora_weights(saved)
    again = generate(pipe, "a photo of sks person", [0], steps=2, guidance=7.5, resolution=64)[0]
    (attacked,) = _pngs(tmp_path / "out" / "gen").values()
    assert np.abs(again.astype(int) - attacked.astype(int)).max() <= 1
    plain = generate(build_pipeline(tiny_sd), "a photo of sks person", [0], steps=2, guidance=7.5, resolution=64)[0]
    assert not np.array_equal(plain, attacked), "the adapter must change what the model draws"
    assert rep.summary["train_steps"] == 3


# --- DiffShortcut --------------------------------------------------------------------------------------

def test_diffshortcut_trains_on_both_prompt_sets_and_samples_with_the_negative_prompt(tmp_path, monkeypatch,
                                                                                     pipeline_calls):
    import cloak.diffusion.dreambooth as db

    encoded: list[list[str]] = []
    original = db.encode_prompts

    def recording(tokenizer, text_encoder, prompts):
        encoded.append(list(prompts))
        return original(tokenizer, text_encoder, prompts)

    monkeypatch.setattr(db, "encode_prompts", recording)
    images = write_images(tmp_path / "in", n=2)
    rep = run_attack(images, tmp_path / "out", num_images=1, sample_steps=1, prompts=["a photo of sks person"],
                     common=_common("diffshortcut", {"class_images": 1, "class_image_steps": 2, "steps": 2,
                                                     "batch_size": 1}))
    token = "UNKNOWN artifact masked"
    instance, cls = f"a photo of sks person, {token}", f"a photo of person, without {token}"
    assert encoded and all(batch == [instance, cls] for batch in encoded), encoded
    # Class images come from the unmodified base model with the plain class prompt (cached per prompt).
    # (one folder per model content digest: class-images/tiny-sd-<digest>/<prompt>-<res>px-<sampler>-<steps>st)
    folders = [p.name for p in (Path(os.environ["CLOAK_CACHE_DIR"]) / "class-images").glob("tiny-sd*/*")]
    assert any(f.startswith(f"{slug('a photo of person')}-64px-") for f in folders), folders
    assert not any(f.startswith(slug(cls)[:20]) and "without" in f for f in folders)
    sampling = [c for c in pipeline_calls if c["prompt"] == [f"a photo of sks person, without {token}"]]
    assert len(sampling) == 1
    assert sampling[0]["negative_prompt"] == [f"{token}, noisy, abstract, pattern, low quality"]
    assert sampling[0]["guidance_scale"] == 8.5
    assert rep.summary["training_prompts"] == {"instance": instance, "class": cls}
    assert rep.summary["sampling"]["negative_prompt"] == f"{token}, noisy, abstract, pattern, low quality"


@pytest.mark.parametrize("case, options, flags, expected", [
    ("compat", {}, {"compat": True},
     ("a photo of sks person, without UNKNOWN artifact masked", ["noisy, lowres, artifact, pattern"], 7.5)),
    ("explicit flags win", {"negative_prompt": "blurry", "guidance": 5.0}, {"compat": True},
     ("a photo of sks person, without UNKNOWN artifact masked", ["blurry"], 5.0)),
    ("no negative prompt", {"no_neg_prompt": True}, {},
     ("a photo of sks person, without UNKNOWN artifact masked", None, 8.5)),
    ("no negative token", {"no_neg_token": True}, {},
     ("a photo of sks person", ["noisy, abstract, pattern, low quality"], 8.5)),
    ("other token", {"negative_token": "BHI noise corruption"}, {},
     ("a photo of sks person, without BHI noise corruption",
      ["BHI noise corruption, noisy, abstract, pattern, low quality"], 8.5)),
])
def test_diffshortcut_sampling_variants(case, options, flags, expected, tmp_path, pipeline_calls):
    images = write_images(tmp_path / "in", n=1)
    run_attack(images, tmp_path / "out", num_images=1, sample_steps=1, prompts=["a photo of sks person"],
               common=_common("diffshortcut", {"class_images": 0, "steps": 0, **options}, **flags))
    (call,) = pipeline_calls
    prompt, negative, guidance = expected
    assert call["prompt"] == [prompt]
    assert call["negative_prompt"] == negative
    assert call["guidance_scale"] == guidance


# --- zero-shot IP-Adapter --------------------------------------------------------------------------------

def _centred_face(monkeypatch):
    """A detector that finds one face in the middle of every image (the random stand-in detector finds
    boxes far outside the image, so every aligned crop would be the same black square)."""
    from facexlib.detection.align_trans import REFERENCE_FACIAL_POINTS

    from cloak.models import faces

    def detect(self, rgb):
        h, w = rgb.shape[:2]
        pts = np.array(REFERENCE_FACIAL_POINTS) / np.array([96.0, 112.0]) * np.array([w, h])
        return [faces.Face(np.array([0.0, 0.0, w, h]), 0.99, pts)]

    monkeypatch.setattr(faces.FaceAnalyzer, "detect", detect)


@pytest.mark.parametrize("variant,embedder", [("ipadapter", None), ("faceid", "insightface"), ("faceid", "arcface")])
def test_zero_shot_output_follows_the_reference_image(variant, embedder, tmp_path, monkeypatch, pipeline_calls):
    if embedder == "arcface":
        _centred_face(monkeypatch)
    images = write_images(tmp_path / "in", n=2, seed=3)
    shutil.copy(images / "img0.png", images / "img0dup.png")
    rep = run_attack(images, tmp_path / "out", common=_common("ipadapter", {
        "variant": variant, "num_images": 1, "sample_steps": 2, "prompts": ["a photo of a person"],
        **({"embedder": embedder} if embedder else {})}))
    gen = _pngs(tmp_path / "out" / "gen")
    key = "a-photo-of-a-person-933095/0.png"
    assert sorted(gen) == [f"{ref}/{key}" for ref in ("img0", "img0dup", "img1")]
    assert np.array_equal(gen[f"img0/{key}"], gen[f"img0dup/{key}"]), "same reference, same seed: same image"
    assert not np.array_equal(gen[f"img0/{key}"], gen[f"img1/{key}"]), "another reference must change the image"
    assert all("ip_adapter_image_embeds" in c for c in pipeline_calls) and len(pipeline_calls) == 3
    assert {i.reference for i in rep.items if i.status == "ok"} == {"img0", "img0dup", "img1"}
    assert rep.summary["variant"] == variant and rep.summary["fdfr_ref"] == 0.0
    assert rep.summary["sampling"]["sampler"] == "ddim"
    if variant == "faceid":  # the embedder is on record; only ArcFace IR-SE50 is flagged as a substitution
        assert rep.summary["embedder"]["substitution"] is (embedder == "arcface")
        assert ("substitution" in rep.summary) is (embedder == "arcface")
        assert any("substitution" in w for w in rep.warnings) is (embedder == "arcface")


def test_faceid_reference_without_a_face_generates_nothing(tmp_path, monkeypatch):
    from cloak.models import insightface

    monkeypatch.setattr(insightface.SCRFDDetector, "detect", lambda self, rgb: [])
    images = write_images(tmp_path / "in", n=2)
    rep = run_attack(images, tmp_path / "out", common=_common("ipadapter", {"num_images": 1, "sample_steps": 1}))
    assert rep.summary["fdfr_ref"] == 1.0
    assert not list((tmp_path / "out").rglob("*.png"))
    assert any("no face detected on 2 of 2" in w for w in rep.warnings)


def test_zero_shot_rejects_training_flags(cli, image_dir, tmp_path):
    r = cli("attack", "--method", "ipadapter", "--tiny", "--steps", "5", image_dir, tmp_path / "a")
    assert r.exit_code == 2 and "trains nothing" in r.stderr
    r = cli("attack", "--method", "ipadapter", "--tiny", "--save-model", tmp_path / "m", image_dir, tmp_path / "b")
    assert r.exit_code == 2 and "fine-tunes nothing" in r.stderr
    r = cli("attack", "--method", "ipadapter", "--tiny", "-o", "reference=7", image_dir, tmp_path / "c")
    assert r.exit_code == 2 and "only 3 input images" in r.stderr


def test_adapter_stand_ins_load_with_diffusers_own_file_loader(_session_models, tiny_sd):
    import copy

    from cloak.diffusion.sampling import build_pipeline
    from cloak.models import adapters

    for model_id, subfolder, weight_name in (
            ("tiny-ip-adapter-sd15", "models", "ip-adapter_sd15.safetensors"),
            ("tiny-ip-adapter-faceid-sd15", "", adapters.FACEID_FILE)):
        _, path, stand_in = _session_models.resolve(model_id, "test")
        assert stand_in
        pipe = build_pipeline(tiny_sd, unet=copy.deepcopy(tiny_sd.unet))
        pipe.load_ip_adapter(str(path), subfolder=subfolder, weight_name=weight_name, image_encoder_folder=None,
                             local_files_only=True)
        assert pipe.unet.encoder_hid_proj is not None
        if "faceid" in model_id:
            assert "faceid_0" in pipe.unet.peft_config  # the FaceID LoRA from the same file
        assert tiny_sd.unet.encoder_hid_proj is None  # the shared base model is untouched


def test_adapter_for_another_unet_is_a_usage_error(_session_models):
    from cloak.models import adapters

    _, path, _ = _session_models.resolve("tiny-ip-adapter-faceid-sd15", "test")
    weights = adapters.load_faceid(path)
    adapters.check_fits(weights, adapters._unet_for_shape("tiny-sd"), "tiny-ip-adapter-faceid-sd15", "tiny-sd")
    with pytest.raises(UsageError, match="does not fit"):
        adapters.check_fits(weights, adapters._unet_for_shape("mid-sd"), "tiny-ip-adapter-faceid-sd15", "mid-sd")


# --- checkpoints ------------------------------------------------------------------------------------------

def test_training_resumes_from_its_checkpoint_to_the_same_bytes(tmp_path, monkeypatch):
    from cloak.attack import lora

    images = write_images(tmp_path / "in", n=2)
    opts = {"class_images": 1, "class_image_steps": 2, "steps": 4, "checkpoint_every": 2, "lr": 1e-2,
            "num_images": 1, "sample_steps": 2, "prompts": ["a photo of sks person"]}
    whole = run_attack(images, tmp_path / "whole", common=_common("lora", opts))
    assert not (tmp_path / "whole" / ".checkpoint").exists(), "a finished run leaves no checkpoint"

    calls = {"n": 0}
    original = lora.AdapterTrainer.step

    def crash_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lora.AdapterTrainer, "step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_attack(images, tmp_path / "cut", common=_common("lora", opts))
    monkeypatch.setattr(lora.AdapterTrainer, "step", original)
    state = json.loads((tmp_path / "cut" / ".checkpoint" / "state.json").read_text())
    assert state["step"] == 2

    with pytest.raises(UsageError, match="other settings.*lr"):
        run_attack(images, tmp_path / "cut", common=_common("lora", {**opts, "lr": 1e-3}, resume=True))
    resumed = run_attack(images, tmp_path / "cut", common=_common("lora", opts, resume=True))
    assert resumed.summary["resumed_at_step"] == 2
    assert resumed.summary["final_loss_mean_last_10pct"] == whole.summary["final_loss_mean_last_10pct"]
    a, b = _pngs(tmp_path / "whole" / "gen"), _pngs(tmp_path / "cut" / "gen")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / ".checkpoint").exists()
