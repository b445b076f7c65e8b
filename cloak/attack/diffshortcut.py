"""DiffShortcut robust training: DreamBooth with contrastive negative tokens, then negative-prompt sampling.

attack.md §3 [P: DiffShortcut §4.2, Alg. 1, Table 5, eq. 6] [C: liuyixin-louis/DiffShortcut
train_dreambooth.py]. The attacker suspects the images carry a protective perturbation and trains so
the model ties the noise to a *negative token* N instead of to the subject:

* instance prompt ``"<c_inst>, <N>"``   e.g. "a photo of sks person, UNKNOWN artifact masked"
* class prompt    ``"<c_cls>, without <N>"`` on the (clean) class images, generated from plain ``c_cls``
* sampling prompt ``"<prompt>, without <N>"`` with a negative prompt in place of the unconditional
  branch: ε̃ = (1+w)·ε(z, c_gen) − w·ε(z, c_neg), w = 7.5, i.e. diffusers guidance 1+w = 8.5.

Everything else is DreamBooth's (§1a). The paper's best token, "UNKNOWN artifact masked" (Table 5),
is the default [PROP]; the released code's default is "bhj noisy pattern". The purification half
of DiffShortcut (CodeFormer → SD ×4 super-resolution) is ``cloak purify --method diffshortcut``.
"""

from __future__ import annotations

import dataclasses

from pydantic import Field

from cloak.attack.base import AttackResult
from cloak.attack.dreambooth import DreamBooth, DreamBoothOptions
from cloak.diffusion.dreambooth import DreamBoothConfig
from cloak.io.images import ImageSet

PAPER_TOKEN = "UNKNOWN artifact masked"  # Table 5: best IMS and Q of the four tokens tried
QUALITY_NEGATIVE = "noisy, abstract, pattern, low quality"  # P_Q, §4.2 "noise-free sampling"
CODE_NEGATIVE = "noisy, lowres, artifact, pattern"  # [Q] infer() with --outputNeg True
PAPER_GUIDANCE = 8.5  # eq. 6 with w = 7.5 in diffusers' convention (1 + w)
CODE_GUIDANCE = 7.5  # [Q] the released code passes w itself as guidance_scale


class DiffShortcutOptions(DreamBoothOptions):
    negative_token: str = Field(PAPER_TOKEN, min_length=1, description="negative token N tied to the noise pattern "
                                "(paper best; released code: 'bhj noisy pattern')")
    quality_negative: str = Field(QUALITY_NEGATIVE, description="quality part P_Q of the negative prompt <N>, <P_Q>")
    no_neg_token: bool = Field(False, description="ablation: plain DreamBooth prompts, no ', without N' at sampling")
    no_neg_prompt: bool = Field(False, description="ablation: sample without a negative prompt")
    negative_prompt: str | None = Field(None, description="negative prompt; none = '<N>, <P_Q>' (paper; --compat: "
                                        "the released code's 'noisy, lowres, artifact, pattern')")
    guidance: float = Field(PAPER_GUIDANCE, ge=0, description="guidance scale, diffusers convention (paper w = 7.5 "
                            "→ 8.5; --compat: 7.5)")


class DiffShortcut(DreamBooth):
    paper = "Liu, Chen & Sun, Investigating and Defending Shortcut Learning in Personalized Diffusion Models, 2024"
    implements = ("DreamBooth with negative-token contrastive prompts (instance '<c>, N', class '<c>, without N') "
                  "and negative-prompt guided sampling ('<prompt>, without N', negative '<N>, <P_Q>')")
    proposals = ("negative_token", "guidance")
    notes = ("Chain with its purification half: `cloak purify --method diffshortcut protected/ purified/` then "
             "`cloak attack --method diffshortcut purified/ attacked/`; on unpurified images this is the robust "
             "training alone. Sampling defaults follow the paper (negative '<N>, noisy, abstract, pattern, low "
             "quality', guidance 8.5 = w 7.5); --compat uses the released code's (negative 'noisy, lowres, "
             "artifact, pattern', guidance 7.5) unless given explicitly. Class images are generated from the plain "
             "class prompt and shared with dreambooth. The paper trains with 8-bit Adam and batch 2, the released "
             "script with batch 1 (-o batch_size=1); cloak uses fp32-master AdamW.")

    Options = DiffShortcutOptions
    tiny_options = DreamBooth.tiny_options

    def config(self) -> DreamBoothConfig:
        # The released DiffShortcut script keeps fp32 master weights (it refuses others): --compat's
        # bf16-weight quirk belongs to Anti-DreamBooth's script, not to this one.
        cfg, o = dataclasses.replace(super().config(), bf16_weights=False), self.opts
        if o.no_neg_token:
            return cfg
        return dataclasses.replace(cfg, instance_prompt=f"{o.instance_prompt}, {o.negative_token}",
                                   class_prompt=f"{o.class_prompt}, without {o.negative_token}")

    def sampling(self) -> dict:
        """Prompt suffix, negative prompt and guidance given to the pipeline (attack.md §3)."""
        o, given = self.opts, self.opts.model_fields_set
        if "negative_prompt" in given:
            negative = o.negative_prompt
        elif o.no_neg_prompt:
            negative = None
        elif self.ctx.compat:
            negative = CODE_NEGATIVE
        else:
            negative = o.quality_negative if o.no_neg_token else f"{o.negative_token}, {o.quality_negative}"
        guidance = o.guidance if "guidance" in given or not self.ctx.compat else CODE_GUIDANCE
        suffix = "" if o.no_neg_token else f", without {o.negative_token}"
        return {"prompt_suffix": suffix, "negative_prompt": negative, "guidance": guidance}

    def __call__(self, images: ImageSet) -> AttackResult:
        result = super().__call__(images)
        cfg = self.config()
        result.summary["training_prompts"] = {"instance": cfg.instance_prompt, "class": cfg.class_prompt}
        result.sampling = self.sampling()
        return result
