"""DreamBooth with prior preservation — the attacker of the Anti-DreamBooth benchmark.

attack.md §1a: SD 2.1-base, UNet and text encoder trained, lr 5e-7 constant, batch 2 instance + 2
class images, 1000 steps, 200 class images with λ = 1, grad clip 1.0. The training step is the
shared one in ``cloak.diffusion.dreambooth``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field

from cloak.attack.base import AttackMethod, AttackResult, GenerationOptions
from cloak.diffusion import LatentCache
from cloak.diffusion.class_images import class_images
from cloak.diffusion.checkpoint import TrainingCheckpoint
from cloak.diffusion.dreambooth import DreamBoothConfig, DreamBoothTrainer
from cloak.diffusion.precision import DtypeLedger
from cloak.io.images import ImageSet

MAX_BASE_HOPS = 8  # personalized (attack --save-model) → immunized → base: follow the notes this far at most


class DreamBoothOptions(GenerationOptions):
    steps: int = Field(1000, ge=0, description="training steps")
    lr: float = Field(5e-7, gt=0, description="learning rate (AdamW, constant)")
    batch_size: int = Field(2, ge=1, description="instance images per step (as many class images join)")
    prior_weight: float = Field(1.0, ge=0, description="prior-preservation weight λ")
    class_images: int = Field(200, ge=0, description="class images (0 = no prior preservation)")
    class_image_steps: int = Field(50, ge=1, description="sampling steps of the reference sampler for the class "
                                                       "images (scaled by --effort; [PROP] DPM-Solver++ at half "
                                                       "the steps unless --compat)")
    instance_prompt: str = Field("a photo of sks person", description="instance prompt")
    class_prompt: str = Field("a photo of person", description="class prompt")
    train_text_encoder: bool = Field(True, description="also fine-tune the text encoder")
    class_model: str | None = Field(None, description="model (id or directory) that generates the class images; "
                                    "none = the base model named in the attacked model's cloak_model.json (a "
                                    "model written by cloak immunize or --save-model), else the attacked model")
    checkpoint_every: int = Field(500, ge=0, description="write a resumable checkpoint to OUTPUT/.checkpoint every "
                                  "N training steps (--resume continues from it; 0 = never)")


class DreamBooth(AttackMethod):
    paper = "Ruiz et al., DreamBooth, CVPR 2023; protocol of Anti-DreamBooth train_dreambooth.py"
    implements = "full fine-tune with prior preservation, shuffled batches, fp32 master weights"

    Options = DreamBoothOptions
    tiny_options = {"class_images": 2, "steps": 2, "num_images": 1, "sample_steps": 2, "prompts": ["a photo of sks person"]}

    def train(self, images: ImageSet, sd, unet, text_encoder, cfg: DreamBoothConfig) -> AttackResult:
        ctx, o = self.ctx, self.opts
        class_latents = None
        class_source = None
        if o.class_images > 0 and o.prior_weight > 0:
            class_sd, class_source = self.class_image_model(sd)
            cls = class_images(class_sd, o.class_prompt, o.class_images, ctx.cache_dir, steps=o.class_image_steps,
                               resolution=ctx.resolution, ctx=ctx)
            class_latents = LatentCache.encode(sd.vae, cls.to(ctx.device, sd.vae.dtype))
        instances = LatentCache.encode(sd.vae, images.pixels.to(ctx.device, sd.vae.dtype))
        trainer = self.make_trainer(sd, unet, text_encoder, cfg, class_latents)
        steps = ctx.iters(o.steps)
        batch = min(o.batch_size, len(instances))
        losses = []
        order = torch.randperm(len(instances), generator=ctx.generator).tolist()
        cls_order = torch.randperm(len(class_latents), generator=ctx.generator).tolist() if class_latents else []
        cursor = cls_cursor = start = 0
        checkpoint = TrainingCheckpoint.for_run(ctx, self.checkpoint_identity(images, sd, steps), o.checkpoint_every)
        restored = checkpoint.restore(trainer.params, trainer.optimizer, ctx.generator) if checkpoint else None
        if restored:
            start, loop = restored
            order, cursor, cls_order, cls_cursor, losses = (loop["order"], loop["cursor"], loop["cls_order"],
                                                            loop["cls_cursor"], loop["losses"])
        with ctx.progress.task(f"{self.name} training", steps) as bar:
            if start:
                bar.advance(start, status=f"resumed at step {start}")
            for step in range(start, steps):
                idx = []
                for _ in range(batch):  # shuffled epochs, as a DataLoader with shuffle=True
                    if cursor == len(order):
                        order, cursor = torch.randperm(len(instances), generator=ctx.generator).tolist(), 0
                    idx.append(order[cursor])
                    cursor += 1
                cls_idx = None
                if cls_order:
                    cls_idx = []
                    for _ in range(batch):
                        if cls_cursor == len(cls_order):
                            cls_order, cls_cursor = torch.randperm(len(class_latents),
                                                                   generator=ctx.generator).tolist(), 0
                        cls_idx.append(cls_order[cls_cursor])
                        cls_cursor += 1
                loss = trainer.step(instances.sample(idx, ctx.generator), cls_idx)
                losses.append(loss)
                bar.advance(1, status=f"loss {loss:.4f}")
                if checkpoint and checkpoint.due(step + 1):
                    checkpoint.save(step + 1, trainer.params, trainer.optimizer, ctx.generator,
                                    {"order": order, "cursor": cursor, "cls_order": cls_order,
                                     "cls_cursor": cls_cursor, "losses": losses})
        trainer.freeze()
        ledger = DtypeLedger()
        ledger.note("frozen_weights", sd.vae.parameters())
        ledger.note_trainer(trainer)
        # Trained in fp32 master weights (bf16 under --compat [Q]); sampling runs at the pipeline's dtype.
        unet.to(dtype=sd.unet.dtype)
        text_encoder.to(dtype=sd.text_encoder.dtype)
        ledger.note("sampling_weights", unet.parameters())
        tail = losses[-max(1, len(losses) // 10):]
        return AttackResult(unet, text_encoder, summary={
            "train_steps": steps, "resumed_at_step": start or None, "first_loss": losses[0] if losses else None,
            "final_loss_mean_last_10pct": sum(tail) / len(tail) if losses else None, "dtypes": ledger.record(),
            **({"class_images_model": class_source} if class_source else {})})

    def class_image_model(self, sd):
        """The model that samples the class images, and a record of which and why.

        Class images come from the *unmodified* base model (attack.md §1; APDM's train_dreambooth.py samples
        them from --pretrained_model_name_or_path before the immunized UNet is loaded). A model directory
        cloak wrote (immunize, attack --save-model) names that base in its cloak_model.json.
        """
        from cloak.errors import CloakError, ModelUnavailableError

        ctx, o = self.ctx, self.opts
        if ctx.extras.get("class_dir"):  # the user's own class images: no model samples any
            return sd, {"id": None, "why": "--class-dir: the user's class images"}
        if o.class_model is not None:
            return ctx.models.sd(o.class_model, role="class-images"), {"id": o.class_model, "why": "-o class_model"}
        note_path, note = _base_note(Path(sd.path))
        base = note.get("base")
        if not base:
            return sd, {"id": sd.id, "why": "the attacked model (it names no other base)"}
        why = f"the base model named in {note_path} ({note.get('made_by', 'cloak')}), not the attacked model"
        for candidate in [base] + ([note["base_path"]] if note.get("base_path") else []):
            try:
                base_sd = ctx.models.sd(candidate, role="class-images")
            except CloakError:  # not cached / moved: try the recorded path next
                continue
            record = {"id": candidate, "why": why, "attacked_model": sd.id}
            if note.get("base_digest") and base_sd.digest and note["base_digest"] != base_sd.digest:
                record["base_digest_differs"] = True
                ctx.warn(f"the class images come from {candidate}, whose content differs from the base "
                         f"{note_path} was made from (digest {base_sd.digest[:12]} vs {note['base_digest'][:12]})")
            return base_sd, record
        raise ModelUnavailableError(f"{sd.id} names its base model {base!r} for the class images, and it cannot be "
                                    "loaded", hint=f"cloak models pull {base}, or -o class_model=ID|DIR, or "
                                                   "--class-dir DIR")

    def make_trainer(self, sd, unet, text_encoder, cfg: DreamBoothConfig, class_latents) -> DreamBoothTrainer:
        """The trainer of this attack (adapters: a subclass that trains only the adapter weights)."""
        return DreamBoothTrainer(sd, unet, text_encoder, cfg, class_latents=class_latents,
                                 generator=self.ctx.generator)

    def checkpoint_identity(self, images: ImageSet, sd, steps: int) -> dict:
        """What determines the trained weights: a checkpoint made under anything else is not resumed."""
        sampling_only = set(GenerationOptions.model_fields) | {"checkpoint_every"}
        ctx = self.ctx
        return {"method": self.name, "model": sd.id, "model_digest": sd.digest, "seed": ctx.seed,
                "compat": ctx.compat, "steps": steps, "dtype": str(ctx.dtype), "inputs": [item.sha256 for item in images.items],
                "options": {k: v for k, v in self.opts.model_dump(mode="json").items() if k not in sampling_only}}

    def config(self) -> DreamBoothConfig:
        o = self.opts
        return DreamBoothConfig(lr=o.lr, prior_weight=o.prior_weight, train_text_encoder=o.train_text_encoder,
                                instance_prompt=o.instance_prompt, class_prompt=o.class_prompt,
                                bf16_weights=self.ctx.compat)

    def __call__(self, images: ImageSet) -> AttackResult:
        sd = self.ctx.models.sd(self.ctx.model, role="base")
        unet, text_encoder = sd.trainable_copy()
        return self.train(images, sd, unet, text_encoder, self.config())



def _read_note(path: Path) -> dict:
    try:
        note = json.loads((path / "cloak_model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def _base_note(model_dir: Path) -> tuple[Path, dict]:
    """The last cloak_model.json in the chain of bases from ``model_dir`` (a model fine-tuned from an immunized
    model names the immunized one, which names the unmodified base), and its path; ``{}`` when none names one."""
    found: tuple[Path, dict] = (model_dir / "cloak_model.json", {})
    current = model_dir
    for _ in range(MAX_BASE_HOPS):
        note = _read_note(current)
        if not note.get("base"):
            break
        found = (current / "cloak_model.json", note)
        nxt = Path(str(note["base"])).expanduser()
        if not (nxt.is_dir() and (nxt / "cloak_model.json").is_file()) or nxt.resolve() == current.resolve():
            break
        current = nxt
    return found
