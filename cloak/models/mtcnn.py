"""MTCNN face detector (P/R/O-Net) with the weights that ship in ``facenet-pytorch`` (catalog ``facenet-mtcnn``).

The networks and the cascade come from facenet-pytorch; the weights are loaded here with
``torch.load(weights_only=True)`` from the resolved directory (the package's ``data/`` or a
``[models]`` override) rather than by the networks' own constructors. facenet-pytorch's metadata pins
an old torch, so it is installed with ``--no-deps`` (see the Makefile); importing it pulls nothing in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cloak.errors import ModelUnavailableError

MODEL_ID = "facenet-mtcnn"
FILES = {"pnet": "pnet.pt", "rnet": "rnet.pt", "onet": "onet.pt"}


def _nets():
    try:
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
    except ImportError:
        raise ModelUnavailableError("MTCNN needs facenet-pytorch",
                                    hint="pip install --no-deps 'facenet-pytorch>=2.5' (its metadata pins an old "
                                         "torch; --no-deps keeps yours)") from None
    return {"pnet": PNet, "rnet": RNet, "onet": ONet}


@dataclass
class MtcnnFace:
    box: np.ndarray  # x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # 5×2: eyes, nose, mouth corners (x, y)


class Mtcnn:
    """The three-stage cascade; ``detect`` returns faces in the cascade's order (highest score first)."""

    def __init__(self, model_dir: Path, device: str = "cpu", min_face: int = 50,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8), factor: float = 0.709):
        self.nets = {}
        for name, cls in _nets().items():
            net = cls(pretrained=False)
            state = torch.load(Path(model_dir) / FILES[name], map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
            self.nets[name] = net.to(device).eval()
        self.device = torch.device(device)
        self.min_face, self.thresholds, self.factor = min_face, list(thresholds), factor

    @torch.no_grad()
    def detect(self, rgb: np.ndarray) -> list[MtcnnFace]:
        from facenet_pytorch.models.utils.detect_face import detect_face

        boxes, points = detect_face(np.ascontiguousarray(rgb), self.min_face, self.nets["pnet"], self.nets["rnet"],
                                    self.nets["onet"], self.thresholds, self.factor, self.device)
        boxes, points = boxes[0], points[0]
        return [MtcnnFace(np.asarray(b[:4], dtype=np.float32), float(b[4]), np.asarray(p, dtype=np.float32))
                for b, p in zip(boxes, points)]
