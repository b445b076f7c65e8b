"""IMS — DiffShortcut's identity matching score (score.md §7): ``IMS = w_ip·IMS_IP + w_vgg·IMS_VGG``.

* ``IMS_IP`` (paper: insightface antelopev2, code unreleased) [PROP]: ℓ2-normalised embedding of the
  largest face, cosine to the mean normalised embedding of the reference set; no face → 0.
* ``IMS_VGG`` (code: deepface ``find`` with VGG-Face, cosine distance, ``enforce_detection=False``):
  the distance to every reference image (whole image when no face is found, on either side), only
  references under the model's match threshold count; ``1 − mean distance``, and −1 when nothing
  matches (the code's distance 2).

Neither antelopev2 (onnx) nor VGG-Face (TensorFlow) is available to cloak, so both terms run on cloak's
face backends — by default ArcFace IR-SE50 for IMS_IP and dlib's ResNet for IMS_VGG (two independent
identity networks, as in the paper). The report names both backends; values are not comparable with
DiffShortcut's tables.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from cloak.methods import MethodOptions
from cloak.score.base import Metric, MetricResult, ScoreImage
from cloak.score.faces import Backend, FaceBackendOptions, cosine, embed_whole, face_analyzer, mean_direction

# deepface's cosine-distance verification thresholds for these networks (VGG-Face's own is 0.68).
MATCH_THRESHOLD = {"dlib": 0.07, "retinaface": 0.68}


class ImsOptions(MethodOptions):
    w_ip: float = Field(0.7, ge=0, description="weight of IMS_IP")
    w_vgg: float = Field(0.3, ge=0, description="weight of IMS_VGG")
    ip_backend: Backend = Field("retinaface", description="identity network for IMS_IP (paper: antelopev2)")
    vgg_backend: Backend = Field("dlib", description="identity network for IMS_VGG (paper: deepface VGG-Face)")
    vgg_threshold: float | None = Field(None, gt=0, le=2, description="cosine distance under which a reference "
                                        "matches; default: deepface's threshold for the backend's network "
                                        "(dlib 0.07, ArcFace 0.68)")
    conf_threshold: float = Field(0.8, gt=0, lt=1, description="RetinaFace confidence threshold")
    dlib_detector: Literal["hog", "cnn"] = Field("hog", description="dlib detector")
    dlib_upsample: int = Field(1, ge=0, le=3, description="dlib: upsampling before detection")


class Ims(Metric):
    paper = "DiffShortcut §5.1, A.2 (get_score_tempalte.py); MetaCloak eval_score.py IMS_get_score"
    implements = ("w_ip·IMS_IP + w_vgg·IMS_VGG: IMS_IP = cosine of the largest face to the mean reference embedding "
                  "(no face → 0); IMS_VGG = 1 − mean cosine distance to the matching reference images "
                  "(whole image when no face; no match → −1); both on cloak's face backends")
    proposals = ("ip_backend", "vgg_backend", "vgg_threshold", "dlib_detector", "dlib_upsample")
    lower_better = True  # lower identity similarity = stronger protection
    range = (-1.0, 1.0)
    mode = "SET"
    needs_ref = True
    Options = ImsOptions

    def _analyzer(self, backend: str, role: str):
        o = self.opts
        sub = FaceBackendOptions(backend=backend, conf_threshold=o.conf_threshold, dlib_detector=o.dlib_detector,
                                 dlib_upsample=o.dlib_upsample)
        return face_analyzer(self, sub, role)

    def compute(self, images: list[ScoreImage], ref: list[ScoreImage] | None) -> MetricResult:
        from cloak.errors import InputError

        o = self.opts
        ip = self._analyzer(o.ip_backend, "ims-ip")
        vgg = self._analyzer(o.vgg_backend, "ims-vgg")
        threshold = o.vgg_threshold if o.vgg_threshold is not None else MATCH_THRESHOLD[o.vgg_backend]
        ref = ref or []
        ip_ref = [e for e in (ip.embed_largest(r.rgb) for r in ref) if e is not None]
        if not ip_ref:
            raise InputError("ims: no face found in any reference image; IMS_IP is undefined")
        ip_mean = mean_direction(ip_ref)
        vgg_ref = np.stack([self._face_or_whole(vgg, r.rgb) for r in ref])
        values, ip_values, vgg_values = [], [], []
        with self.ctx.progress.task("ims", len(images)) as bar:
            for img in images:
                e = ip.embed_largest(img.rgb)
                ip_values.append(0.0 if e is None else cosine(e, ip_mean))
                v = self._face_or_whole(vgg, img.rgb)
                distances = 1.0 - vgg_ref @ v / (np.linalg.norm(vgg_ref, axis=1) * np.linalg.norm(v) + 1e-12)
                matched = distances[distances <= threshold]
                vgg_values.append(float(1.0 - (matched.mean() if matched.size else 2.0)))
                values.append(o.w_ip * ip_values[-1] + o.w_vgg * vgg_values[-1])
                bar.advance(1)
        return MetricResult(values, extras={
            "ims_ip": float(np.mean(ip_values)), "ims_vgg": float(np.mean(vgg_values)),
            "ip_backend": ip.backend, "vgg_backend": vgg.backend, "vgg_threshold": threshold,
            "faces_in_reference": len(ip_ref)})

    @staticmethod
    def _face_or_whole(analyzer, rgb: np.ndarray) -> np.ndarray:
        e = analyzer.embed_largest(rgb)
        return e if e is not None else embed_whole(analyzer, rgb)
