"""CLIP-based no-reference quality: LIQE, CLIP-IQA, CLIP-IQA-C (score.md §5–6).

All three run on open_clip's ``CLIP`` class with weights in OpenAI's naming (cloak.models.clip_openai):

* ``liqe`` — LIQE's fine-tuned ViT-B/32 (``liqe-mix``: pyiqa's re-release of the multitask LIQE
  checkpoint; the LIQE repo's original ``LIQE.pt`` loads the same way via ``[models]``).
* ``clipiqa`` — CLIP-IQA as piq implements it (MetaCloak, CAP): OpenAI RN50 (``clip-rn50``), the
  attention pool *without* its positional embedding (CLIP-IQA's choice, so any size works), antonym
  prompts "Good photo." / "Bad photo.", image resized to 224×224 first as MetaCloak does.
* ``clipiqa-c`` — the class-aware variant of MetaCloak/DiffShortcut: OpenAI ViT-B/32 (``clip-vit-b32``)
  with its own preprocessing, "a good/bad photo of {class}", softmax(100·cos), p_good − p_bad.
"""

from __future__ import annotations

import os
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from cloak.methods import MethodOptions
from cloak.models.clip_openai import LIQE_FILES, MEAN, STD, load_clip, tokenize
from cloak.score.base import Metric, MetricResult, ScoreImage

LIQE_QUALITIES = ("bad", "poor", "fair", "good", "perfect")
LIQE_SCENES = ("animal", "cityscape", "human", "indoor", "landscape", "night", "plant", "still_life", "others")
LIQE_DISTORTIONS = ("jpeg2000 compression", "jpeg compression", "noise", "blur", "color", "contrast",
                    "overexposure", "underexposure", "spatial", "quantization", "other")


def _clip(metric: Metric, model_id: str, files: tuple[str, ...] | None = None):
    from cloak.models.clip_openai import CLIP_FILE

    models = metric.ctx.models
    resolved, path, _ = models.resolve(model_id, metric.name)
    return models.memo(("clip", str(path), str(models.device)),
                       lambda: load_clip(path, files or (CLIP_FILE,), models.device))


def _to_tensor(img: Image.Image, device) -> torch.Tensor:
    """[0, 1] float 1×3×H×W."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous().to(device)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def openai_preprocess(rgb: np.ndarray, size: int, device) -> torch.Tensor:
    """CLIP's own transform: bicubic resize of the short side to ``size``, centre crop, normalise."""
    img = Image.fromarray(rgb)
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return _normalize(_to_tensor(img.crop((left, top, left + size, top + size)), device))


@torch.no_grad()
def _text_features(model, texts: list[str], device) -> torch.Tensor:
    return F.normalize(model.encode_text(tokenize(texts).to(device)).float(), dim=-1)


class LiqeOptions(MethodOptions):
    step: int = Field(32, ge=1, json_schema_extra={"unit": "px"}, description="stride of the 224² patches")
    num_patch: int = Field(15, ge=1, description="evenly spaced patches kept per image")


class Liqe(Metric):
    paper = "Zhang et al., LIQE, CVPR 2023; MetaCloak eval_score.py (LIQE.py)"
    implements = ("LIQE on its fine-tuned CLIP ViT-B/32 (open_clip): 224² patches (stride 32, 15 evenly spaced), "
                  "logit-scale cosine to the 5×9×11 prompts, patch mean, softmax, marginal quality "
                  "probabilities, LIQE = Σ k·p_k ∈ [1, 5]; extras.liqe_n = DiffShortcut's (LIQE−1)/2−1")
    notes = ("Images with a side under 224 px are first upscaled (bicubic) so the short side is 224 [PROP]. "
             "--compat: LIQE's patch selection for images with fewer than 15 patches (stride 0).")
    lower_better = False
    range = (1.0, 5.0)
    mode = "NR"
    Options = LiqeOptions

    @torch.no_grad()
    def compute(self, images: list[ScoreImage], ref) -> MetricResult:
        device = self.ctx.models.device
        model = _clip(self, "liqe-mix", LIQE_FILES)
        text = self.ctx.models.memo(("liqe-text", id(model)), lambda: self._text(model))
        scale = model.logit_scale.exp().float()
        values, scenes = [], []
        with self.ctx.progress.task("liqe", len(images)) as bar:
            for img in images:
                pil = Image.fromarray(img.rgb)
                if min(pil.size) < 224:
                    s = 224 / min(pil.size)
                    pil = pil.resize((max(224, round(pil.width * s)), max(224, round(pil.height * s))), Image.BICUBIC)
                x = _normalize(_to_tensor(pil, device))
                patches = x.unfold(2, 224, self.opts.step).unfold(3, 224, self.opts.step)
                patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 224, 224)
                n = min(self.opts.num_patch, patches.shape[0])
                # [Q] LIQE's code divides by num_patch even when fewer patches exist, giving stride 0 (patch 0
                # repeated) for small images; pyiqa's fix (stride ≥ 1) is the default.
                stride = patches.shape[0] // self.opts.num_patch if self.ctx.compat else max(1, patches.shape[0] // n)
                patches = patches[torch.arange(n, device=device) * stride]
                feats = F.normalize(model.encode_image(patches).float(), dim=-1)
                probs = (scale * feats @ text.T).mean(0).softmax(-1)
                joint = probs.view(len(LIQE_QUALITIES), len(LIQE_SCENES), len(LIQE_DISTORTIONS))
                quality = joint.sum((1, 2))
                values.append(float((quality * torch.arange(1, 6, device=device, dtype=quality.dtype)).sum()))
                scenes.append(LIQE_SCENES[int(joint.sum((0, 2)).argmax())])
                bar.advance(1)
        mean = float(np.mean(values))
        return MetricResult(values, extras={"liqe_n": (mean - 1) / 4 * 2 - 1,
                                            "scene_human": scenes.count("human") / len(scenes)})


    def _text(self, model) -> torch.Tensor:
        """The 495 prompt embeddings: fixed for a checkpoint, so kept on disk next to the model cache (encoding
        them is most of a short run's cost on a CPU, as in pyiqa, which caches them too)."""
        import hashlib

        from safetensors.torch import load_file, save_file

        device = self.ctx.models.device
        prompts = [f"a photo of a {s} with {d} artifacts, which is of {q} quality"
                   for q, s, d in product(LIQE_QUALITIES, LIQE_SCENES, LIQE_DISTORTIONS)]
        _, path, _ = self.ctx.models.resolve("liqe-mix", self.name)
        weights = next((path / f for f in LIQE_FILES if (path / f).is_file()), None)
        if weights is None:
            return _text_features(model, prompts, device)
        st = weights.stat()
        key = hashlib.sha256(f"{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}|{'|'.join(prompts)}".encode())
        cached = Path(self.ctx.cache_dir) / "score" / f"liqe-text-{key.hexdigest()[:20]}.safetensors"
        if cached.is_file():
            return load_file(str(cached))["text"].to(device)
        text = _text_features(model, prompts, device)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        save_file({"text": text.cpu().contiguous()}, str(tmp))
        os.replace(tmp, cached)
        return text


