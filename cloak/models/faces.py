"""Face detection (RetinaFace-R50) and identity embeddings (ArcFace IR-SE50).

Architectures come from facexlib; weights are read from the cache (``retinaface-r50``,
``arcface-irse50``) with ``torch.load(weights_only=True)``, never through facexlib's own downloader.
The stand-ins (``tiny-retinaface``, ``tiny-arcface``) are the same architectures with seeded random
weights, saved to the same file names so they go through the same loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RETINAFACE_FILE = "detection_Resnet50_Final.pth"
ARCFACE_FILE = "recognition_arcface_ir_se50.pth"
STANDIN_SEED = 7


def _retinaface_arch(device: str | torch.device = "cpu"):
    import warnings

    from facexlib.detection.retinaface import RetinaFace

    with warnings.catch_warnings():  # torchvision's "pretrained" deprecation; nothing is downloaded
        warnings.simplefilter("ignore")
        return RetinaFace(network_name="resnet50", half=False, device=torch.device(device))


def _arcface_arch():
    from facexlib.recognition.arcface_arch import Backbone

    return Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")


def _load_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    # Checkpoints saved from DataParallel carry a "module." prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_standin_retinaface(target: Path) -> None:
    torch.manual_seed(STANDIN_SEED)
    target.mkdir(parents=True, exist_ok=True)
    torch.save(_retinaface_arch().state_dict(), target / RETINAFACE_FILE)


def build_standin_arcface(target: Path) -> None:
    torch.manual_seed(STANDIN_SEED + 1)
    target.mkdir(parents=True, exist_ok=True)
    torch.save(_arcface_arch().state_dict(), target / ARCFACE_FILE)


def load_retinaface(model_dir: Path, device: str = "cpu"):
    net = _retinaface_arch(device)
    net.load_state_dict(_load_state(Path(model_dir) / RETINAFACE_FILE), strict=True)
    return net.to(device).eval()


def load_arcface(model_dir: Path, device: str = "cpu"):
    net = _arcface_arch()
    net.load_state_dict(_load_state(Path(model_dir) / ARCFACE_FILE), strict=True)
    return net.to(device).eval()


@dataclass
class Face:
    box: np.ndarray  # x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # 5×2 (eyes, nose, mouth corners)

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


class FaceAnalyzer:
    """RetinaFace detection + 5-point alignment to 112² + ArcFace embedding."""

    backend = "retinaface-arcface"

    def __init__(self, detector, embedder, device: str = "cpu", conf_threshold: float = 0.8):
        self.detector = detector
        self.embedder = embedder
        self.device = device
        self.conf_threshold = conf_threshold

    @torch.no_grad()
    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 H×W×3 image, largest first."""
        if self.detector is None:
            raise RuntimeError("this analyzer was built without a detector")
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        found = self.detector.detect_faces(bgr, conf_threshold=self.conf_threshold)
        faces = [Face(row[:4].copy(), float(row[4]), row[5:15].reshape(5, 2).copy()) for row in found]
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def align(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        from facexlib.detection.align_trans import get_reference_facial_points, warp_and_crop_face

        reference = get_reference_facial_points(default_square=True)
        return warp_and_crop_face(rgb, face.landmarks, reference, crop_size=(112, 112))

    @torch.no_grad()
    def embed_aligned(self, faces_112: list[np.ndarray], normalize: bool = True) -> np.ndarray:
        """ArcFace embeddings (N×512, ℓ2-normalised unless ``normalize=False``) of aligned 112² RGB crops.

        facexlib's IR-SE50 ends in its own ℓ2 normalisation, so its raw output is already (nearly) unit length."""
        if not faces_112:
            return np.zeros((0, 512), dtype=np.float32)
        # contiguous NCHW: facexlib's Flatten uses .view, which fails on channels-last strides
        batch = torch.from_numpy(np.stack(faces_112)).permute(0, 3, 1, 2).contiguous().float().div(127.5).sub(1.0)
        out = self.embedder(batch.to(self.device)).float()
        return (F.normalize(out, dim=1) if normalize else out).cpu().numpy()

    def embed_largest(self, rgb: np.ndarray, normalize: bool = True) -> np.ndarray | None:
        faces = self.detect(rgb)
        if not faces:
            return None
        return self.embed_aligned([self.align(rgb, faces[0])], normalize)[0]
