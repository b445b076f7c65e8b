"""Noisy Upscaling (Hönig, Rando, Carlini, Tramèr, ICLR 2025): Gaussian noise, then the SD ×4 upscaler.

docs/spec-additions.md §U1, following ethz-spylab/robust-style-mimicry ``noise.py`` and ``upscale.py`` and the
diffusers fork its README installs (roberthoenig/diffusers ``pipeline_stable_diffusion_upscale.py``).
Stage 1 adds N(0, σ²) per pixel in [0,1] units (σ = 0.1, the README's worked example), clips to [0,1] and
rounds to 8 bits (skimage ``random_noise`` + ``img_as_ubyte``): the noise drowns the protective pattern.
Stage 2 runs ``stable-diffusion-x4-upscaler`` on the noisy image *at its own size* with ``noise_level=320,
noise_level_sub=320`` (diffusers' other defaults: 75 steps, guidance 9): the fork noises the low-resolution
input at ``noise_level − noise_level_sub`` = 0 but still tells the UNet 320, so the upscaler treats the
noise stage 1 added as heavy degradation to remove. The release keeps the ×4 result (2048² for 512²) for
fine-tuning; a purifier returns the input's size, so cloak resizes it back (PIL bicubic) [PROP]. The release
captions each image with BLIP-2 and uses the caption as the prompt; cloak takes one prompt for the set
[PROP]. IMPRESS++ is not in the released code ("coming soon" in its README), so it is not shipped.

Random stand-in weights purify nothing: the efficacy of this method is not verified in cloak.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from PIL import Image
from pydantic import Field

from cloak.diffusion.loss import sample_noise
from cloak.io.images import to_uint8
from cloak.purify.base import PurifyMethod
from cloak.purify.diffshortcut import SROptions, resize_m11, sr_input_size


def add_gaussian_noise(image: torch.Tensor, std01: float, generator: torch.Generator) -> torch.Tensor:
    """``x + N(0, σ²)`` with σ in [0,1] units, clipped to the valid range and rounded to 8 bits (1×3×H×W, [-1,1])."""
    noisy = image.float() + 2 * std01 * sample_noise(image.shape, generator, image.device)
    return (((noisy.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1)


class NoisyUpscaling(PurifyMethod):
    paper = "Hönig, Rando, Carlini, Tramèr, Adversarial Perturbations Cannot Reliably Protect Artists From " \
            "Generative AI, ICLR 2025 (arXiv 2406.12027)"
    implements = "Gaussian noise σ 0.1 ([0,1]), clip, 8-bit; then SD ×4 upscaler told noise level 320 but adding " \
                 "none (noise_level_sub 320) on the noisy image at its own size, resized back " \
                 "(ethz-spylab/robust-style-mimicry noise.py + upscale.py, roberthoenig/diffusers fork)"
    notes: ClassVar[str] = ("The release prompts the upscaler with a BLIP-2 caption per image; cloak uses -o prompt "
                            "[PROP]. The ×4 result is resized back to the input size [PROP]. IMPRESS++ is not in "
                            "the released code and is not shipped. Efficacy is NOT verified in cloak: the "
                            "built-in stand-ins have random weights.")
    proposals: ClassVar[tuple[str, ...]] = ("prompt", "sr_input")
    uses_models: ClassVar[bool] = True

    class Options(SROptions):
        noise_std: float = Field(0.1, ge=0, description="std of the Gaussian noise, [0,1] units (README example)")
        sr_noise_level: int = Field(320, ge=0, le=350, description="noise level the upscaler is told")
        sr_input_noise_level: int = Field(
            0, ge=0, le=350, description="noise the upscaler adds to its input (release: noise_level − "
                                         "noise_level_sub = 0; stock diffusers: = sr_noise_level)")
        prompt: str = Field("a photo of a person", description="upscaler prompt (release: a BLIP-2 caption) [PROP]")
        sr_input: Literal["full", "quarter"] = Field(
            "full", description="upscale the noisy image at its size (full, as released: ×4 then resized back) or "
                                "at a quarter of it (as DiffShortcut: ¹⁄₁₆ of the upscaler's memory)")

    tiny_options: ClassVar[dict] = {"sr_steps": 2}

    def prepare(self) -> None:
        from cloak.models.restoration import upscaler

        self.pipe = upscaler(self.ctx.models)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from cloak.models.restoration import upscale4

        o = self.opts
        h, w = image.shape[-2:]
        noisy = add_gaussian_noise(image.float().cpu(), o.noise_std, self.ctx.generator)
        if o.sr_input == "quarter":
            lw, lh = sr_input_size(w, h)
            noisy = resize_m11(noisy, lw, lh)
        low = Image.fromarray(to_uint8(noisy[0]))
        x = upscale4(self.pipe, low, o.prompt, steps=self.ctx.iters(o.sr_steps), guidance=o.sr_guidance,
                     noise_level=o.sr_noise_level, low_res_noise_level=o.sr_input_noise_level,
                     generator=self.ctx.generator)
        self.record = {"noise_std": o.noise_std, "sr_input_size": list(low.size)}
        return resize_m11(x, w, h)