class ClipIqaOptions(MethodOptions):
    resize: int | None = Field(224, ge=32, json_schema_extra={"unit": "px"},
                               description="resize to this square first (MetaCloak); none = original size")


class ClipIqa(Metric):
    paper = "Wang et al., CLIP-IQA, AAAI 2023; piq.CLIPIQA as used by MetaCloak eval_score.py and CAP"
    implements = ("CLIP-IQA (piq): OpenAI CLIP RN50, attention pool without positional embedding, softmax of "
                  "logit-scale cosines to 'Good photo.'/'Bad photo.', score = p(Good) ∈ [0, 1]")
    lower_better = False
    range = (0.0, 1.0)
    mode = "NR"
    Options = ClipIqaOptions

    @torch.no_grad()
    def compute(self, images: list[ScoreImage], ref) -> MetricResult:
        device = self.ctx.models.device
        model = _clip(self, "clip-rn50")
        if not hasattr(model.visual, "attnpool"):
            raise RuntimeError("clipiqa expects a ResNet CLIP (attention pool); got a ViT checkpoint")
        anchors = _text_features(model, ["Good photo.", "Bad photo."], device)
        scale = model.logit_scale.exp().float()
        values = []
        with self.ctx.progress.task("clipiqa", len(images)) as bar:
            for img in images:
                pil = Image.fromarray(img.rgb)
                if self.opts.resize:
                    pil = pil.resize((self.opts.resize, self.opts.resize), Image.BILINEAR)
                feats = F.normalize(rn_image_features(model.visual, _normalize(_to_tensor(pil, device))), dim=-1)
                values.append(float((scale * feats @ anchors.T).softmax(-1)[0, 0]))
                bar.advance(1)
        return MetricResult(values)


def rn_image_features(visual, x: torch.Tensor) -> torch.Tensor:
    """ModifiedResNet image embedding with the attention pool's positional embedding left out (CLIP-IQA)."""
    x = visual.stem(x)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    tokens = x.flatten(2).permute(2, 0, 1)  # (HW)NC
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
    out, _ = F.multi_head_attention_forward(
        query=tokens[:1], key=tokens, value=tokens, embed_dim_to_check=tokens.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out[0].float()


class ClipIqaCOptions(MethodOptions):
    class_name: str = Field("face", min_length=1, description="the class in the prompts; MetaCloak maps the "
                                                              "class 'person' to 'face'")


class ClipIqaC(Metric):
    paper = "MetaCloak eval_score.py CLIP_IQAC_get_score; DiffShortcut A.2"
    implements = ("class-aware CLIP-IQA: OpenAI CLIP ViT-B/32 with its own preprocessing, "
                  "softmax(100·cos) over 'a good photo of {class}' / 'a bad photo of {class}', p_good − p_bad")
    proposals = ("class_name",)
    lower_better = False
    range = (-1.0, 1.0)
    mode = "NR"
    Options = ClipIqaCOptions

    @torch.no_grad()
    def compute(self, images: list[ScoreImage], ref) -> MetricResult:
        device = self.ctx.models.device
        model = _clip(self, "clip-vit-b32")
        cls = "face" if self.opts.class_name == "person" else self.opts.class_name
        text = _text_features(model, [f"a good photo of {cls}", f"a bad photo of {cls}"], device)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        values = []
        with self.ctx.progress.task("clipiqa-c", len(images)) as bar:
            for img in images:
                feats = F.normalize(model.encode_image(openai_preprocess(img.rgb, size, device)).float(), dim=-1)
                p = (100.0 * feats @ text.T).softmax(-1)[0]
                values.append(float(p[0] - p[1]))
                bar.advance(1)
        return MetricResult(values, extras={"prompt_class": cls})
