"""Image encoders that protection methods attack: identity encoders (DLADiff layer 2) and VGG-19 (CAP).

Identity encoders map a face crop to an embedding; each has its own input size and normalisation,
applied here inside ``forward`` so callers hand in [-1, 1] pixels at ``input_size`` and gradients flow:

* ``arcface-irse50`` — ArcFace IR-SE50 (facexlib architecture, loaded by :mod:`cloak.models.faces`),
  112² input in [-1, 1], 512-d ℓ2-normalised output.
* ``dlib-resnet`` — dlib's 128-d face-recognition ResNet (:mod:`cloak.models.archs.dlib_resnet`, weights of the
  ``face-recognition-models`` package), on dlib's own 150² chip: it aligns the face itself (``face_view``:
  dlib's 5 landmarks on the clean image fix the chip, which is resampled differentiably from the protected one).
* ``insightface-w600k-r50`` — insightface buffalo_l's ArcFace (IP-Adapter-FaceID's embedder), its ONNX graph
  evaluated with torch ops (:mod:`cloak.models.insightface`), on insightface's norm_crop at SCRFD's keypoints.
* ``ip-adapter-image-encoder`` — the CLIP vision tower of IP-Adapter for SD 1.5 (OpenCLIP ViT-H/14,
  ``CLIPVisionModelWithProjection`` from ``h94/IP-Adapter`` ``models/image_encoder``), 224² input with
  CLIP's mean/std, ``image_embeds`` output (what IP-Adapter feeds its projection).

``vgg19-imagenet`` is torchvision's VGG-19 (ImageNet) convolutional part, used for Gram-matrix style
features. Weights are read from the cache only (``weights_only`` / safetensors); every id has a built-in
stand-in with the same architecture and random weights, written in the same layout, so ``--tiny`` runs the
same loading code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cloak.errors import ModelUnavailableError

STANDIN_SEED = 11

# --- IP-Adapter image encoder (CLIP vision) ---------------------------------------------------------
CLIP_SUBFOLDER = "models/image_encoder"  # layout of the h94/IP-Adapter snapshot
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --- VGG-19 -------------------------------------------------------------------------------------------
VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision release file name
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Index of each conv layer in torchvision's ``vgg19().features`` (the ReLU that follows is index + 1).
VGG19_CONV = {
    "conv1_1": 0, "conv1_2": 2,
    "conv2_1": 5, "conv2_2": 7,
    "conv3_1": 10, "conv3_2": 12, "conv3_3": 14, "conv3_4": 16,
    "conv4_1": 19, "conv4_2": 21, "conv4_3": 23, "conv4_4": 25,
    "conv5_1": 28, "conv5_2": 30, "conv5_3": 32, "conv5_4": 34,
}


class IdentityEncoder(torch.nn.Module):
    """Base: ``forward`` takes B×3×S×S pixels in [-1, 1] (S = ``input_size``) and returns B×D embeddings."""

    name: str = ""
    input_size: int = 0


class ArcFaceEncoder(IdentityEncoder):
    def __init__(self, backbone: torch.nn.Module, name: str = "arcface-irse50"):
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.input_size = 112

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # facexlib's Flatten uses .view: channels-last strides from interpolation would break it.
        return self.backbone(x.contiguous())


class DlibResNetEncoder(IdentityEncoder):
    """dlib's face-recognition ResNet on dlib's aligned chip; raw (unnormalised) 128-d descriptors."""

    def __init__(self, net: torch.nn.Module, analyzer, name: str = "dlib-resnet"):
        super().__init__()
        self.net = net
        self.analyzer = analyzer  # DlibFaceAnalyzer: detector + 5-point landmarks on the clean images
        self.name = name
        self.input_size = 150

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() + 1) * 127.5)

    def face_view(self, clean: torch.Tensor, regions):
        """A function x → dlib chips of ``x`` at the clean images' landmarks (``.sources``: where each came from).

        dlib's detector runs on the clean image; where it finds no face the landmarks are fitted in the
        region's box (another detector's) or the whole image.
        """
        from cloak.io.images import to_uint8
        from cloak.models.archs.dlib_resnet import extract_chips, face_chip_matrix

        matrices, sources = [], []
        for i, image in enumerate(clean):  # a B×3×H×W tensor or images of their own shapes
            rgb = to_uint8(image)
            box = regions[i].box if regions is not None and i < len(regions) else None
            points, source = self.analyzer.landmarks(rgb, box)
            matrices.append(face_chip_matrix(points, self.input_size))
            sources.append(source)

        def view(x: torch.Tensor) -> torch.Tensor:
            return extract_chips(x, matrices, self.input_size).clamp(-1, 1)

        view.sources = sources
        return view


class ClipImageEncoder(IdentityEncoder):
    def __init__(self, model: torch.nn.Module, name: str = "ip-adapter-image-encoder"):
        super().__init__()
        self.model = model
        self.name = name
        self.input_size = int(model.config.image_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.model(pixel_values=pixels.to(self.model.dtype)).image_embeds


def _freeze(module: torch.nn.Module, device) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.to(device).eval()


def load_identity_encoder(models, model_id: str, role: str = "identity-encoder") -> IdentityEncoder:
    """Load one identity encoder by catalog id (``--tiny``: its stand-in), once per process."""
    from cloak.models.catalog import get_spec

    spec = get_spec(model_id)
    if spec is not None and spec.source.startswith("pip:"):  # real weights in a package; no stand-in needed
        path = models.packaged(model_id, role)
    else:
        resolved, path, _ = models.resolve(model_id, role)
        spec = get_spec(resolved)
    kind = spec.kind if spec is not None else None
    device = models.device

    def build() -> IdentityEncoder:
        if kind == "dlib-resnet":
            from cloak.models.archs.dlib_resnet import DatFormatError, load_dlib_resnet
            from cloak.models.dlib_faces import RESNET_FILE, DlibFaceAnalyzer

            try:
                net = load_dlib_resnet(Path(path) / RESNET_FILE)
            except (OSError, DatFormatError) as exc:
                raise ModelUnavailableError(f"cannot read {Path(path) / RESNET_FILE}: {exc}") from None
            return _freeze(DlibResNetEncoder(net, DlibFaceAnalyzer(path), name=model_id), device)
        if kind == "arcface":
            from cloak.models.faces import load_arcface

            return _freeze(ArcFaceEncoder(load_arcface(path, "cpu"), name=model_id), device)
        if kind == "clip-vision":
            return _freeze(ClipImageEncoder(load_clip_vision(path), name=model_id), device)
        if kind == "insightface-arcface":  # FaceID's embedder: its ONNX graph run as torch ops
            from cloak.models.insightface import load_identity_encoder as load_buffalo

            return load_buffalo(models, role)
        raise ModelUnavailableError(f"{model_id} is not an identity encoder (kind {kind!r}); "
                                    "use arcface-irse50, ip-adapter-image-encoder, dlib-resnet or "
                                    "insightface-w600k-r50")

    return models.memo(("identity-encoder", str(path), str(device)), build)


def load_clip_vision(model_dir: Path):
    from transformers import CLIPVisionModelWithProjection

    from cloak.models.handle import quiet_libraries

    quiet_libraries()
    folder = Path(model_dir) / CLIP_SUBFOLDER
    try:
        return CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True,
                                                             torch_dtype=torch.float32)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelUnavailableError(f"cannot load the CLIP image encoder from {folder}: {exc}") from None


def build_standin_clip_vision(target: Path) -> None:
    """A random CLIP vision tower with projection at toy width, in the IP-Adapter snapshot layout.

    The input geometry is ViT-H/14's (224², patch 14) so crops and resizing follow the real path.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from cloak.models.handle import quiet_libraries

    quiet_libraries()
    torch.manual_seed(STANDIN_SEED)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=224, patch_size=14, projection_dim=32, hidden_act="gelu")
    model = CLIPVisionModelWithProjection(config)
    folder = Path(target) / CLIP_SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)


