"""Latent DiffPure (SDEdit in Stable Diffusion's latent space; purify.md §4, DiffShortcut App. C).

Encode (posterior sample × scaling factor), ``add_noise`` to t = 300, then a DDPM ``step`` at every timestep
300 → 0 with classifier-free guidance 7.5, decode — as DiffShortcut's ``defenses/diffpure_main.py`` with
Stable Diffusion 1.4. The prompt is the code's quality prompt for the class; ``-o empty_prompt=true`` is the
paper's LatentDiffPure-∅ variant. ``--effort`` keeps t and visits ``effort·(t+1)`` evenly spaced timesteps
(DDPM steps between non-adjacent timesteps use the matching ᾱ).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from cloak.diffusion import encode_latents, encode_prompts
from cloak.diffusion.loss import sample_noise
from cloak.methods import MethodOptions
from cloak.purify.base import PurifyMethod


def resize_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def multiple_of(x: torch.Tensor, m: int) -> torch.Tensor:
    """Enlarge to the next multiple of ``m`` on each side (the VAE needs it; undone by ``resize_to``)."""
    h, w = x.shape[-2:]
    return resize_to(x, -(-h // m) * m, -(-w // m) * m)


class LatentDiffPure(PurifyMethod):
    paper = "DiffShortcut (Liu et al., arXiv 2406.18944) App. C: LatentDiffPure / LatentDiffPure-∅"
    implements = ("SD latent SDEdit: posterior-sample encode, add_noise to t=300, DDPM step at every timestep to 0, "
                  "CFG 7.5, class quality prompt (or empty), decode; liuyixin-louis/DiffShortcut "
                  "defenses/diffpure_main.py")
    notes: ClassVar[str] = ("Default model sd14 (--model overrides). Prompt from the code; the paper text says "
                            "'a photo of [class_name], high quality, highres'.")
    uses_models: ClassVar[bool] = True
    default_model: ClassVar[str] = "sd14"

    class Options(MethodOptions):
        t: int = Field(300, ge=0, le=999, description="noising timestep (of 1000)")
        guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale")
        class_name: str = Field("person", description="subject class in the prompt")
        prompt: str = Field("a photo of a {class_name}, clear, high resolution, high quality, noise-free",
                            description="purification prompt template")
        empty_prompt: bool = Field(False, description="LatentDiffPure-∅: condition on the empty prompt")

    tiny_options: ClassVar[dict] = {"t": 30}

    def prepare(self) -> None:
        from diffusers import DDPMScheduler

        ctx, o = self.ctx, self.opts
        self.sd = ctx.models.sd(ctx.model, role="purifier")
        # A private scheduler: set_timesteps mutates it, and the loaded one is shared.
        self.scheduler = DDPMScheduler.from_config(self.sd.noise_scheduler.config)
        n = ctx.iters(o.t + 1)
        steps = torch.linspace(o.t, 0, n).round().long().unique_consecutive() if n > 1 else torch.tensor([o.t])
        self.timesteps = [int(t) for t in steps]
        self.scheduler.set_timesteps(timesteps=self.timesteps)
        prompt = "" if o.empty_prompt else o.prompt.format(class_name=o.class_name)
        with torch.no_grad():
            cond = encode_prompts(self.sd.tokenizer, self.sd.text_encoder, [prompt])
            uncond = encode_prompts(self.sd.tokenizer, self.sd.text_encoder, [""])
        self.embeddings = torch.cat([uncond, cond])

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        ctx, o, sd = self.ctx, self.opts, self.sd
        gen = ctx.generator
        h, w = image.shape[-2:]
        z = encode_latents(sd.vae, multiple_of(image.float(), sd.vae_scale_factor).to(ctx.device, ctx.dtype), gen)
        noise = sample_noise(z.shape, gen, z.device, z.dtype)
        z = self.scheduler.add_noise(z, noise, torch.tensor([o.t], device=z.device))
        with ctx.progress.task("ldiffpure", len(self.timesteps)) as bar:
            for t in self.scheduler.timesteps:
                eps = sd.unet(torch.cat([z, z]), t.to(z.device), encoder_hidden_states=self.embeddings).sample
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + o.guidance * (eps_c - eps_u)
                z = self.scheduler.step(eps, t, z, generator=gen).prev_sample
                bar.advance(1)
        x = sd.vae.decode(z / sd.vae.config.scaling_factor).sample
        self.record = {"t": o.t, "sampling_steps": len(self.timesteps),
                       "prompt": "" if o.empty_prompt else o.prompt.format(class_name=o.class_name)}
        return resize_to(x.float(), h, w)
