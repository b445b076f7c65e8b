"""DiffShortcut purification ("Ours-CodeSR", Liu et al., arXiv 2406.18944): CodeFormer, then SD ×4 SR.

purify.md §1. Stage 1 (``inference_codeformer.py -w 0.5``, whole-image mode): every detected face is aligned,
restored by CodeFormer with fidelity weight w and pasted back into the image enlarged ×2; only for class
``person``. Stage 2 (``defenses/sr.py``): the result is resized to a quarter of the working size (128² for
512² images, PIL's default bicubic filter) and super-resolved ×4 by ``stable-diffusion-x4-upscaler`` with the
class prompt "A photo of a person" and diffusers' defaults (75 steps, guidance 9, noise level 20).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from cloak.io.images import pil_to_tensor, to_uint8
from cloak.methods import MethodOptions
from cloak.purify.base import PurifyMethod

SR_FACTOR = 4


def sr_input_size(width: int, height: int) -> tuple[int, int]:
    """The low-resolution size whose ×4 is the working size (128² for 512²)."""
    return max(1, round(width / SR_FACTOR)), max(1, round(height / SR_FACTOR))


def resize_m11(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize a 1×3×h×w image in [-1,1] with PIL bicubic (through 8 bits, as the released scripts do)."""
    if x.shape[-1] == width and x.shape[-2] == height:
        return x
    pil = Image.fromarray(to_uint8(x[0])).resize((width, height), Image.BICUBIC)
    return pil_to_tensor(pil).unsqueeze(0)


class SROptions(MethodOptions):
    """The SD ×4 upscaler call, diffusers' defaults (DiffShortcut passes none)."""

    sr_steps: int = Field(75, ge=1, description="upscaler sampling steps (scaled by --effort)")
    sr_guidance: float = Field(9.0, ge=0, description="upscaler classifier-free guidance")
    sr_noise_level: int = Field(20, ge=0, le=350, description="noise added to the low-resolution input")


class DiffShortcut(PurifyMethod):
    paper = "Liu, Chen, Sun, Investigating and Defending Shortcut Learning in Personalized Diffusion Models, " \
            "arXiv 2406.18944 (DiffShortcut), Alg. 1 / Table 2"
    implements = ("CodeFormer (w 0.5, whole-image, RetinaFace-R50, parse-mask paste-back, upscale 2) then "
                  "resize to ¼ and SD ×4 upscaler, as liuyixin-louis/DiffShortcut scripts/sub/defense/code.sh + "
                  "defenses/sr.py")
    notes: ClassVar[str] = ("CodeFormer weights are S-Lab License 1.0 (non-commercial). Faces are restored only "
                            "for class 'person'. The ¼-size SR input is 128² for 512² images (spec); other sizes "
                            "keep their aspect ratio and the result is resized to the input size.")
    proposals: ClassVar[tuple[str, ...]] = ("max_faces", "det_shrink")
    uses_models: ClassVar[bool] = True

    class Options(SROptions):
        codeformer: bool = Field(True, description="stage 1: CodeFormer face restoration (ablation: false)")
        sr: bool = Field(True, description="stage 2: SD ×4 super-resolution (ablation: false)")
        fidelity: float = Field(0.5, ge=0, le=1, description="CodeFormer fidelity weight w (0 quality … 1 fidelity)")
        upscale: int = Field(2, ge=1, le=4, description="CodeFormer paste-back enlargement (upstream --upscale)")
        max_faces: int = Field(0, ge=0, description="restore at most N faces, highest detector score first "
                                                    "(0 = all, as upstream) [PROP]")
        class_name: str = Field("person", description="subject class: the SR prompt; CodeFormer runs only for "
                                                      "'person'")
        prompt: str = Field("A photo of a {class_name}", description="SR prompt template")
        det_shrink: bool = Field(False, description="face detection also shrinks images whose short side is over "
                                                    "640 px to 640 (CodeFormer since a75e7ae); false: enlarge only, "
                                                    "as the CodeFormer DiffShortcut ran [PROP]")

    tiny_options: ClassVar[dict] = {"sr_steps": 2, "max_faces": 1}

    def prepare(self) -> None:
        from cloak.models.restoration import face_restorer, upscaler

        o = self.opts
        self.restorer = (face_restorer(self.ctx.models, compat=self.ctx.compat, det_shrink=o.det_shrink)
                         if self.restores_faces else None)
        self.pipe = upscaler(self.ctx.models) if o.sr else None

    @property
    def restores_faces(self) -> bool:
        return self.opts.codeformer and self.opts.class_name == "person"

    @property
    def sr_prompt(self) -> str:
        # [Q] the released CLI passes the class name into sr.py's sr_scale slot: the prompt is always "person".
        name = "person" if self.ctx.compat else self.opts.class_name
        return self.opts.prompt.format(class_name=name)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from cloak.models.restoration import upscale4

        o = self.opts
        h, w = image.shape[-2:]
        x = image.float().cpu()
        record: dict = {}
        if self.restorer is not None:
            restored, record = self.restorer.restore(np.ascontiguousarray(to_uint8(x[0])), o.fidelity, o.upscale,
                                                     o.max_faces)
            x = pil_to_tensor(Image.fromarray(restored)).unsqueeze(0)
        if self.pipe is not None:
            lw, lh = sr_input_size(w, h)
            low = Image.fromarray(to_uint8(resize_m11(x, lw, lh)[0]))
            x = upscale4(self.pipe, low, self.sr_prompt, steps=self.ctx.iters(o.sr_steps), guidance=o.sr_guidance,
                         noise_level=o.sr_noise_level, generator=self.ctx.generator)
        self.record = record
        return resize_m11(x, w, h)
