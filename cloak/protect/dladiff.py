"""DLADiff — Dual-Layer Anti-Diffusion (Jia et al., arXiv 2511.19910), from the published description.

protect.md §9. Only the abstract and figure captions were available (seed 003), so the algorithm below is
the spec's proposal and every number in it is a documented default [PROP]; each piece is a separate
method here so a number or a loss can be corrected once the paper body is read.

Layer 1 (against fine-tuning), budget ``eps`` around the clean images B:
  Step 0: static surrogate UNet_s = DreamBooth of the base on the clean reference set A (cached).
  Then for ``epochs`` epochs:
    Step 1: ``attention_steps`` PGD steps ascending  w·D(M(UNet_s, x), M_ref) + L_dn(UNet_s, x), where M are
            the cross-attention maps (Anti-Diffusion recipe, cloak.diffusion.attention) and M_ref the maps of
            the clean images on the same draw (``attention_target=reference``; ``zero`` = Anti-Diffusion's
            −MSE(M, 0));
    Step 2: the dynamic surrogate takes ``surrogate_steps`` DreamBooth steps on the current protected images;
    Step 3: ``pgd_steps`` PGD steps ascending L_dn(dynamic surrogate, x).
Layer 2 (against zero-shot), budget ``eps_zs`` around the layer-1 result: ``zs_steps`` PGD steps descending
  the summed cosine similarity of several identity encoders between the protected and the clean face region
  (detector box of the clean image, resized differentiably to each encoder's input).
Total: ‖x − B‖∞ ≤ eps + eps_zs (both layers), recorded in the report.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from cloak.adversarial import pgd_step, to_m11
from cloak.adversarial.identity import IdentityLoss, Region, square_box
from cloak.diffusion import Draw, LatentCache, denoising_loss, encode_latents, encode_prompts
from cloak.diffusion.attention import CrossAttentionRecorder, default_resolution
from cloak.diffusion.class_images import class_images
from cloak.diffusion.dreambooth import DreamBoothConfig, DreamBoothTrainer, autocast_for
from cloak.diffusion.surrogate import cached_dreambooth
from cloak.io.images import ImageSet, to_uint8
from cloak.protect.aspl import SurrogateOptions
from cloak.protect.base import ProtectMethod, ProtectResult

LAYERS = ("ft", "zs")
LABEL = "DLADiff (implemented from the published description; numbers are proposals)"


class DLADiffOptions(SurrogateOptions):
    """eps/alpha (in ``unit``) are layer 1's budget and step; layer 2 has its own, in ``zs_unit``."""

    layers: list[Literal["ft", "zs"]] = Field(["ft", "zs"], description="layers to apply, e.g. ft,zs (ft = "
                                              "against fine-tuning, zs = against zero-shot generation)")
    # Layer 1
    epochs: int = Field(50, ge=0, description="layer 1: epochs of (attention, surrogate, PGD) steps")
    attention_steps: int = Field(3, ge=0, description="layer 1 step 1: PGD steps on the attention loss per epoch")
    surrogate_steps: int = Field(3, ge=0, description="layer 1 step 2: dynamic-surrogate DreamBooth steps per epoch")
    pgd_steps: int = Field(3, ge=0, description="layer 1 step 3: PGD steps against the dynamic surrogate per epoch")
    static_steps: int = Field(1000, ge=0, description="DreamBooth steps of the static surrogate on the clean set "
                                                      "(cached)")
    static_batch_size: int = Field(2, ge=1, description="instance images per static-surrogate step")
    attention_weight: float = Field(1.0, ge=0, description="weight of the attention term against L_dn in step 1")
    attention_target: Literal["reference", "zero"] = Field(
        "reference", description="reference: push the maps away from the clean images' maps (ascend MSE); "
                                 "zero: Anti-Diffusion's −MSE(maps, 0)")
    attention_resolution: int | None = Field(None, ge=1, description="side of the recorded maps (default: latent "
                                                                     "side / 4, i.e. 16 at 512 px)")
    attention_scale: float = Field(100.0, gt=0, description="maps are scaled by this and clamped to [0,1] "
                                                           "(Anti-Diffusion: 100)")
    # Layer 2
    eps_zs: float = Field(8.0, ge=0, description="layer 2 ℓ∞ budget around the layer-1 result",
                          json_schema_extra={"unit": "zs_unit"})
    alpha_zs: float = Field(1.0, ge=0, description="layer 2 PGD step", json_schema_extra={"unit": "zs_unit"})
    zs_unit: Literal["m11", "01", "255"] = Field("255", description="unit of eps_zs and alpha_zs (255: 8 = 8/255)")
    zs_steps: int = Field(100, ge=0, description="layer 2 PGD steps")
    encoders: list[str] = Field(["arcface-irse50", "ip-adapter-image-encoder"],
                                description="identity encoders attacked together (catalog ids: arcface-irse50, "
                                            "ip-adapter-image-encoder, dlib-resnet)")
    face_margin: float = Field(0.0, ge=0, description="square face box = longer detector side × (1 + margin)")

    @field_validator("layers", "encoders", mode="before")
    @classmethod
    def _comma_list(cls, value):
        """``-o layers=ft,zs`` arrives as one string."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("layers")
    @classmethod
    def _layers_known(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one layer (ft, zs)")
        return [layer for layer in LAYERS if layer in value]  # canonical order: ft first

    @property
    def eps_zs_m11(self) -> float:
        return to_m11(self.eps_zs, self.zs_unit)

    @property
    def alpha_zs_m11(self) -> float:
        return to_m11(self.alpha_zs, self.zs_unit)


class DLADiff(ProtectMethod):
    paper = "Jia et al., DLADiff: A Dual-Layer Defense Framework against Fine-Tuning and Zero-Shot Customization " \
            "of Diffusion Models, arXiv 2511.19910"
    implements = LABEL + ": dual surrogates (static DreamBooth on the clean set, dynamic on the poison) with " \
                         "attention-map disruption and alternating fine-tuning; PGD against several identity encoders"
    notes: ClassVar[str] = (
        LABEL + ". The paper body was not available: the attention-loss form, layers, weights, budgets, step "
        "counts, encoder set and the composition of the two layers are proposals (protect.md §9). The ArcFace "
        "models of the spec's encoder set (insightface antelopev2 / buffalo_l) are ONNX graphs with no gradient "
        "here; layer 2 attacks ArcFace IR-SE50 and IP-Adapter's CLIP image encoder instead (or dlib-resnet, dlib's "
        "face ResNet on real weights that install offline). Clean reference set "
        "(set A) from --ref; without it the input images stand in for it.")
    Options = DLADiffOptions
    proposals: ClassVar[tuple[str, ...]] = (
        "layers", "eps", "alpha", "epochs", "attention_steps", "surrogate_steps", "pgd_steps", "attention_weight",
        "attention_target", "attention_resolution", "attention_scale", "eps_zs", "alpha_zs", "zs_unit", "zs_steps",
        "encoders", "face_margin")
    uses_ref = True
    steps_option = "epochs"
    default_model = "sd21-base"
    tiny_options: ClassVar[dict] = {"class_images": 2, "epochs": 2, "attention_steps": 1, "surrogate_steps": 1,
                                    "pgd_steps": 1, "static_steps": 2, "zs_steps": 2}

    @classmethod
    def needs_model(cls, opts: DLADiffOptions) -> bool:
        """Only layer 1 uses the diffusion model; ``-o layers=zs`` runs on the identity encoders alone."""
        return "ft" in opts.layers

    def budget_m11(self) -> float:
        o = self.opts
        return (o.eps_m11 if "ft" in o.layers else 0.0) + (o.eps_zs_m11 if "zs" in o.layers else 0.0)

    def __call__(self, images: ImageSet) -> ProtectResult:
        ctx, o = self.ctx, self.opts
        x0 = images.pixels.to(ctx.device, ctx.dtype)
        records: list[dict] = [{} for _ in range(len(x0))]
        summary: dict = {"implementation": LABEL, "layers": list(o.layers), "budget": self.budget_record()}
        x = x0.clone()
        if "ft" in o.layers:
            clean = (ctx.ref.pixels if ctx.ref is not None else images.pixels).to(ctx.device, ctx.dtype)
            x, summary["layer_ft"] = self.layer_ft(x0, clean)
            summary["clean_reference"] = "ref" if ctx.ref is not None else "input"
        if "zs" in o.layers:
            x, summary["layer_zs"], zs_records = self.layer_zs(x, x0)
            for rec, extra in zip(records, zs_records):
                rec.update(extra)
        return ProtectResult(x.detach(), records, summary)

    def budget_record(self) -> dict:
        o = self.opts
        layers = {}
        if "ft" in o.layers:
            layers["ft"] = {"eps": o.eps, "alpha": o.alpha, "unit": o.unit, "eps_m11": o.eps_m11}
        if "zs" in o.layers:
            layers["zs"] = {"eps": o.eps_zs, "alpha": o.alpha_zs, "unit": o.zs_unit, "eps_m11": o.eps_zs_m11}
        total = self.budget_m11()
        return {"eps": total, "unit": "m11", "eps_m11": total, "total_m11": total, "layers": layers}

    # --- layer 1: dual surrogates + alternating dynamic fine-tuning ------------------------------------
    def layer_ft(self, x0: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, dict]:
        ctx, o = self.ctx, self.opts
        sd = ctx.models.sd(ctx.model)
        cfg = DreamBoothConfig(lr=o.lr, prior_weight=o.prior_weight, train_text_encoder=o.train_text_encoder,
                               instance_prompt=o.instance_prompt, class_prompt=o.class_prompt,
                               bf16_weights=ctx.compat)
        static_info: dict = {}
        static_unet, static_te = cached_dreambooth(
            ctx, sd, clean, ctx.iters(o.static_steps), cfg, batch_size=o.static_batch_size,
            n_class_images=o.class_images, class_image_steps=o.class_image_steps, info=static_info)
        with torch.no_grad():
            static_text = encode_prompts(sd.tokenizer, static_te, [o.instance_prompt])
        dynamic = self.dynamic_surrogate(sd, cfg)
        latent_side = x0.shape[-1] // sd.vae_scale_factor
        resolution = o.attention_resolution or default_resolution(latent_side)

        epochs, n_att, n_db, n_pgd = (ctx.iters(o.epochs), ctx.iters(o.attention_steps), ctx.iters(o.surrogate_steps),
                                      ctx.iters(o.pgd_steps))
        eps, alpha = o.eps_m11, o.alpha_m11
        x = x0.clone()
        cursor = 0
        att_loss = pgd_loss = db_loss = float("nan")
        with ctx.progress.task("dladiff layer 1", epochs) as bar, \
                CrossAttentionRecorder(static_unet, resolution, compat_half_heads=ctx.compat) as recorder:
            for _ in range(epochs):
                x, att_loss = self.attention_step(sd, static_unet, static_text, recorder, x, x0, n_att, eps, alpha)
                cursor, db_loss = self.adversarial_tuning(dynamic, x, n_db, cursor)
                x, pgd_loss = self.surrogate_pgd(sd, dynamic, x, x0, n_pgd, eps, alpha)
                bar.advance(1, status=f"att {att_loss:.4f} pgd {pgd_loss:.4f}")
        return x.detach(), {
            "epochs": epochs, "attention_steps": n_att, "surrogate_steps": n_db, "pgd_steps": n_pgd,
            "attention_resolution": resolution, "static_surrogate": static_info,
            "final_attention_objective": att_loss, "final_pgd_loss": pgd_loss, "final_surrogate_loss": db_loss,
            "surrogate_precision": "bf16 weights (--compat)" if ctx.compat else "fp32 master weights"}

    def dynamic_surrogate(self, sd, cfg: DreamBoothConfig) -> DreamBoothTrainer:
        """A trainable copy of the base that follows the protected images (ADFT's dynamic surrogate)."""
        ctx, o = self.ctx, self.opts
        class_latents = None
        if o.class_images > 0 and o.prior_weight > 0:
            cls = class_images(sd, o.class_prompt, o.class_images, ctx.cache_dir, steps=o.class_image_steps,
                               resolution=ctx.resolution, ctx=ctx)
            class_latents = LatentCache.encode(sd.vae, cls.to(ctx.device, ctx.dtype))
        unet, text_encoder = sd.trainable_copy()
        trainer = DreamBoothTrainer(sd, unet, text_encoder, cfg, class_latents=class_latents, generator=ctx.generator)
        trainer.freeze()
        return trainer

    def draw(self, sd, x: torch.Tensor) -> Draw:
        f = sd.vae_scale_factor
        shape = (sd.unet.config.in_channels, x.shape[-2] // f, x.shape[-1] // f)
        return Draw.sample(x.shape[0], shape, sd.noise_scheduler, self.ctx.generator, x.device)

    def denoising(self, sd, unet, text, pixels: torch.Tensor, draw: Draw) -> torch.Tensor:
        latents = encode_latents(sd.vae, pixels, posterior_noise=draw.posterior_noise)
        dt = next(unet.parameters()).dtype  # bf16 under --compat (surrogate weights trained in bf16, as released)
        with autocast_for(latents.device):
            return denoising_loss(unet, sd.noise_scheduler, latents.to(dt), text.to(dt), self.ctx.generator,
                                  timesteps=draw.timesteps, noise=draw.noise.to(dt))

    def attention_maps(self, recorder: CrossAttentionRecorder) -> torch.Tensor:
        """Anti-Diffusion's map transform: ×scale, clamped to [0, 1]."""
        return (recorder.maps() * self.opts.attention_scale).clamp(0, 1)

    def attention_step(self, sd, unet, text, recorder, x, x0, steps: int, eps: float, alpha: float):
        """Step 1: PGD ascent on w·D(maps(x), maps_ref) + L_dn against the static surrogate."""
        o = self.opts
        value = float("nan")
        for _ in range(steps):
            draw = self.draw(sd, x)
            target = None
            if o.attention_target == "reference":
                with torch.no_grad():
                    recorder.reset()
                    self.denoising(sd, unet, text, x0, draw)
                    target = self.attention_maps(recorder)
            x = x.detach().requires_grad_(True)
            recorder.reset()
            ldn = self.denoising(sd, unet, text, x, draw)
            maps = self.attention_maps(recorder)
            if target is not None:  # [PROP] move the maps away from the clean images' maps
                att = F.mse_loss(maps, target)
            else:  # Anti-Diffusion: −MSE(maps, 0), i.e. drive the maps towards zero
                att = -F.mse_loss(maps, torch.zeros_like(maps))
            loss = o.attention_weight * att + ldn
            (grad,) = torch.autograd.grad(loss, x)
            x = pgd_step(x.detach(), grad, x0, alpha, eps)
            value = float(loss.detach())
        recorder.reset()
        return x.detach(), value

    def adversarial_tuning(self, trainer: DreamBoothTrainer, x: torch.Tensor, steps: int, cursor: int):
        """Step 2: DreamBooth steps of the dynamic surrogate on the current protected images.

        One instance (+ one class) image per step; the image index and the optimizer state carry over
        between epochs, so the surrogate keeps learning every image [PROP].
        """
        n_class = len(trainer.class_latents) if trainer.class_latents is not None else 0
        loss = float("nan")
        trainer.unfreeze()
        pixels = x.detach()
        for _ in range(steps):
            i = cursor % len(pixels)
            cls = [cursor % n_class] if n_class else None
            loss = trainer.step(trainer.encode_instances(pixels[[i]]), cls)
            cursor += 1
        trainer.freeze()
        return cursor, loss

    def surrogate_pgd(self, sd, trainer: DreamBoothTrainer, x, x0, steps: int, eps: float, alpha: float):
        """Step 3: PGD ascent on L_dn of the (frozen for the moment) dynamic surrogate."""
        with torch.no_grad():
            text = encode_prompts(sd.tokenizer, trainer.text_encoder, [self.opts.instance_prompt])
        value = float("nan")
        for _ in range(steps):
            draw = self.draw(sd, x)
            x = x.detach().requires_grad_(True)
            loss = self.denoising(sd, trainer.unet, text, x, draw)
            (grad,) = torch.autograd.grad(loss, x)
            x = pgd_step(x.detach(), grad, x0, alpha, eps)
            value = float(loss.detach())
        return x.detach(), value

    # --- layer 2: identity encoders ------------------------------------------------------------------
    def face_regions(self, x0: torch.Tensor) -> list[Region]:
        """The largest face of each clean image as a square box; the whole image where none is found."""
        analyzer = self.ctx.models.faces(role="dladiff-faces")
        regions = []
        height, width = x0.shape[-2:]
        for rgb in to_uint8(x0):
            faces = analyzer.detect(rgb)
            if faces:
                regions.append(Region(square_box(faces[0].box, height, width, self.opts.face_margin), "face"))
            else:
                regions.append(Region(None, "image"))
        return regions

    def layer_zs(self, x_ft: torch.Tensor, x0: torch.Tensor):
        from cloak.models.encoders import load_identity_encoder

        ctx, o = self.ctx, self.opts
        encoders = [load_identity_encoder(ctx.models, name) for name in o.encoders]
        # Encoders that align the face themselves (dlib-resnet) need no detector box from the face analyzer.
        needs_boxes = any(not hasattr(enc, "face_view") for enc in encoders)
        regions = self.face_regions(x0) if needs_boxes else [Region(None, "image")] * len(x0)
        objective = IdentityLoss(encoders, regions, x0.float())
        steps, eps, alpha = ctx.iters(o.zs_steps), o.eps_zs_m11, o.alpha_zs_m11
        base = x_ft.detach().float()
        with torch.no_grad():
            before = [s.cpu() for s in objective.similarities(base)]
        x = base.clone()
        value = float("nan")
        with ctx.progress.task("dladiff layer 2", steps) as bar:
            for _ in range(steps):
                x = x.detach().requires_grad_(True)
                loss = objective(x)
                (grad,) = torch.autograd.grad(loss, x)
                x = pgd_step(x.detach(), grad, base, alpha, eps, ascent=False)
                value = float(loss.detach())
                bar.advance(1, status=f"cos {value:.4f}")
        with torch.no_grad():
            after = [s.cpu() for s in objective.similarities(x)]
        records = []
        for i, region in enumerate(regions):
            record = {"zs_region": region.source, "zs_box": list(region.box) if region.box else None} \
                if needs_boxes else {}
            records.append({**record, "zs_face": {e: v.sources[i] for e, v in zip(o.encoders, objective.views)},
                            "identity_cos_before_zs": {e: float(s[i]) for e, s in zip(o.encoders, before)},
                            "identity_cos": {e: float(s[i]) for e, s in zip(o.encoders, after)}})
        found = [sum(src in ("face", "dlib") for src in v.sources) for v in objective.views]
        for name, n in zip(o.encoders, found):
            if n < len(x0):
                ctx.warn(f"dladiff layer 2: {name}: no face found in {len(x0) - n} of {len(x0)} clean images; "
                         "the encoder saw the whole image (or another detector's box) there")
        summary = {"steps": steps, "encoders": list(o.encoders), "final_objective": value,
                   "faces_found": min(found), "white_box": white_box_notes(o.encoders),
                   "mean_identity_cos_before_zs": {e: float(s.mean()) for e, s in zip(o.encoders, before)},
                   "mean_identity_cos": {e: float(s.mean()) for e, s in zip(o.encoders, after)}}
        return x.to(x_ft.dtype).detach(), summary, records


# Attacked encoder → the score backend that measures identity with the same network.
SCORED_BY = {"dlib-resnet": "score's dlib backend (-o ism.backend=dlib)",
             "arcface-irse50": "score's retinaface backend (ArcFace IR-SE50)"}


def white_box_notes(encoders: list[str]) -> list[str]:
    """Which identity scores are white-box for this run: those of a network layer 2 attacked."""
    return [f"{name} is the network of {SCORED_BY[name]}: identity scores from it on these images are white-box "
            "(the attack saw that network); transfer to other recognizers is not measured by them"
            for name in encoders if name in SCORED_BY]
