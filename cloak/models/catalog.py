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


_add(ModelSpec("tiny-sd", "sd", "built-in random SD (ε-prediction), 64 px; for demos and tests",
               "Apache-2.0 (cloak)", "builtin", builtin=True, notes="random weights: protects and measures nothing"))
_add(ModelSpec("tiny-sd-v", "sd", "built-in random SD (v-prediction), 64 px; for tests",
               "Apache-2.0 (cloak)", "builtin", builtin=True, notes="random weights: protects and measures nothing"))
_add(ModelSpec("mid-sd", "sd", "built-in random SD, 128 px, mid width; for benchmarks",
               "Apache-2.0 (cloak)", "builtin", builtin=True, notes="random weights"))
_add(ModelSpec("sd21-shaped", "sd", "built-in random SD with SD 2.1-base tensor shapes; for benchmarks",
               "Apache-2.0 (cloak)", "builtin", builtin=True, notes="random weights, ~5 GB on disk"))
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
               "Apache-2.0 (cloak)", "builtin", builtin=True, notes="random weights: detects nothing meaningful"))
_add(ModelSpec("tiny-arcface", "arcface", "built-in random ArcFace IR-SE50 (same architecture)",
               "Apache-2.0 (cloak)", "builtin", builtin=True, notes="random weights: measures no identity"))


def get_spec(model_id: str) -> ModelSpec | None:
    return CATALOG.get(model_id)


def ids(kind: str | None = None) -> list[str]:
    return [k for k, v in CATALOG.items() if kind is None or v.kind == kind]
