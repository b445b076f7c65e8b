"""The attack interface: personalize on an ImageSet, then sample prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from cloak.io.images import ImageSet
from cloak.methods import Method, MethodOptions


class GenerationOptions(MethodOptions):
    """What is sampled after personalization (attack.md §1a: Anti-DreamBooth's evaluation)."""

    prompts: list[str] = Field(["a photo of sks person", "a dslr portrait of sks person"],
                               description="prompts to sample (--prompt, repeatable)")
    num_images: int = Field(16, ge=0, description="images per prompt; seeds 0..n-1")
    sample_steps: int = Field(100, ge=1, description="sampling steps")
    guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale (diffusers convention)")
    negative_prompt: str | None = Field(None, description="negative prompt")
    sampler: str = Field("default", description="default (the model's own scheduler), ddim, pndm, dpm, euler, ddpm")


@dataclass
class Condition:
    """One extra conditioning of the sampler (zero-shot attacks: one reference image).

    Its images go to ``gen/<name>/<prompt>/<seed>.png``; ``pipe_kwargs`` go to the pipeline call
    (e.g. ``ip_adapter_image_embeds``); ``record`` is added to each generated item of the report.
    """

    name: str = ""
    pipe_kwargs: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttackResult:
    unet: Any
    text_encoder: Any
    summary: dict[str, Any] = field(default_factory=dict)
    pipeline_hook: Any = None  # optional: a callable(pipe) that modifies the pipeline before sampling
    # Sampling settings the method resolved itself (DiffShortcut: "prompt_suffix", "negative_prompt",
    # "guidance"); they replace the plain options and are recorded in the report.
    sampling: dict[str, Any] = field(default_factory=dict)
    conditions: list[Condition] | None = None  # None: one unconditioned pass, gen/<prompt>/<seed>.png
    save: Any = None  # optional callable(directory, note): --save-model in the method's own format (LoRA)


@dataclass
class Generated:
    prompt: str
    seed: int
    image: np.ndarray
    path: Path | None = None


class AttackMethod(Method):
    steps_option: ClassVar[str | None] = "steps"  # the option --steps sets (None: the method trains nothing)
    fine_tunes: ClassVar[bool] = True  # False: zero-shot, nothing for --save-model to keep
    per_reference: ClassVar[bool] = False  # True: generates once per input image, gen/<image>/<prompt>/<seed>.png

    def __call__(self, images: ImageSet) -> AttackResult:
        raise NotImplementedError
