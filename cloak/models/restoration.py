"""Face restoration (CodeFormer with detect → align → restore → paste back) and the SD ×4 upscaler.

Both are DiffShortcut's purification stages (purify.md §1). Weights come from the cache only:

* ``codeformer`` (S-Lab License 1.0, non-commercial) → :class:`cloak.models.archs.codeformer.CodeFormer`;
* ``retinaface-r50`` → facexlib's RetinaFace (through :mod:`cloak.models.faces`);
* ``parsing-parsenet`` → facexlib's ParseNet (the face-parsing mask of the paste-back);
* ``sd-x4-upscaler`` → diffusers ``StableDiffusionUpscalePipeline`` (``from_pretrained(local_files_only)``).

facexlib's ``FaceRestoreHelper`` would download its detector and parser on construction, so
:class:`FaceRestorer` re-implements the helper as CodeFormer's ``inference_codeformer.py`` drives it
(whole-image mode: upscale 2, detector resize 640, eye-distance threshold 5, grey threshold 10, parse-mask
paste-back) with the networks handed in. Its constants are the upstream ones at the published 512² face size and are
scaled with the face size, so the built-in stand-ins (same classes at toy width, seeded random weights,
same file names plus ``cloak_arch.json``) run the same code on tiny images.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloak.errors import ModelUnavailableError

log = logging.getLogger("cloak.models")

CODEFORMER_FILE = "codeformer.pth"
PARSENET_FILE = "parsing_parsenet.pth"
ARCH_FILE = "cloak_arch.json"  # only in built-in stand-ins: constructor overrides of the published config
STANDIN_SEED = 31

# The published networks' constructor arguments (CodeFormer's come from archs.codeformer).
PARSENET_CONFIG: dict[str, Any] = {"in_size": 512, "out_size": 512, "parsing_ch": 19}
TINY_CODEFORMER: dict[str, Any] = dict(img_size=32, nf=32, ch_mult=(1, 2), codebook_size=16, emb_dim=8, dim_embd=32,
                                       n_head=2, n_layers=1, connect_list=("32",))
TINY_PARSENET: dict[str, Any] = dict(in_size=32, out_size=32, min_feat_size=16, base_ch=32, parsing_ch=19,
                                     res_depth=1)

# facexlib's five-point template of an FFHQ-aligned 512² face (eyes, nose tip, mouth corners).
FACE_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]])
# Grey used for pixels the alignment warp pulls from outside the image (upstream (135,133,132) in BGR).
BORDER_RGB = (132, 133, 135)
# Parsing classes kept in the paste-back mask (19 CelebAMask-HQ classes; 0 background, 14 neck, 16 cloth,
# 17 hair, 18 hat are excluded), as CodeFormer's MASK_COLORMAP.
PARSE_KEEP = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0], dtype=np.float64)


def read_arch(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / ARCH_FILE
    if not path.is_file():
        return {}
    arch = json.loads(path.read_text(encoding="utf-8"))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}


def _write_arch(target: Path, arch: dict) -> None:
    (target / ARCH_FILE).write_text(json.dumps(arch), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ loaders


def load_codeformer_dir(model_dir: Path, device: str | torch.device = "cpu"):
    from cloak.models.archs.codeformer import load_codeformer

    return load_codeformer(Path(model_dir) / CODEFORMER_FILE, device, **read_arch(model_dir))


def _parsenet(**overrides):
    from facexlib.parsing.parsenet import ParseNet

    return ParseNet(**{**PARSENET_CONFIG, **overrides})


def load_parsenet(model_dir: Path, device: str | torch.device = "cpu"):
    path = Path(model_dir) / PARSENET_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ModelUnavailableError(f"cannot read ParseNet weights {path}: {exc}",
                                    hint="cloak models pull parsing-parsenet") from None
    arch = read_arch(model_dir)
    net = _parsenet(**arch)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelUnavailableError(f"{path} does not match facexlib's ParseNet: {exc}") from None
    net.in_size = int(arch.get("in_size", PARSENET_CONFIG["in_size"]))
    return net.to(device).eval().requires_grad_(False)


def build_standin_codeformer(target: Path) -> None:
    from cloak.models.archs.codeformer import build_codeformer
    from cloak.models.guided import randomize_zeroed

    target = Path(target)
    torch.manual_seed(STANDIN_SEED)
    model = build_codeformer(**TINY_CODEFORMER)
    randomize_zeroed(model, torch.Generator().manual_seed(STANDIN_SEED))  # the zero position embedding
    target.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": model.state_dict()}, target / CODEFORMER_FILE)
    _write_arch(target, TINY_CODEFORMER)


def build_standin_parsenet(target: Path) -> None:
    target = Path(target)
    torch.manual_seed(STANDIN_SEED + 1)
    net = _parsenet(**TINY_PARSENET)
    target.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), target / PARSENET_FILE)
    _write_arch(target, TINY_PARSENET)


# ------------------------------------------------------------------------------------------------ faces


@dataclass
class FaceRecord:
    box: list[float]
    score: float
    landmarks: np.ndarray  # 5×2, in the (possibly enlarged) working image


def is_gray(rgb: np.ndarray, threshold: float = 10.0) -> bool:
    """CodeFormer's test: mean variance of the pairwise channel differences at most ``threshold`` (10, as
    ``FaceRestoreHelper.read_image`` calls it since sczhou/CodeFormer 6c247ba, 2023-01, "change threshold for
    is_gray"; 5 before)."""
    c = rgb.astype(np.int16)
    diffs = [(c[..., 0] - c[..., 1]).var(), (c[..., 1] - c[..., 2]).var(), (c[..., 2] - c[..., 0]).var()]
    return float(sum(diffs) / 3.0) <= threshold


