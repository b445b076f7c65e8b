"""LPIPS (Zhang et al., CVPR 2018) built from the ``lpips`` package without letting it download anything.

The package ships its linear calibration layers (``weights/v0.1/{alex,vgg}.pth``); the backbones are the
torchvision ImageNet releases, which cloak keeps in its cache as ``alexnet-imagenet`` / ``vgg16-imagenet``.
The network is constructed with the pretrained backbone disabled (``pnet_rand=True``), the linear layers are
read from the package with ``weights_only=True`` and the backbone's ``features.*`` tensors from the cached
file. The stand-ins (``tiny-alexnet-imagenet``, ``tiny-vgg16-imagenet``) are seeded random ``features.*``
tensors of the same shapes under the same file names, so both go through :func:`load_lpips`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from cloak.errors import ModelUnavailableError

# LPIPS net name → (catalog id, file name of the torchvision release, torchvision constructor).
NETS = {
    "alex": ("alexnet-imagenet", "alexnet-owt-7be5be79.pth", "alexnet"),
    "vgg": ("vgg16-imagenet", "vgg16-397923af.pth", "vgg16"),
}
STANDIN_SEED = 11
# Smallest image side each backbone accepts (AlexNet's stride-4 stem and three 3×3/2 max-pools).
MIN_SIDE = {"alex": 32, "vgg": 16}


def _features(constructor: str) -> torch.nn.Module:
    """torchvision's ``features`` block with fresh default-initialised weights.

    The whole network is made on the meta device first: initialising the unused classifier (120M
    parameters for VGG-16) would cost seconds on a CPU.
    """
    import torchvision

    with torch.device("meta"):
        features = getattr(torchvision.models, constructor)(weights=None).features
    features = features.to_empty(device="cpu")
    for module in features.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return features


def _build_standin(net: str, target: Path) -> None:
    """Seeded random backbone ``features.*`` tensors (only those: LPIPS uses no classifier)."""
    _, filename, constructor = NETS[net]
    torch.manual_seed(STANDIN_SEED)
    features = _features(constructor)
    target.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, target / filename)


def build_standin_alexnet(target: Path) -> None:
    _build_standin("alex", Path(target))


def build_standin_vgg16(target: Path) -> None:
    _build_standin("vgg", Path(target))


def _linear_layers(net: str) -> dict[str, torch.Tensor]:
    import lpips

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ModelUnavailableError(f"cannot read the LPIPS linear layers shipped with the lpips package ({path}): "
                                    f"{exc}", hint="reinstall the `lpips` package") from None


def load_lpips(model_dir: Path, net: str = "alex", device: str | torch.device = "cpu") -> torch.nn.Module:
    """LPIPS ``net`` with the backbone from ``model_dir`` (a torchvision release file or its stand-in).

    The returned module maps two B×3×H×W images in [-1, 1] to B×1×1×1 distances; weights are frozen.
    """
    import lpips

    if net not in NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; valid: {', '.join(NETS)}")
    _, filename, _ = NETS[net]
    path = Path(model_dir) / filename
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ModelUnavailableError(f"cannot read LPIPS backbone weights {path}: {exc}",
                                    hint=f"cloak models pull {NETS[net][0]}") from None
    with warnings.catch_warnings(), torch.device("meta"):
        # Meta device: every tensor is replaced below, so skip the random init of the whole torchvision
        # network (classifier included). `pretrained=` deprecation warnings only; nothing downloads.
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    model.scaling_layer = lpips.lpips.ScalingLayer()  # its constant buffers, made for real
    # The linear layers: strict over the lin* keys (the file holds nothing else).
    lins = _linear_layers(net)
    own = model.state_dict()
    missing = [k for k in own if k.startswith("lin") and not k.startswith("lins.") and k not in lins]
    if missing or any(k not in own for k in lins):
        raise ModelUnavailableError(f"the lpips package's {net} linear layers do not match its network: {missing}")
    model.load_state_dict(lins, strict=False, assign=True)
    # The backbone: lpips splits torchvision's `features` Sequential into slices that keep the layer indices
    # as module names (slice2.3 is features.3), so each tensor maps back by index.
    backbone = {}
    for name in own:
        if not name.startswith("net.slice"):
            continue
        _, _, index, param = name.split(".")
        key = f"features.{index}.{param}"
        if key not in state:
            raise ModelUnavailableError(f"{path} is not a torchvision {net} checkpoint (no {key})",
                                        hint=f"cloak models pull {NETS[net][0]}")
        if state[key].shape != own[name].shape:
            raise ModelUnavailableError(f"{path}: {key} has shape {tuple(state[key].shape)}, "
                                        f"expected {tuple(own[name].shape)}")
        backbone[name] = state[key]
    model.load_state_dict(backbone, strict=False, assign=True)
    left = [name for name, t in model.state_dict().items() if t.is_meta]
    if left:
        raise ModelUnavailableError(f"LPIPS {net}: no weights for {left[:3]}")
    return model.to(device).eval().requires_grad_(False)


def lpips_model(models, net: str = "alex", role: str = "lpips") -> torch.nn.Module:
    """LPIPS through the ``Models`` handle (catalog id or its stand-in with --tiny), loaded once per run."""
    _, path, _ = models.resolve(NETS[net][0], role)
    return models.memo(("lpips", net, str(path), str(models.device)),
                       lambda: load_lpips(path, net, models.device))


def distance(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS (B,) of images in [-1, 1]; the graph is kept (IMPRESS differentiates through it)."""
    return model(a, b).flatten()