# --- VGG-19 style features ----------------------------------------------------------------------------
def _vgg19_features() -> torch.nn.Sequential:
    from torchvision.models import vgg

    return vgg.make_layers(vgg.cfgs["E"], batch_norm=False)  # == torchvision vgg19().features


class VGGFeatures(torch.nn.Module):
    """Post-ReLU activations of named VGG-19 conv layers for [-1, 1] images (ImageNet normalisation)."""

    def __init__(self, features: torch.nn.Sequential, layers: tuple[str, ...]):
        super().__init__()
        unknown = [name for name in layers if name not in VGG19_CONV]
        if unknown:
            raise ValueError(f"unknown VGG-19 layer(s) {unknown}; valid: {', '.join(VGG19_CONV)}")
        self.layers = tuple(layers)
        self.taps = {VGG19_CONV[name] + 1: name for name in layers}  # the ReLU after each conv
        last = max(self.taps)
        self.features = features[: last + 1]
        for module in self.features:
            if isinstance(module, torch.nn.ReLU):
                module.inplace = False  # tapped activations must not be overwritten
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = []
        for index, module in enumerate(self.features):
            h = module(h)
            if index in self.taps:
                out.append(h)
        return out


def load_vgg19(model_dir: Path) -> torch.nn.Sequential:
    """VGG-19 conv layers from torchvision's release file (the classifier weights are not needed)."""
    path = Path(model_dir) / VGG19_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ModelUnavailableError(f"cannot read VGG-19 weights {path}: {exc}") from None
    features = _vgg19_features()
    sub = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    features.load_state_dict(sub, strict=True)
    return features


def load_vgg_features(models, layers: tuple[str, ...], model_id: str = "vgg19-imagenet",
                      role: str = "style-features") -> VGGFeatures:
    _, path, _ = models.resolve(model_id, role)
    device = models.device
    return models.memo(("vgg19-features", str(path), tuple(layers), str(device)),
                       lambda: _freeze(VGGFeatures(load_vgg19(path), tuple(layers)), device))


def build_standin_vgg19(target: Path) -> None:
    """Random VGG-19 conv weights (torchvision's init) under torchvision's file name.

    Only the ``features.*`` tensors are written: cloak never reads the classifier (123 M parameters,
    ~490 MB), and the loader takes exactly the ``features.*`` keys from the real file too.
    """
    torch.manual_seed(STANDIN_SEED + 1)
    features = _vgg19_features()
    for module in features:
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, target / VGG19_FILE)