@dataclass
class FaceRestorer:
    """CodeFormer whole-image restoration: detect, align to the face size, restore, paste back.

    ``restore`` follows ``inference_codeformer.py`` with ``FaceRestoreHelper(upscale, face_size=512,
    det_model='retinaface_resnet50', use_parse=True)``; every size-dependent constant is the upstream one
    times ``face_size / 512`` (exactly upstream for the published weights).
    """

    codeformer: Any
    detector: Any
    parser: Any
    device: torch.device
    conf_threshold: float = 0.8  # the detector's default in CodeFormer's helper
    eye_dist_threshold: float = 5.0
    det_short_side: int = 640  # images are enlarged so the short side is at least this for detection
    # [PROP] Larger images are not shrunk for detection: CodeFormer's helper only enlarged ("scale = max(1,
    # scale)") until sczhou/CodeFormer a75e7ae (2024-09) commented that out, so that HD images are shrunk to a
    # 640 short side (INTER_AREA) too. DiffShortcut (2024-06) ran the earlier code; det_shrink=True follows
    # today's CodeFormer (``cloak purify --method diffshortcut -o det_shrink=true``).
    det_shrink: bool = False
    compat: bool = False
    face_size: int = field(init=False)
    parse_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.face_size = int(self.codeformer.img_size)
        # ParseNet does not keep its input size; load_parsenet attaches it.
        self.parse_size = int(getattr(self.parser, "in_size", PARSENET_CONFIG["in_size"]))

    @property
    def scale(self) -> float:
        return self.face_size / 512.0

    # --- stages ---------------------------------------------------------------------------------------
    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """Upstream enlarges inputs whose short side is below 512 (the face size) before anything else."""
        import cv2

        h, w = rgb.shape[:2]
        if min(h, w) < self.face_size:
            f = self.face_size / min(h, w)
            rgb = cv2.resize(rgb, (0, 0), fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        return rgb

    @torch.no_grad()
    def detect(self, rgb: np.ndarray) -> list[FaceRecord]:
        import cv2

        h, w = rgb.shape[:2]
        det_side = max(1, round(self.det_short_side * self.scale))
        scale = det_side / min(h, w)
        if not self.det_shrink:
            scale = max(1.0, scale)
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        img = cv2.resize(rgb, (int(w * scale), int(h * scale)), interpolation=interpolation)
        bgr = np.ascontiguousarray(img[:, :, ::-1])
        found = self.detector.detect_faces(bgr, conf_threshold=self.conf_threshold)
        faces = []
        for row in np.asarray(found, dtype=np.float64).reshape(-1, 15):
            row = row / scale
            marks = row[5:15].reshape(5, 2)
            if self.compat:
                # [Q] CodeFormer's helper measures "eye distance" from mismatched coordinates (y₁−y₂, x₂−x_nose).
                eye_dist = float(np.hypot(row[6] - row[8], row[7] - row[9]))
            else:
                eye_dist = float(np.hypot(*(marks[0] - marks[1])))
            if eye_dist < self.eye_dist_threshold * self.scale:
                continue
            # Guard (not upstream): random stand-in detectors report "faces" whose landmarks lie far outside
            # the image; a landmark more than one image size away from the frame cannot be a face in it.
            if not (np.all(marks[:, 0] > -w) and np.all(marks[:, 0] < 2 * w)
                    and np.all(marks[:, 1] > -h) and np.all(marks[:, 1] < 2 * h)):
                continue
            faces.append(FaceRecord([float(v) for v in row[:4]], float(row[4] * scale), marks))
        return faces

    def align(self, rgb: np.ndarray, face: FaceRecord) -> tuple[np.ndarray, np.ndarray] | None:
        """(aligned face_size² crop, 2×3 affine) or None when no similarity transform fits the landmarks."""
        import cv2

        template = FACE_TEMPLATE_512 * self.scale
        affine = cv2.estimateAffinePartial2D(face.landmarks.astype(np.float32), template.astype(np.float32),
                                             method=cv2.LMEDS)[0]
        if affine is None or not np.all(np.isfinite(affine)):
            return None
        crop = cv2.warpAffine(rgb, affine, (self.face_size, self.face_size), borderMode=cv2.BORDER_CONSTANT,
                              borderValue=BORDER_RGB)
        return crop, affine

    @torch.no_grad()
    def restore_face(self, crop: np.ndarray, w: float, gray: bool) -> np.ndarray:
        import cv2

        x = torch.from_numpy(crop).permute(2, 0, 1).float().div(127.5).sub(1.0).unsqueeze(0)
        dtype = next(self.codeformer.parameters()).dtype
        out = self.codeformer(x.to(self.device, dtype), w=w, adain=True)[0].float().cpu()
        face = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        if gray:  # upstream keeps grey inputs grey
            face = np.repeat(cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
        return face

    @torch.no_grad()
    def parse_mask(self, face: np.ndarray) -> np.ndarray:
        """Soft face-region mask (face_size², [0,1]) from the parsing network, blurred as upstream."""
        import cv2

        ps, s = self.parse_size, self.parse_size / 512.0
        inp = cv2.resize(face, (ps, ps), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(inp).permute(2, 0, 1).float().div(127.5).sub(1.0).unsqueeze(0)
        dtype = next(self.parser.parameters()).dtype
        labels = self.parser(x.to(self.device, dtype))[0].argmax(dim=1).squeeze(0).cpu().numpy()
        mask = PARSE_KEEP[labels] * 255.0
        k = max(1, round(101 * s)) | 1  # odd kernel: 101 at 512²
        sigma = 11.0 * s
        mask = cv2.GaussianBlur(mask, (k, k), sigma)
        mask = cv2.GaussianBlur(mask, (k, k), sigma)
        t = max(1, round(10 * s))  # remove the black borders (10 px at 512²)
        mask[:t, :] = 0
        mask[-t:, :] = 0
        mask[:, :t] = 0
        mask[:, -t:] = 0
        return cv2.resize(mask / 255.0, (self.face_size, self.face_size))

    def paste(self, rgb: np.ndarray, faces: list[tuple[np.ndarray, np.ndarray]], upscale: int) -> np.ndarray:
        """Paste restored faces (face, affine) back into the image enlarged ``upscale`` times."""
        import cv2

        h, w = rgb.shape[:2]
        h_up, w_up = int(h * upscale), int(w * upscale)
        out = cv2.resize(rgb, (w_up, h_up), interpolation=cv2.INTER_LINEAR).astype(np.float64)
        fs = (self.face_size, self.face_size)
        for face, affine in faces:
            inverse = cv2.invertAffineTransform(affine) * upscale
            if upscale > 1:
                inverse[:, 2] += 0.5 * upscale  # upstream's half-pixel offset for the enlarged grid
            inv_face = cv2.warpAffine(face, inverse, (w_up, h_up))
            inv_mask = cv2.warpAffine(np.ones(fs, dtype=np.float32), inverse, (w_up, h_up))
            eroded = cv2.erode(inv_mask, np.ones((int(2 * upscale), int(2 * upscale)), np.uint8))
            pasted = eroded[:, :, None] * inv_face
            w_edge = int(float(eroded.sum()) ** 0.5) // 20  # blend width from the face area
            center = cv2.erode(eroded, np.ones((w_edge * 2, w_edge * 2), np.uint8))
            soft = cv2.GaussianBlur(center, (w_edge * 2 + 1, w_edge * 2 + 1), 0)[:, :, None]
            parse = cv2.warpAffine(self.parse_mask(face), inverse, (w_up, h_up), flags=cv2.INTER_AREA)[:, :, None]
            blend = np.minimum(parse, soft)  # upstream: the parse mask wherever it is below the square mask
            out = blend * pasted + (1 - blend) * out
        return out.astype(np.uint8)  # truncation, as upstream

    def restore(self, rgb: np.ndarray, w: float = 0.5, upscale: int = 2,
                max_faces: int = 0) -> tuple[np.ndarray, dict]:
        """Restore the detected faces of an RGB uint8 image; returns (enlarged image, record).

        ``max_faces`` > 0 keeps that many detections, highest detector score first (upstream: all).
        """
        work = self.prepare(rgb)
        gray = is_gray(work)
        restored = []
        faces = sorted(self.detect(work), key=lambda f: -f.score)
        for face in faces[:max_faces] if max_faces > 0 else faces:
            aligned = self.align(work, face)
            if aligned is None:
                continue
            crop, affine = aligned
            restored.append((self.restore_face(crop, w, gray), affine))
        out = self.paste(work, restored, upscale)
        return out, {"faces_detected": len(faces), "faces_restored": len(restored)}


def face_restorer(models, *, compat: bool = False, det_shrink: bool = False) -> FaceRestorer:
    """CodeFormer + RetinaFace + ParseNet through the ``Models`` handle (stand-ins with --tiny), loaded once per
    setting (``det_shrink``: see :class:`FaceRestorer`)."""
    from cloak.models import faces as faces_mod

    _, cf_dir, _ = models.resolve("codeformer", "restorer")
    _, det_dir, _ = models.resolve("retinaface-r50", "restorer-detector")
    _, parse_dir, _ = models.resolve("parsing-parsenet", "restorer-parser")
    device = models.device

    def build() -> FaceRestorer:
        return FaceRestorer(load_codeformer_dir(cf_dir, device), faces_mod.load_retinaface(det_dir, str(device)),
                            load_parsenet(parse_dir, device), device, det_shrink=det_shrink, compat=compat)

    return models.memo(("face-restorer", str(cf_dir), str(det_dir), str(parse_dir), str(device), compat, det_shrink),
                       build)


# ------------------------------------------------------------------------------------------------ SD ×4 upscaler


def build_standin_upscaler(target: Path) -> None:
    """A random-weight ``StableDiffusionUpscalePipeline`` (7-channel UNet with noise-level class embeddings,
    VAE factor 4, CLIP text encoder, DDPM low-res and DDIM v-prediction schedulers), via save_pretrained."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cloak.models.handle import quiet_libraries
    from cloak.models.tiny import _tokenizer_files

    quiet_libraries()
    target = Path(target)
    torch.manual_seed(STANDIN_SEED + 2)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, num_class_embeds=1000, norm_num_groups=32,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, scaling_factor=0.08333)
    with tempfile.TemporaryDirectory() as tmp:
        _tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # The published upscaler's scheduler settings (model card configs).
    low_res = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=low_res, scheduler=scheduler, max_noise_level=350)
    pipe.save_pretrained(target, safe_serialization=True)
    (target / "cloak_builtin.json").write_text(json.dumps({"seed": STANDIN_SEED + 2, "note": "random weights"}),
                                               encoding="utf-8")


def load_upscaler(path: Path, device: torch.device, dtype: torch.dtype):
    from diffusers import StableDiffusionUpscalePipeline

    from cloak.models.handle import quiet_libraries

    quiet_libraries()
    try:
        pipe = StableDiffusionUpscalePipeline.from_pretrained(
            path, local_files_only=True, safety_checker=None, feature_extractor=None, watermarker=None)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot load the ×4 upscaler from {path}: {exc}",
                                    hint="cloak models pull sd-x4-upscaler") from None
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe.to(device=device, dtype=dtype)


def upscaler(models, role: str = "upscaler"):
    """The SD ×4 upscaler pipeline through the ``Models`` handle, loaded once per run."""
    _, path, _ = models.resolve("sd-x4-upscaler", role)
    return models.memo(("sd-x4-upscaler", str(path), str(models.device), str(models.dtype)),
                       lambda: load_upscaler(path, models.device, models.dtype))


@torch.no_grad()
def upscale4(pipe, image, prompt: str, *, steps: int, guidance: float, noise_level: int,
             generator: torch.Generator, negative_prompt: str | None = None,
             low_res_noise_level: int | None = None) -> torch.Tensor:
    """×4 super-resolution of a PIL image (or a 1×3×h×w tensor in [-1,1]); returns 1×3×4h×4w in [-1, 1] (CPU,
    float32).

    ``noise_level`` is what the UNet is told (its class label); the low-resolution input is noised at that level
    too unless ``low_res_noise_level`` says otherwise (Noisy Upscaling's diffusers fork: ``noise_level −
    noise_level_sub``). diffusers draws the low-res noise and the initial latents from ``generator`` (CPU), so
    runs repeat.
    """
    call = dict(prompt=prompt, image=image, num_inference_steps=steps, guidance_scale=guidance,
                noise_level=noise_level, negative_prompt=negative_prompt, generator=generator, output_type="pt")
    if low_res_noise_level is None:
        out = pipe(**call)
    else:
        with _low_res_noise_at(pipe, low_res_noise_level):
            out = pipe(**call)
    return out.images[:1].float().cpu().clamp(0, 1) * 2 - 1


@contextmanager
def _low_res_noise_at(pipe, level: int):
    """Make the pipeline noise its low-resolution input at ``level`` whatever noise level it conditions on.

    Stock diffusers ties the two together; the instance's ``add_noise`` is shadowed for one call, then restored.
    """
    scheduler = pipe.low_res_scheduler
    original = scheduler.add_noise

    def add_noise(sample, noise, timesteps):
        return original(sample, noise, torch.full_like(timesteps, level))

    scheduler.add_noise = add_noise
    try:
        yield
    finally:
        del scheduler.add_noise


def with_ddpm_sampler(pipe):
    """The same upscaler (shared modules) sampling with DDPM instead of its DDIM scheduler, from the same
    schedule config (v-prediction) — what DeepFloyd IF's ``StableStageIII`` does before every call."""
    from diffusers import DDPMScheduler

    ddpm = type(pipe)(**{**pipe.components, "scheduler": DDPMScheduler.from_config(pipe.scheduler.config)})
    ddpm.set_progress_bar_config(disable=True)
    return ddpm
