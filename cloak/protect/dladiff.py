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
            −MSE(M, 0)). [PROP] Each token's map is divided by its own spatial maximum before D
            (``attention_norm=token_max``): Anti-Diffusion's ×100-and-clamp saturates wherever a probability
            exceeds 0.01 (every map of tiny-sd, many of real SD over 77 tokens), and a saturated map gives D and
            its gradient exactly 0 — step 1 would be plain denoising-loss PGD. ``attention_norm=clamp`` keeps
            Anti-Diffusion's transform;
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
from cloak.adversarial.groups import Groups, center_crop, loss_and_grad, row_chunks, square_crops
from cloak.adversarial.identity import IdentityLoss, Region, square_box
from cloak.diffusion import Draw, LatentCache, denoising_loss, encode_latents_in_loss, encode_prompts
from cloak.diffusion.attention import CrossAttentionRecorder, default_resolution
from cloak.diffusion.class_images import class_images
from cloak.diffusion.dreambooth import DreamBoothConfig, DreamBoothTrainer, autocast_for
from cloak.diffusion.precision import PIXEL_DTYPE, DtypeLedger
from cloak.diffusion.surrogate import cached_dreambooth
from cloak.io.images import ImageSet, to_uint8
from cloak.protect.aspl import SurrogateOptions, pgd_batch_field
from cloak.diffusion.checkpoint import LoopCheckpoint
from cloak.protect.base import ProtectMethod, ProtectResult, load_weights, restore_groups, weights_of

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
    attention_norm: Literal["token_max", "clamp"] = Field(
        "token_max", description="how maps are put on [0,1] before the attention loss: token_max = each token's "
                                 "map divided by its own maximum over positions (keeps a gradient at any scale); "
                                 "clamp = Anti-Diffusion's ×attention_scale clamped to [0,1] (flat, so no gradient, "
                                 "wherever a probability exceeds 1/attention_scale)")
    attention_scale: float = Field(100.0, gt=0, description="attention_norm=clamp: maps are scaled by this and "
                                                           "clamped to [0,1] (Anti-Diffusion: 100)")
    pgd_batch: int = pgd_batch_field()  # layer 1's PGD (steps 1 and 3); layer 2's encoders see the whole set
    # Layer 2
    eps_zs: float = Field(8.0, ge=0, description="layer 2 ℓ∞ budget around the layer-1 result",
                          json_schema_extra={"unit": "zs_unit"})
    alpha_zs: float = Field(1.0, ge=0, description="layer 2 PGD step", json_schema_extra={"unit": "zs_unit"})
    zs_unit: Literal["m11", "01", "255"] = Field("255", description="unit of eps_zs and alpha_zs (255: 8 = 8/255)")
    zs_steps: int = Field(100, ge=0, description="layer 2 PGD steps")
    encoders: list[str] = Field(["arcface-irse50", "ip-adapter-image-encoder"],
                                description="identity encoders attacked together (catalog ids: arcface-irse50, "
                                            "ip-adapter-image-encoder, dlib-resnet, insightface-w600k-r50)")
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
        "counts, encoder set and the composition of the two layers are proposals (protect.md §9). Step 1 divides "
        "each token's attention map by its own maximum [PROP] instead of Anti-Diffusion's ×100-and-clamp, which "
        "saturates (zero gradient) wherever a probability exceeds 0.01 (-o attention_norm=clamp restores it). Of the "
        "spec's encoder set, insightface antelopev2 is not available; buffalo_l's recognizer (FaceID's embedder) is, as "
        "-o encoders=...,insightface-w600k-r50 (its ONNX graph run as torch ops; needs cloak[faceid], "
        "non-commercial weights). By default layer 2 attacks ArcFace IR-SE50 and IP-Adapter's CLIP image encoder "
        "(or dlib-resnet, dlib's face ResNet on real weights that install offline). Clean reference set "
        "(set A) from --ref; without it the input images stand in for it.")
    Options = DLADiffOptions
    proposals: ClassVar[tuple[str, ...]] = (
        "layers", "eps", "alpha", "epochs", "attention_steps", "surrogate_steps", "pgd_steps", "attention_weight",
        "attention_target", "attention_resolution", "attention_norm", "attention_scale", "eps_zs", "alpha_zs", "zs_unit", "zs_steps",
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
        x0 = Groups.of(images, ctx.device, PIXEL_DTYPE)  # fp32 perturbations whatever --dtype
        records: list[dict] = [{} for _ in range(len(x0))]
        summary: dict = {"implementation": LABEL, "layers": list(o.layers), "budget": self.budget_record()}
        x = x0.clone()
        checkpoint = self.loop_checkpoint(x0, "epoch")
        if "ft" in o.layers:
            self._crop_size = ctx.resolution or min(min(shape) for shape in x0.shapes)
            source = ctx.ref if ctx.ref is not None else images
            clean = square_crops(source, self._crop_size, ctx.device, PIXEL_DTYPE)
            x, summary["layer_ft"] = self.layer_ft(x0, clean, checkpoint)
            summary["clean_reference"] = "ref" if ctx.ref is not None else "input"
        if "zs" in o.layers:
            x, summary["layer_zs"], zs_records = self.layer_zs(x, x0)
            for rec, extra in zip(records, zs_records):
                rec.update(extra)
        checkpoint.clear()
        return ProtectResult(x.detach().result(), records, summary)

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
    def layer_ft(self, x0: Groups, clean: torch.Tensor, checkpoint: LoopCheckpoint | None = None
                 ) -> tuple[Groups, dict]:
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
        positions = [self.attention_positions(sd, shape) for shape in x0.shapes]
        resolution = self.attention_positions(sd, min(x0.shapes, key=min))[0]

        epochs, n_att, n_db, n_pgd = (ctx.iters(o.epochs), ctx.iters(o.attention_steps), ctx.iters(o.surrogate_steps),
                                      ctx.iters(o.pgd_steps))
        eps, alpha = o.eps_m11, o.alpha_m11
        x = x0.clone()
        cursor = start = 0
        att_loss = pgd_loss = db_loss = float("nan")
        # Checkpoint after every epoch: x, the dynamic surrogate's weights and optimizer state (both carry
        # over between epochs), the generator, the cursor. The static surrogate is cached on disk.
        saved = checkpoint.restore(ctx.generator) if checkpoint is not None else None
        if saved is not None:
            start, x = saved["count"], restore_groups(saved["tensors"]["x"], x0)
            load_weights(dynamic.params, saved["tensors"]["dynamic"])
            dynamic.optimizer.load_state_dict(saved["tensors"]["optimizer"])
            cursor, (att_loss, pgd_loss, db_loss) = saved["loop"]["cursor"], saved["loop"]["losses"]
        with ctx.progress.task("dladiff layer 1", epochs) as bar, \
                CrossAttentionRecorder(static_unet, resolution, compat_half_heads=ctx.compat) as recorder:
            if start:
                bar.advance(start, status="resumed")
            for epoch in range(start, epochs):
                x, att_loss = self.attention_step(sd, static_unet, static_text, recorder, x, x0, n_att, eps, alpha,
                                                  positions)
                cursor, db_loss = self.adversarial_tuning(dynamic, x, n_db, cursor)
                x, pgd_loss = self.surrogate_pgd(sd, dynamic, x, x0, n_pgd, eps, alpha)
                if checkpoint is not None:
                    checkpoint.save(epoch + 1, epochs, ctx.generator,
                                    {"x": x.parts, "dynamic": weights_of(dynamic.params),
                                     "optimizer": dynamic.optimizer.state_dict()},
                                    {"cursor": cursor, "losses": [att_loss, pgd_loss, db_loss]})
                bar.advance(1, status=f"att {att_loss:.4f} pgd {pgd_loss:.4f}")
        dtypes = DtypeLedger()
        dtypes.note("frozen_weights", sd.vae.parameters())
        dtypes.note("static_surrogate_weights", static_unet.parameters())
        dtypes.note_trainer(dynamic)
        dtypes.note("perturbation", x.parts)
        return x.detach(), {
            "epochs": epochs, "attention_steps": n_att, "surrogate_steps": n_db, "pgd_steps": n_pgd,
            "pgd_batch": o.pgd_batch,
            "attention_resolution": resolution, "static_surrogate": static_info,
            "attention_norm": o.attention_norm, "final_attention_objective": att_loss,
            "final_attention_term": self.attention_terms[-1] if getattr(self, "attention_terms", None) else None,
            "final_pgd_loss": pgd_loss, "final_surrogate_loss": db_loss,
            "surrogate_precision": "bf16 weights (--compat)" if ctx.compat else "fp32 master weights",
            "dtypes": dtypes.record()}

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

    def attention_positions(self, sd, shape: tuple[int, int]) -> tuple[int, int]:
        """(map side at the short side, positions) of the cross-attention maps recorded for working copies of
        ``shape``: the UNet level whose short side is ``attention_resolution`` (default: latent short side
        / 4), i.e. (h/k)·(w/k) positions there; res² for a square image."""
        f = sd.vae_scale_factor
        lh, lw = shape[0] // f, shape[1] // f
        resolution = self.opts.attention_resolution or default_resolution(min(lh, lw))
        if lh == lw:
            return resolution, resolution * resolution
        k = max(1, min(lh, lw) // resolution)
        return resolution, (lh // k) * (lw // k)

    def draw(self, sd, x: torch.Tensor) -> Draw:
        f = sd.vae_scale_factor
        shape = (sd.unet.config.in_channels, x.shape[-2] // f, x.shape[-1] // f)
        return Draw.sample(x.shape[0], shape, sd.noise_scheduler, self.ctx.generator, x.device)

    def denoising(self, sd, unet, text, pixels: torch.Tensor, draw: Draw) -> torch.Tensor:
        latents = encode_latents_in_loss(sd.vae, pixels, self.ctx.dtype, posterior_noise=draw.posterior_noise)
        dt = next(unet.parameters()).dtype  # bf16 under --compat (surrogate weights trained in bf16, as released)
        with autocast_for(latents.device, self.ctx.dtype):
            return denoising_loss(unet, sd.noise_scheduler, latents.to(dt), text.to(dt), self.ctx.generator,
                                  timesteps=draw.timesteps, noise=draw.noise.to(dt))

    def attention_maps(self, recorder: CrossAttentionRecorder) -> torch.Tensor:
        """The recorded maps (B × positions × tokens) on [0, 1].

        ``token_max`` [PROP]: each token's map over the positions divided by its own maximum, so the term
        compares where each token attends whatever its share of the softmax, and keeps a gradient everywhere
        but at each map's peak. ``clamp``: Anti-Diffusion's ×scale clamped to [0, 1], flat (zero gradient)
        wherever a probability exceeds 1/scale — on tiny-sd every probability (≈1/77) does.
        """
        maps = recorder.maps()
        if self.opts.attention_norm == "clamp":
            return (maps * self.opts.attention_scale).clamp(0, 1)
        return maps / maps.amax(dim=1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)

    def attention_loss(self, sd, unet, text, recorder: CrossAttentionRecorder, pixels: torch.Tensor,
                       clean: torch.Tensor, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 1's objective on one bucket: (attention term D, L_dn), both on the same draw; step 1 ascends
        ``attention_weight``·D + L_dn. ``recorder.positions`` must be set for the bucket's shape."""
        target = None
        if self.opts.attention_target == "reference":
            with torch.no_grad():
                recorder.reset()
                self.denoising(sd, unet, text, clean, draw)
                target = self.attention_maps(recorder)
        recorder.reset()
        ldn = self.denoising(sd, unet, text, pixels, draw)
        maps = self.attention_maps(recorder)
        if target is not None:  # [PROP] move the maps away from the clean images' maps
            att = F.mse_loss(maps, target)
        else:  # Anti-Diffusion: −MSE(maps, 0), i.e. drive the maps towards zero
            att = -F.mse_loss(maps, torch.zeros_like(maps))
        return att, ldn

    def attention_step(self, sd, unet, text, recorder, x: Groups, x0: Groups, steps: int, eps: float,
                       alpha: float, positions: list[tuple[int, int]]):
        """Step 1: PGD ascent on w·D(maps(x), maps_ref) + L_dn against the static surrogate, bucket by bucket
        (each at its own map size), the buckets' losses weighted by their share of the set.
        ``self.attention_terms``: the set's attention term D at each step (before that step's update)."""
        o = self.opts
        value = float("nan")
        self.attention_terms: list[float] = []
        for _ in range(steps):
            draws = [self.draw(sd, part) for part in x.parts]
            terms: list[float] = []

            def loss_fn(pixels, b: int, rows=None, draws=draws, terms=terms):
                # rows: a pgd_batch chunk of bucket b; it takes its own clean images and rows of the draw
                recorder.positions = positions[b][1]
                clean, draw = (x0.parts[b], draws[b]) if rows is None else (x0.parts[b][rows], draws[b].rows(rows))
                att, ldn = self.attention_loss(sd, unet, text, recorder, pixels, clean, draw)
                terms.append(float(att.detach()) * pixels.shape[0] / len(x))
                return o.attention_weight * att + ldn

            value, grad = loss_and_grad(x, loss_fn, row_chunks(o.pgd_batch))
            self.attention_terms.append(sum(terms))
            x = x.map(lambda p, g, p0: pgd_step(p.detach(), g, p0, alpha, eps), grad, x0)
        recorder.reset()
        return x.detach(), value

    def adversarial_tuning(self, trainer: DreamBoothTrainer, x: Groups, steps: int, cursor: int):
        """Step 2: DreamBooth steps of the dynamic surrogate on the current protected images (square crops
        of the working copies, as an attacker's DreamBooth trains).

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
            loss = trainer.step(trainer.encode_instances(center_crop(pixels.image(i), self._crop_size)), cls)
            cursor += 1
        trainer.freeze()
        return cursor, loss

    def surrogate_pgd(self, sd, trainer: DreamBoothTrainer, x: Groups, x0: Groups, steps: int, eps: float,
                      alpha: float):
        """Step 3: PGD ascent on L_dn of the (frozen for the moment) dynamic surrogate."""
        with torch.no_grad():
            text = encode_prompts(sd.tokenizer, trainer.text_encoder, [self.opts.instance_prompt])
        value = float("nan")
        for _ in range(steps):
            draws = [self.draw(sd, part) for part in x.parts]
            value, grad = loss_and_grad(x, lambda pixels, b, rows=None: self.denoising(
                sd, trainer.unet, text, pixels, draws[b] if rows is None else draws[b].rows(rows)),
                row_chunks(self.opts.pgd_batch))
            x = x.map(lambda p, g, p0: pgd_step(p.detach(), g, p0, alpha, eps), grad, x0)
        return x.detach(), value

    # --- layer 2: identity encoders ------------------------------------------------------------------
    def face_regions(self, x0) -> list[Region]:
        """The largest face of each clean image (3×h×w tensors: the working copies, any shape) as a square
        box in that image's own pixels; the whole image where none is found. The pipeline maps the
        perturbation, face box included, back to native size."""
        analyzer = self.ctx.models.faces(role="dladiff-faces")
        regions = []
        for image in x0:
            height, width = image.shape[-2:]
            rgb = to_uint8(image)
            faces = analyzer.detect(rgb)
            if faces:
                regions.append(Region(square_box(faces[0].box, height, width, self.opts.face_margin), "face"))
            else:
                regions.append(Region(None, "image"))
        return regions

    def layer_zs(self, x_ft: Groups, x0: Groups):
        from cloak.models.encoders import load_identity_encoder

        ctx, o = self.ctx, self.opts
        encoders = [load_identity_encoder(ctx.models, name) for name in o.encoders]
        images0 = x0.images()
        # Encoders that align the face themselves (dlib-resnet) need no detector box from the face analyzer.
        needs_boxes = any(not hasattr(enc, "face_view") for enc in encoders)
        regions = self.face_regions(images0) if needs_boxes else [Region(None, "image")] * len(images0)
        objective = IdentityLoss(encoders, regions, [t.float() for t in images0])
        steps, eps, alpha = ctx.iters(o.zs_steps), o.eps_zs_m11, o.alpha_zs_m11
        base = x_ft.detach().map(lambda p: p.float())
        with torch.no_grad():
            before = [s.cpu() for s in objective.similarities(base.images())]
        x = base.clone()
        value = float("nan")
        with ctx.progress.task("dladiff layer 2", steps) as bar:
            for _ in range(steps):
                x = x.map(lambda p: p.detach().requires_grad_(True))
                loss = objective(x.images())
                grads = Groups(list(torch.autograd.grad(loss, x.parts)), x.indices)
                x = x.map(lambda p, g, p0: pgd_step(p.detach(), g, p0, alpha, eps, ascent=False), grads, base)
                value = float(loss.detach())
                bar.advance(1, status=f"cos {value:.4f}")
        with torch.no_grad():
            after = [s.cpu() for s in objective.similarities(x.images())]
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
        return x.map(lambda p, p_ft: p.to(p_ft.dtype).detach(), x_ft), summary, records


# Attacked encoder → the score backend that measures identity with the same network.
SCORED_BY = {"dlib-resnet": "score's dlib backend (-o ism.backend=dlib)",
             "arcface-irse50": "score's retinaface backend (ArcFace IR-SE50)"}


def white_box_notes(encoders: list[str]) -> list[str]:
    """Which identity scores are white-box for this run: those of a network layer 2 attacked."""
    return [f"{name} is the network of {SCORED_BY[name]}: identity scores from it on these images are white-box "
            "(the attack saw that network); transfer to other recognizers is not measured by them"
            for name in encoders if name in SCORED_BY]
