"""Identity metrics: FDFR and ISM (score.md §1–2), with two backends.

* ``retinaface`` (default): RetinaFace-R50 + ArcFace IR-SE50 (512-d), torch, weights from the cache.
* ``dlib``: dlib's HOG (or CNN) detector + its 128-d face-recognition ResNet, weights from the
  ``face-recognition-models`` package (installs offline: CI without a hub or GPU still gets real
  identity scores).

The papers compute these with deepface (TensorFlow); absolute numbers differ between backends and
from published tables — the report names the backend, and one table should never mix backends.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from cloak.methods import MethodOptions
from cloak.score.base import Metric, MetricResult, ScoreImage

Backend = Literal["retinaface", "dlib"]


class FaceBackendOptions(MethodOptions):
    backend: Backend = Field("retinaface", description="face models: retinaface (RetinaFace + ArcFace, 512-d) or "
                                                       "dlib (HOG/CNN detector + 128-d ResNet; cloak[dlib])")
    conf_threshold: float = Field(0.8, gt=0, lt=1, description="RetinaFace confidence threshold (retinaface backend)")
    dlib_detector: Literal["hog", "cnn"] = Field("hog", description="dlib detector (dlib backend): hog is fast on "
                                                                    "CPU, cnn (MMOD) finds more faces")
    dlib_upsample: int = Field(1, ge=0, le=3, description="dlib: times to upsample the image before detection")


BACKEND_PROPOSALS = ("dlib_detector", "dlib_upsample")


def face_analyzer(metric: Metric, opts: FaceBackendOptions | None = None, role: str = "faces"):
    """The analyzer for the metric's ``backend`` option, loaded once per run (detect / embed_largest)."""
    opts = opts or metric.opts
    models = metric.ctx.models
    if opts.backend == "dlib":
        from cloak.models.dlib_faces import MODEL_ID, DlibFaceAnalyzer

        path = models.packaged(MODEL_ID, f"{role}-dlib")
        return models.memo(("dlib-faces", str(path), opts.dlib_detector, opts.dlib_upsample),
                           lambda: DlibFaceAnalyzer(path, opts.dlib_detector, opts.dlib_upsample))
    analyzer = models.faces(role)
    analyzer.conf_threshold = opts.conf_threshold
    return analyzer


def embed_whole(analyzer, rgb: np.ndarray) -> np.ndarray:
    """Identity embedding with the whole image as the face (deepface ``enforce_detection=False``)."""
    if hasattr(analyzer, "embed_whole"):
        return analyzer.embed_whole(rgb)
    from PIL import Image

    crop = np.asarray(Image.fromarray(rgb).resize((112, 112), Image.BICUBIC))
    return analyzer.embed_aligned([crop])[0]


def mean_direction(embeddings: list[np.ndarray]) -> np.ndarray:
    mean = np.mean(embeddings, axis=0)
    return mean / (np.linalg.norm(mean) + 1e-12)


def cosine(a: np.ndarray, unit_b: np.ndarray) -> float:
    return float(np.dot(a, unit_b) / (np.linalg.norm(a) + 1e-12))


class Fdfr(Metric):
    paper = "Anti-DreamBooth evaluations/ism_fdfr.py (RetinaFace via deepface)"
    implements = ("fraction of images where the backend's detector finds no face (per image: 1 = no face); "
                  "backend retinaface = RetinaFace-R50, dlib = dlib HOG/CNN")
    proposals = BACKEND_PROPOSALS
    lower_better = False  # higher = more generations without a face = stronger protection
    range = (0.0, 1.0)
    mode = "NR"
    Options = FaceBackendOptions

    def compute(self, images: list[ScoreImage], ref) -> MetricResult:
        analyzer = face_analyzer(self)
        values = []
        with self.ctx.progress.task("fdfr", len(images)) as bar:
            for img in images:
                values.append(0.0 if analyzer.detect(img.rgb) else 1.0)
                bar.advance(1)
        return MetricResult(values, extras={"backend": analyzer.backend,
                                            "fdr": 1.0 - float(np.mean(values)) if values else None})


class Ism(Metric):
    paper = "Anti-DreamBooth evaluations/ism_fdfr.py; CAP §5 (no face → 0)"
    implements = ("cosine of the largest face's identity embedding to the mean embedding of the reference faces; "
                  "no face → 0 (ISM_all0, the value); ism_det = mean over images with a face. Backend retinaface "
                  "= ArcFace IR-SE50 512-d, dlib = dlib ResNet 128-d")
    proposals = BACKEND_PROPOSALS
    lower_better = True  # lower identity similarity = stronger protection
    range = (-1.0, 1.0)
    mode = "SET"
    needs_ref = True
    Options = FaceBackendOptions

    def compute(self, images: list[ScoreImage], ref: list[ScoreImage] | None) -> MetricResult:
        from cloak.errors import InputError

        analyzer = face_analyzer(self)
        ref_embeddings = [e for e in (analyzer.embed_largest(r.rgb) for r in ref or []) if e is not None]
        if not ref_embeddings:
            raise InputError("ism: no face found in any reference image; the identity reference is undefined")
        mean = mean_direction(ref_embeddings)
        values: list[float | None] = []
        detected = []
        with self.ctx.progress.task("ism", len(images)) as bar:
            for img in images:
                e = analyzer.embed_largest(img.rgb)
                if e is None:
                    values.append(0.0)
                else:
                    values.append(cosine(e, mean))
                    detected.append(values[-1])
                bar.advance(1)
        return MetricResult(values, extras={
            "backend": analyzer.backend, "ism_det": float(np.mean(detected)) if detected else None,
            "faces_in_reference": len(ref_embeddings), "faces_detected": len(detected)})
