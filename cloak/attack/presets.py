"""``cloak attack --preset NAME``: the attack settings of a paper's evaluation, by name.

A preset fills the method, the base model and method options; anything given explicitly wins: ``--method``,
``--model``, the flags (``--steps``, ``--prompt``, ``--num-images`` …) and ``-o KEY=VALUE``. It ranks above
cloak.toml, since it was asked for on this command line. The report records the preset and which of its
values were overridden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloak.errors import UsageError


@dataclass(frozen=True)
class Preset:
    name: str
    method: str
    model: str  # the paper's base model; --model replaces it (e.g. an immunized model directory)
    options: dict[str, Any]
    source: str
    notes: str = ""


PRESETS: dict[str, Preset] = {
    # [C: VinAIResearch/Anti-DreamBooth scripts/attack_with_aspl.sh, train_dreambooth.py, infer.py; spec attack.md
    # §1a] SD 2.1-base, UNet + text encoder, lr 5e-7 constant, batch 2 (+2 class), 1000 steps, 200 class images
    # with λ = 1; sampling 16 images per prompt, 100 steps, CFG 7.5, the checkpoint's own scheduler.
    "antidreambooth": Preset(
        "antidreambooth", "dreambooth", "sd21-base",
        {"steps": 1000, "lr": 5e-7, "batch_size": 2, "train_text_encoder": True, "prior_weight": 1.0,
         "class_images": 200, "class_image_steps": 50, "instance_prompt": "a photo of sks person",
         "class_prompt": "a photo of person",
         "prompts": ["a photo of sks person", "a dslr portrait of sks person"], "num_images": 16,
         "sample_steps": 100, "guidance": 7.5, "sampler": "default"},
        "Anti-DreamBooth (Van Le et al., ICCV 2023) scripts/attack_with_aspl.sh + train_dreambooth.py"),
    # [C: KU-VGI/APDM gen_arguments.py get_arguments_db, run.sh, train_dreambooth.py, evaluate_db.py,
    # evaluation/personalized_sampler.py; spec attack.md §1b, immunize.md §4] SD 1.5 with the immunized UNet,
    # UNet only (no --train_text_encoder), lr 5e-6 constant, no warm-up, batch 1 (+1 class), 800 steps,
    # prior preservation with 200 class images (λ = 1) that the *base* pipeline generates (train_dreambooth.py
    # samples them from --pretrained_model_name_or_path before --additional_unet_path is loaded), seed 0;
    # sampling 15 × "a photo of sks person" + 15 × "a portrait of sks person", PNDM, 20 steps, CFG 7.5.
    "apdm": Preset(
        "apdm", "dreambooth", "sd15",
        {"steps": 800, "lr": 5e-6, "batch_size": 1, "train_text_encoder": False, "prior_weight": 1.0,
         "class_images": 200, "class_image_steps": 50, "instance_prompt": "a photo of sks person",
         "class_prompt": "a photo of person",
         "prompts": ["a photo of sks person", "a portrait of sks person"], "num_images": 15,
         "sample_steps": 20, "guidance": 7.5, "sampler": "pndm"},
        "APDM (Lee et al., NeurIPS 2025) KU-VGI/APDM run.sh + gen_arguments.py get_arguments_db + evaluate_db.py",
        notes="class images come from the base model, never from the immunized one (cloak_model.json names it)"),
    # [P: DiffShortcut A.1; C: liuyixin-louis/DiffShortcut scripts/sub/train/full.sh; spec attack.md §3] the
    # Anti-DreamBooth protocol with the negative-token training and noise-free sampling (method diffshortcut);
    # batch 2 as the paper states (the released script: 1, -o batch_size=1); prompts "a photo of sks person",
    # "a smiling photo of sks person". Guidance and negative prompt stay the method's own (paper: 8.5 = w 7.5 in
    # diffusers' convention; --compat: the released code's), so --compat still switches them.
    "diffshortcut": Preset(
        "diffshortcut", "diffshortcut", "sd21-base",
        {"steps": 1000, "lr": 5e-7, "batch_size": 2, "train_text_encoder": True, "prior_weight": 1.0,
         "class_images": 200, "class_image_steps": 50, "instance_prompt": "a photo of sks person",
         "class_prompt": "a photo of person",
         "prompts": ["a photo of sks person", "a smiling photo of sks person"], "num_images": 16,
         "sample_steps": 100, "sampler": "default"},
        "DiffShortcut (Liu, Chen & Sun 2024) appendix A.1 + scripts/sub/train/full.sh"),
}

# Which preset evaluates a model made by each immunize method (cloak immunize prints the command).
IMMUNIZE_PRESET = {"apdm": "apdm"}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        from cloak.registry import suggest

        raise UsageError(f"unknown --preset {name!r}{suggest(name, list(PRESETS))}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_layer(preset: Preset, options_cls, method: str) -> dict[str, Any]:
    """The preset's options for ``method``; an option the method does not have is a usage error (never dropped)."""
    missing = [k for k in preset.options if k not in options_cls.model_fields]
    if missing:
        raise UsageError(f"--preset {preset.name} sets {', '.join(missing)}, which attack {method} does not have",
                         hint=f"the preset's method is {preset.method}; drop --method or the preset")
    return dict(preset.options)


def attack_command(preset: str, model_dir, images, output="attacked/") -> str:
    """The ``cloak attack`` command that evaluates ``model_dir`` as the paper does."""
    import shlex

    return shlex.join(["cloak", "attack", "--preset", preset, "--model", str(model_dir), str(images), str(output)])
