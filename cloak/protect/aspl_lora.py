"""ASPL against a DreamBooth-LoRA surrogate — Anti-DreamBooth's published LoRA variant.

[C: VinAIResearch/Anti-DreamBooth attacks/aspl_lora.py]: the surrogate f is the base model with rank-4
LoRA adapters (UNet attention ``to_q/to_k/to_v/to_out.0`` and, with ``--train_text_encoder``, the text
encoder's projections); the base weights stay frozen. Each iteration trains f's adapters on the clean set
for n steps, takes K PGD steps against f, then trains the same adapters on the perturbed images for n
steps — ``train_one_epoch`` updates the adapters in place, so the learner f' *is* f (there is no copy),
with a new AdamW per call (β 0.9/0.999, wd 1e-2, eps 1e-8, grad-norm clip 1.0) and images taken in
order from index 0 (instance s % n, class s % n_class), one instance + one class image per step.
The schedule and budget are ASPL's (N = 50, n = 3, K = 6, α = 5e-3, η = 5e-2 in [-1, 1]); the
launch command that ships with it passes lr 5e-7 and ``--train_text_encoder`` (the script's own
argparse default lr is 5e-6).

Differences: the adapters train in fp32 (the released code casts the whole UNet, adapters included, to
bf16 before every call [Q]; ``--compat`` trains bf16 adapters); the adapters are cloak's shared LoRA
surrogate (cloak.diffusion.lora_surrogate), drawn from the run's seed.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from cloak.diffusion.dreambooth import DreamBoothConfig, DreamBoothTrainer
from cloak.diffusion.lora_surrogate import adapter_megabytes, lora_trainers
from cloak.protect.aspl import Aspl


class AsplLora(Aspl):
    paper = "Le et al., Anti-DreamBooth, ICCV 2023 (arXiv 2303.15433): ASPL with a DreamBooth-LoRA surrogate"
    implements = ("ASPL per VinAIResearch/Anti-DreamBooth attacks/aspl_lora.py: one rank-4 LoRA surrogate trained "
                  "in place on clean then perturbed images; fp32 adapters unless --compat")

    class Options(Aspl.Options):
        surrogate: str = Field("lora", description="always lora for aspl-lora (the adapters are the surrogate)",
                               pattern="^lora$")

    notes: ClassVar[str] = ("The surrogate is LoRA adapters on the shared base model (megabytes, not UNet copies); "
                            "f' is f itself as released. E-ASPL (-o models=) is not available here.")

    def lora_pair(self, sd, cfg: DreamBoothConfig, class_latents) -> list[DreamBoothTrainer]:
        if self.model_ids()[1:]:
            from cloak.errors import UsageError

            raise UsageError("aspl-lora: -o models= (E-ASPL) is not available with the LoRA surrogate")
        (f,) = lora_trainers(sd, ("f",), cfg, rank=self.opts.lora_rank, class_latents=class_latents,
                             generator=self.ctx.generator)
        return [f, f]  # released: train_one_epoch returns the same adapters it trained, so f' is f

    def summary(self, history: list[float]) -> dict:
        out = super().summary(history)
        trainers = self.__dict__.get("_trainers", [])
        out["surrogate"] = {"kind": "lora", "rank": self.opts.lora_rank, "learner_is_surrogate": True,
                            "adapter_mib": round(adapter_megabytes(trainers), 3)}
        return out
