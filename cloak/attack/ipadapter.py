"""Zero-shot identity attack: generation conditioned on one reference image through an IP-Adapter.

attack.md §4. No fine-tuning: the attacker encodes a (possibly protected) reference photo and feeds
the embedding through an identity adapter's decoupled cross-attention while sampling — the attack
DLADiff's second layer defends against. Two variants (``-o variant=``):

* ``faceid`` (default) — IP-Adapter-FaceID [C: h94/IP-Adapter-FaceID model card, tencent-ailab
  ip_adapter_faceid.py]: the reference face is embedded (512-d, ℓ2-normalised), an MLP maps it to 4
  tokens, and the FaceID LoRA in the same checkpoint is applied to the UNet. The embedding is the
  published recipe's, insightface ``buffalo_l``'s ``faces[0].normed_embedding``: SCRFD-10GF at 640²,
  the most confident face, norm_crop to 112², ArcFace IResNet-50 (WebFace600K), written in
  ``cloak.models.insightface`` and run with onnxruntime (``pip install 'cloak[faceid]'``).
  ``-o embedder=arcface`` embeds with ArcFace IR-SE50 instead (RetinaFace alignment, largest face,
  ``cloak.models.faces``): another network than the adapter was trained on, so the report flags it
  as a substitution (results differ from the published attack; identity transfer is likely weaker).
  A reference without a detected face is a failed attack on that image (counted as ``fdfr_ref``).
* ``ipadapter`` — the plain IP-Adapter: the CLIP ViT-H/14 image embedding of the whole reference.

Weights load through diffusers' ``load_ip_adapter`` from a state dict read from the cache. Each input
image (or only ``-o reference=i``) is a reference in turn: ``gen/<image>/<prompt>/<seed>.png``; the
report records which reference made each image. Defaults [PROP, §4]: SD 1.5 base, FaceID, prompts
"a photo of a person" and "a portrait of a person in a garden", 8 seeds each, 30 DDIM steps, CFG 7.5,
the model card's negative prompt, adapter scale 1.0.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from cloak.attack.base import AttackMethod, AttackResult, Condition, GenerationOptions
from cloak.errors import UsageError
from cloak.io.images import ImageSet, to_uint8
from cloak.models import adapters

MODEL_CARD_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality, blurry"
SUBSTITUTION = ("faceid with -o embedder=arcface: the published IP-Adapter-FaceID was trained on insightface "
                "buffalo_l embeddings; ArcFace IR-SE50 embeddings were fed instead, so results differ from the "
                "published attack (a substitution; identity transfer is likely weaker)")
EMBEDDERS = {"insightface": "insightface buffalo_l (SCRFD-10GF, norm_crop 112², ArcFace IResNet-50 w600k_r50), "
                            "faces[0] = the most confident face, normed_embedding: the published recipe",
             "arcface": "ArcFace IR-SE50 (RetinaFace, largest face, 112² alignment): a substitution"}


class IPAdapterOptions(GenerationOptions):
    variant: Literal["faceid", "ipadapter"] = Field("faceid", description="faceid: face-ID embedding + FaceID LoRA; "
                                                    "ipadapter: CLIP image embedding of the whole reference")
    embedder: Literal["insightface", "arcface"] = Field(
        "insightface", description="faceid's face embedder: insightface (buffalo_l, what the adapter was trained on; "
        "needs cloak[faceid]) or arcface (ArcFace IR-SE50, a substitution the report flags)")
    reference: int | None = Field(None, ge=0, description="use only input image i (name order) as the reference; "
                                  "none = every input image in turn")
    scale: float = Field(1.0, ge=0, description="IP-Adapter scale (weight of the image tokens)")
    prompts: list[str] = Field(["a photo of a person", "a portrait of a person in a garden"],
                               description="prompts to sample (--prompt, repeatable)")
    num_images: int = Field(8, ge=0, description="images per prompt and reference; seeds 0..n-1")
    sample_steps: int = Field(30, ge=1, description="sampling steps")
    sampler: str = Field("ddim", description="default (the model's own scheduler), ddim, pndm, dpm, euler, ddpm")
    negative_prompt: str | None = Field(MODEL_CARD_NEGATIVE, description="negative prompt")


class IPAdapter(AttackMethod):
    paper = ("Ye et al., IP-Adapter, arXiv 2308.06721 (FaceID variant: h94/IP-Adapter-FaceID); the zero-shot "
             "attack of DLADiff's evaluation")
    implements = ("zero-shot generation conditioned on each reference image through IP-Adapter(-FaceID) "
                  "decoupled cross-attention, loaded with diffusers' load_ip_adapter; no fine-tuning")
    proposals = ("variant", "prompts", "num_images")
    notes = ("faceid embeds faces with insightface buffalo_l as published (-o embedder=arcface substitutes ArcFace "
             "IR-SE50; the report flags it). A reference without a detected face generates nothing (summary "
             "fdfr_ref). "
             "Default base model sd15: the SD 1.5 adapters do not fit SD 2.1. Nothing is trained: --steps and "
             "--save-model do not apply.")

    Options = IPAdapterOptions
    default_model = "sd15"
    steps_option = None
    fine_tunes = False
    per_reference = True
    tiny_options = {"num_images": 1, "sample_steps": 2, "prompts": ["a photo of a person"]}

    def __call__(self, images: ImageSet) -> AttackResult:
        ctx, o = self.ctx, self.opts
        sd = ctx.models.sd(ctx.model, role="base")
        weights, adapter_id, _ = adapters.load(ctx.models, o.variant)
        adapters.check_fits(weights, sd.unet, adapter_id, sd.id)
        if o.reference is not None and o.reference >= len(images):
            raise UsageError(f"-o reference={o.reference}: there are only {len(images)} input images")
        faceid = o.variant == "faceid"
        if faceid and o.embedder == "arcface":
            ctx.warn(SUBSTITUTION)
        embed, embedder = self._face_embedder() if faceid else (self._clip_embedder(weights), None)
        # diffusers wants [negative; positive] per adapter when it applies classifier-free guidance.
        cfg = o.guidance > 1
        conditions, references = [], []
        indices = range(len(images)) if o.reference is None else [o.reference]
        with ctx.progress.task("reference embeddings", len(indices)) as bar:
            for i in indices:
                item = images.items[i]
                e = embed(to_uint8(images.tensors[i]))
                references.append({"reference": item.name, "input": str(item.path), "embedded": e is not None})
                bar.advance(1)
                if e is None:
                    continue
                e = e.reshape(1, 1, -1).to(ctx.device, sd.unet.dtype)
                embeds = torch.cat([torch.zeros_like(e), e]) if cfg else e
                conditions.append(Condition(name=item.name, pipe_kwargs={"ip_adapter_image_embeds": [embeds]},
                                            record={"reference": item.name, "reference_input": str(item.path)}))
        missed = sum(not r["embedded"] for r in references)
        if missed:
            ctx.warn(f"no face detected on {missed} of {len(references)} reference image(s): the attack fails on "
                     "them (nothing generated)")
        # The adapter changes the UNet's attention processors (and adds the FaceID LoRA): do it on a copy.
        unet = copy.deepcopy(sd.unet)
        summary = {"variant": o.variant, "adapter": adapter_id, "ip_adapter_scale": o.scale,
                   "references": references, "fdfr_ref": missed / len(references) if references else None,
                   "fine_tuned": False}
        if embedder is not None:
            summary["embedder"] = embedder
            if o.embedder == "arcface":
                summary["substitution"] = SUBSTITUTION
        return AttackResult(unet, sd.text_encoder, summary=summary, conditions=conditions,
                            pipeline_hook=lambda pipe: self._load_adapter(pipe, weights))

    def _load_adapter(self, pipe, weights: adapters.IPAdapterWeights) -> None:
        # Weights come as a state dict already read from the cache: diffusers downloads nothing. Its
        # layer constructors draw from the global generator before the weights overwrite them.
        with torch.random.fork_rng(devices=[]):
            pipe.load_ip_adapter(weights.state_dict, subfolder=None, weight_name=weights.weight_name,
                                 image_encoder_folder=None, low_cpu_mem_usage=False)
        pipe.set_ip_adapter_scale(self.opts.scale)

    def _face_embedder(self):
        """(embed(rgb) → 512-d ℓ2-normalised tensor or None, the report's record of the embedder)."""
        o = self.opts
        if o.embedder == "arcface":
            faces = self.ctx.models.faces(role="faceid")
            first = faces.embed_largest
            record = {"name": "arcface-irse50", "recipe": EMBEDDERS["arcface"], "substitution": True}
        else:
            from cloak.models import insightface

            faces = insightface.load_analyzer(self.ctx.models, role="faceid")
            first = faces.embed_first
            record = {"name": faces.backend, "recipe": EMBEDDERS["insightface"], "substitution": False,
                      "detector": insightface.DETECTOR_ID, "recognizer": insightface.RECOGNIZER_ID,
                      "det_size": list(faces.detector.input_size), "onnxruntime_providers": faces.providers}

        def embed(rgb: np.ndarray) -> torch.Tensor | None:
            e = first(rgb)
            return None if e is None else torch.from_numpy(np.asarray(e, dtype=np.float32))

        return embed, record

    def _clip_embedder(self, weights: adapters.IPAdapterWeights):
        from PIL import Image

        encoder, processor = adapters.load_image_encoder(self.ctx.models)
        if int(encoder.config.projection_dim) != weights.embed_dim:
            raise UsageError(f"the image encoder gives {encoder.config.projection_dim}-d embeddings, the IP-Adapter "
                             f"expects {weights.embed_dim}-d")

        @torch.no_grad()
        def embed(rgb: np.ndarray) -> torch.Tensor:
            pixels = processor(images=Image.fromarray(rgb), return_tensors="pt").pixel_values
            return encoder(pixels.to(encoder.device, encoder.dtype)).image_embeds[0].float()

        return embed
