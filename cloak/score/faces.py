"""Identity metrics: FDFR and ISM (score.md §1–2), on RetinaFace-R50 + ArcFace IR-SE50.

The papers compute these with deepface (TensorFlow); cloak uses the same detector family and an
ArcFace embedder in torch, so absolute numbers can differ from published tables — the report names
the backend, and tables should never mix backends.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from cloak.methods import MethodOptions
from cloak.score.base import Metric, MetricResult, ScoreImage


class _FaceOptions(MethodOptions):
    conf_threshold: float = Field(0.8, gt=0, lt=1, description="RetinaFace confidence threshold")


def _analyzer(metric: Metric):
    analyzer = metric.ctx.models.faces()
    analyzer.conf_threshold = metric.opts.conf_threshold
    return analyzer


class Fdfr(Metric):
    paper = "Anti-DreamBooth evaluations/ism_fdfr.py (RetinaFace via deepface)"
    implements = "fraction of images where RetinaFace finds no face (per image: 1 = no face)"
    lower_better = False  # higher = more generations without a face = stronger protection
    range = (0.0, 1.0)
    mode = "NR"
    Options = _FaceOptions

    def compute(self, images: list[ScoreImage], ref) -> MetricResult:
        analyzer = _analyzer(self)
        values = [0.0 if analyzer.detect(img.rgb) else 1.0 for img in images]
        return MetricResult(values, extras={"backend": analyzer.backend})


class Ism(Metric):
    paper = "Anti-DreamBooth evaluations/ism_fdfr.py; CAP §5 (no face → 0)"
    implements = ("cosine of the largest face's ArcFace embedding to the mean embedding of the reference faces; "
                  "no face → 0 (ISM_all0, the value); ism_det = mean over images with a face")
    lower_better = True  # lower identity similarity = stronger protection
    range = (-1.0, 1.0)
    mode = "SET"
    needs_ref = True
    Options = _FaceOptions

    def compute(self, images: list[ScoreImage], ref: list[ScoreImage] | None) -> MetricResult:
        from cloak.errors import InputError

        analyzer = _analyzer(self)
        ref_embeddings = [e for e in (analyzer.embed_largest(r.rgb) for r in ref or []) if e is not None]
        if not ref_embeddings:
            raise InputError("ism: no face found in any reference image; the identity reference is undefined")
        mean = np.mean(ref_embeddings, axis=0)
        mean = mean / (np.linalg.norm(mean) + 1e-12)
        values: list[float | None] = []
        detected = []
        for img in images:
            e = analyzer.embed_largest(img.rgb)
            if e is None:
                values.append(0.0)
            else:
                cos = float(np.dot(e, mean) / (np.linalg.norm(e) + 1e-12))
                values.append(cos)
                detected.append(cos)
        return MetricResult(values, extras={
            "backend": analyzer.backend, "ism_det": float(np.mean(detected)) if detected else None,
            "faces_in_reference": len(ref_embeddings), "faces_detected": len(detected)})
