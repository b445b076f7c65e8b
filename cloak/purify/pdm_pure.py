"""PDM-Pure (Xue & Chen, "Pixel is a Barrier"): SDEdit with DeepFloyd IF stage II, then the SD ×4 upscaler.

docs/spec-additions.md §U2, following xavihart/PDM-Pure ``pdm_pure.py``, which runs DeepFloyd IF's
``style_transfer`` pipeline without stage I (deep-floyd/IF ``pipelines/style_transfer.py``,
``modules/base.py``, ``modules/stage_II.py``, ``modules/stage_III_sd_x4.py``):

1. the image at 64 px (short side) is the low-resolution condition of stage II, and the image at 256 px is the
   "support" image that is diffused: the 1000-step cosine process respaced to the 10 steps 0, 11, …, 99
   ("10,0,0,0,0,0,0,0,0,0"), the support noised to the step 5 below the top (index 4, t = 44);
2. stage II samples the whole respaced chain from t = 99 down to 0 (DDPM, learned-range variance, thresholding,
   guidance 7 on the prompt "a picture", the low-resolution condition re-noised at augmentation level 0.25 at
   every call) — the release's schedule, where the sampler starts above the level the support was noised to;
3. the 256 px result is super-resolved ×4 by ``stable-diffusion-x4-upscaler`` with a DDPM sampler, 50 steps,
   guidance 4, noise level 20, the same prompt; the result is resized to the input size (PIL bicubic).

Random stand-in weights purify nothing: this method's efficacy has been checked only against the released
procedure's steps, never with the real weights, in this repository.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from cloak.diffusion.loss import sample_noise
from cloak.methods import MethodOptions
from cloak.purify.base import PurifyMethod
from cloak.purify.diffshortcut import resize_m11

T_TOTAL = 1000


def working_size(width: int, height: int, short: int) -> tuple[int, int]:
    """IF's ``_prepare_pil_image``: the short side becomes ``short``, the long one keeps the aspect ratio,
    rounded to a multiple of 8. Returns (width, height)."""
    if width >= height:
        return int(round(short / 8 * width / height) * 8), short
    return short, int(round(short / 8 * height / width) * 8)


def canvas_size(low_w: int, low_h: int, multiple: int = 32) -> tuple[int, int]:
    """IF's ``_get_image_sizes`` with ``img_scale`` 4: four times the low-resolution size, floored to a multiple
    of 32. Returns (width, height)."""
    return (low_w * 4) // multiple * multiple, (low_h * 4) // multiple * multiple


class PDMPure(PurifyMethod):
    paper = "Xue & Chen, Pixel is a Barrier: Diffusion Models Are More Adversarially Robust Than We Think " \
            "(PDM-Pure), arXiv 2024; code xavihart/PDM-Pure"
    implements = ("DeepFloyd IF-II-L SDEdit: support image 256 px noised to t=44 of the 10-step respacing "
                  "0..99, sampled from t=99, guidance 7, prompt 'a picture', 64 px condition at aug level 0.25; "
                  "then SD ×4 upscaler (DDPM, 50 steps, guidance 4, noise level 20), resized back "
                  "(xavihart/PDM-Pure pdm_pure.py + deep-floyd/IF style_transfer)")
    notes: ClassVar[str] = ("IF weights are gated, DeepFloyd IF licence (non-commercial research): accept it on the "
                            "hub, log in, then `cloak models pull deepfloyd-if-ii-l deepfloyd-if-t5`; the T5 "
                            "tokenizer needs `pip install sentencepiece protobuf`. Efficacy is NOT verified in "
                            "cloak: the built-in stand-ins have random weights.")
    uses_models: ClassVar[bool] = True

    class Options(MethodOptions):
        prompt: str = Field("a picture", description="prompt of stage II and the upscaler (release default)")
        guidance: float = Field(7.0, ge=0, description="stage II classifier-free guidance")
        steps: int = Field(10, ge=2, le=100, description="respaced steps, all within t < 100 (release: "
                                                         "'10,0,0,0,0,0,0,0,0,0')")
        less_steps: int = Field(5, ge=0, description="the support image is noised this many steps below the top "
                                                     "of the respaced chain (support_noise_less_qsample_steps)")
        start: Literal["top", "noised"] = Field(
            "top", description="sample the whole chain from its top step (top, as released) or only from the step "
                               "the image was noised to (noised, plain SDEdit) [PROP]")
        aug_level: float = Field(0.25, ge=0, lt=1, description="noise augmentation of the low-resolution condition")
        size: int = Field(256, ge=32, description="stage II output short side; the condition is a quarter of it")
        sr: bool = Field(True, description="stage III: SD ×4 upscaler (ablation: false, stage II resized back)")
        sr_steps: int = Field(50, ge=1, description="upscaler DDPM steps (scaled by --effort)")
        sr_guidance: float = Field(4.0, ge=0, description="upscaler classifier-free guidance")
        sr_noise_level: int = Field(20, ge=0, le=350, description="upscaler noise level of its low-resolution input")

    # --tiny: a 4-step respacing (noised at index 2, t=66) instead of 10 steps, to keep stand-in runs short
    tiny_options: ClassVar[dict] = {"size": 32, "steps": 4, "less_steps": 1, "sr_steps": 2}

    def prepare(self) -> None:
        from cloak.models.deepfloyd import load_if_stage2, t5_embeddings
        from cloak.models.restoration import upscaler, with_ddpm_sampler

        o, models = self.opts, self.ctx.models
        if o.less_steps >= o.steps - 1:
            from cloak.errors import UsageError

            raise UsageError(f"pdm-pure: less_steps must be below steps − 1 ({o.steps - 1})")
        _, if_path, _ = models.resolve("deepfloyd-if-ii-l", "purifier")
        _, t5_path, _ = models.resolve("deepfloyd-if-t5", "purifier-text-encoder")
        self.unet, scheduler_config, self.noising = models.memo(
            ("if-ii", str(if_path), str(models.device), str(models.dtype)),
            lambda: load_if_stage2(if_path, models.device, models.dtype))
        self.scheduler_config = scheduler_config
        # [prompt, unconditional]: T5 of the empty prompt, as diffusers' IF pipelines (IF itself loads a stored
        # vector) [PROP].
        self.text = t5_embeddings(t5_path, [o.prompt, ""], models.device, models.dtype)
        self.sr_pipe = with_ddpm_sampler(upscaler(models)) if o.sr else None

    # --- stage II ---------------------------------------------------------------------------------------
    def schedule(self) -> tuple[list[int], int]:
        """(the respaced timesteps, descending; the index into them the support image is noised to)."""
        from cloak.models.archs.guided_diffusion import space_timesteps

        o = self.opts
        kept = space_timesteps(T_TOTAL, ",".join([str(o.steps)] + ["0"] * 9))
        k = len(kept) - 1 - o.less_steps
        return kept[::-1], k

    def stage2(self, low: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """SDEdit of ``support`` (1×3×H×W, [-1,1]) conditioned on ``low`` (1×3×h×w); returns 1×3×H×W."""
        from diffusers import DDPMScheduler

        o, ctx = self.opts, self.ctx
        dtype = next(self.unet.parameters()).dtype
        device = ctx.device
        descending, k = self.schedule()
        noised_t = sorted(descending)[k]
        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        run = descending if o.start == "top" else [t for t in descending if t <= noised_t]
        scheduler.set_timesteps(timesteps=run, device=device)
        abar = scheduler.alphas_cumprod[noised_t].item()
        x0 = support.to(device, torch.float32)
        x = abar ** 0.5 * x0 + (1 - abar) ** 0.5 * sample_noise(x0.shape, ctx.generator, device)
        h, w = x.shape[-2:]
        upsampled = F.interpolate(low.to(device, torch.float32), (h, w), mode="bilinear", align_corners=True)
        aug_t = int(o.aug_level * T_TOTAL)
        aug = torch.full((2,), aug_t, device=device, dtype=torch.long)
        text = self.text.to(device, dtype)
        with ctx.progress.task("pdm-pure", len(run)) as bar:
            for t in scheduler.timesteps:
                # IF's SuperResUNetModel re-noises the condition inside every forward pass, each batch row with
                # its own draw (here: the prompt row and the unconditional row).
                cond = self.noising.add_noise(upsampled.expand(2, -1, -1, -1),
                                              sample_noise((2, *upsampled.shape[1:]), ctx.generator, device),
                                              aug)
                model_in = torch.cat([x.expand(2, -1, -1, -1), cond], dim=1).to(dtype)
                out = self.unet(model_in, t.to(device), encoder_hidden_states=text, class_labels=aug).sample.float()
                eps_text, eps_uncond = out[0:1, :3], out[1:2, :3]
                eps = eps_uncond + o.guidance * (eps_text - eps_uncond)
                # the variance channels of the conditional row (IF keeps the first row's)
                model_out = torch.cat([eps, out[0:1, 3:]], dim=1)
                x = scheduler.step(model_out, t, x, generator=ctx.generator).prev_sample
                bar.advance(1)
        self.record = {"t_star": int(noised_t), "sampling_steps": len(run), "first_step_t": int(run[0])}
        return x.float().cpu().clamp(-1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from cloak.models.restoration import upscale4

        o = self.opts
        height, width = image.shape[-2:]
        x = image.float().cpu()
        lw, lh = working_size(width, height, o.size // 4)
        cw, ch = canvas_size(lw, lh)
        # The release builds the support image with the same rule at 256 px and asserts that it has the canvas
        # size; cloak resizes to the canvas size directly (equal whenever the release runs) [PROP].
        low = resize_m11(x, lw, lh)
        support = resize_m11(x, cw, ch)
        y = self.stage2(low, support)
        record = dict(self.record, canvas=[cw, ch])
        if self.sr_pipe is not None:
            # the pipeline takes tensors in [0,1]
            y = upscale4(self.sr_pipe, (y + 1) / 2, o.prompt, steps=self.ctx.iters(o.sr_steps),
                         guidance=o.sr_guidance, noise_level=o.sr_noise_level, generator=self.ctx.generator)
        self.record = record
        return resize_m11(y, width, height)
