"""Identity metrics: FDFR, ISM (score.md §1–2) and idmatch (a same-person verdict), with two backends.

* ``retinaface`` (default): RetinaFace-R50 + ArcFace IR-SE50 (512-d), torch, weights from the cache.
* ``dlib``: dlib's HOG (or CNN) detector + its 128-d face-recognition ResNet, weights from the
  ``face-recognition-models`` package (installs offline: CI without a hub or GPU still gets real
  identity scores).

The papers compute these with deepface (TensorFlow); absolute numbers differ between backends and
from published tables — the report names the backend, and one table should never mix backends.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    implements = ("cosine of the largest face's identity embedding to the mean of the reference faces' raw "
                  "(un-normalised) embeddings, as the spec and the Anti-DreamBooth code; no face → 0 (ISM_all0, "
                  "the value); ism_det = mean over images with a face. Backend retinaface = ArcFace IR-SE50 512-d "
                  "(its output is unit length, so raw = normalised), dlib = dlib ResNet 128-d (raw descriptors)")
    notes = ("ISM is a cosine on each network's own scale: gate thresholds such as 'ism>0.35' are on ArcFace's "
             "(retinaface backend). dlib's descriptors put different people at cosine 0.71–0.93, so such a gate "
             "fails for any face under ism.backend=dlib; use idmatch (each backend's own same-person threshold) "
             "for a verdict that does not depend on the backend.")
    proposals = BACKEND_PROPOSALS
    lower_better = True  # lower identity similarity = stronger protection
    range = (-1.0, 1.0)
    mode = "SET"
    needs_ref = True
    Options = FaceBackendOptions

    def compute(self, images: list[ScoreImage], ref: list[ScoreImage] | None) -> MetricResult:
        analyzer = face_analyzer(self)
        ref_embeddings = reference_embeddings(analyzer, ref, "ism")
        mean = raw_mean(ref_embeddings)
        values: list[float | None] = []
        detected = []
        with self.ctx.progress.task("ism", len(images)) as bar:
            for img in images:
                e = analyzer.embed_largest(img.rgb, normalize=False)
                if e is None:
                    values.append(0.0)
                else:
                    values.append(cosine(e, mean / (np.linalg.norm(mean) + 1e-12)))
                    detected.append(values[-1])
                bar.advance(1)
        return MetricResult(values, extras={
            "backend": analyzer.backend, "ism_det": float(np.mean(detected)) if detected else None,
            "faces_in_reference": len(ref_embeddings), "faces_detected": len(detected),
            "reference": "mean of raw embeddings"})


def reference_embeddings(analyzer, ref: list[ScoreImage] | None, metric: str) -> list[np.ndarray]:
    """Raw embeddings of the largest face of each reference image (images without a face are skipped)."""
    from cloak.errors import InputError

    found = [e for e in (analyzer.embed_largest(r.rgb, normalize=False) for r in ref or []) if e is not None]
    if not found:
        raise InputError(f"{metric}: no face found in any reference image; the identity reference is undefined")
    return found


def raw_mean(embeddings: list[np.ndarray]) -> np.ndarray:
    """score.md §2: the mean of the raw embeddings (not of unit vectors; not renormalised)."""
    return np.mean(np.asarray(embeddings, dtype=np.float64), axis=0)


@dataclass(frozen=True)
class SamePersonRule:
    """A backend's own published same-person decision (a verification threshold) and where it comes from."""

    distance: str  # "euclidean" or "squared_euclidean", on the embeddings named by ``embedding``
    threshold: float  # same person when distance < threshold
    embedding: str
    reference: str  # "pairwise": a verdict per reference face, majority vote; "template": vs the raw mean
    source: str

    def measure(self, e: np.ndarray, refs: list[np.ndarray]) -> tuple[bool, float]:
        """(accepted, the distance the verdict read): the template's distance, or the median pairwise one."""
        def dist(a, b) -> float:
            d = float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
            return d * d if self.distance == "squared_euclidean" else d

        if self.reference == "template":
            d = dist(e, raw_mean(refs))
            return d < self.threshold, d
        ds = [dist(e, r) for r in refs]
        accepted = sum(d < self.threshold for d in ds) * 2 > len(ds)  # more than half of the reference faces
        return accepted, float(np.median(ds))


# Each backend's own published same-person threshold, on the embeddings the backend's authors use it with.
SAME_PERSON: dict[str, SamePersonRule] = {
    # dlib documents a Euclidean distance < 0.6 between two raw 128-d descriptors as "same person" (99.38 % on
    # LFW): dlib examples/dnn_face_recognition_ex.cpp and python_examples/face_recognition.py; face_recognition's
    # compare_faces(tolerance=0.6) and deepface's "Dlib" euclidean threshold use the same 0.6. The threshold is
    # pairwise, so each reference face gives a verdict and the majority decides [PROP].
    "dlib": SamePersonRule("euclidean", 0.6, "raw 128-d descriptor (dlib compute_face_descriptor)", "pairwise",
                           "dlib examples/dnn_face_recognition_ex.cpp, python_examples/face_recognition.py: "
                           "Euclidean distance < 0.6 = same person (99.38 % on LFW)"),
    # The IR-SE50 weights (facexlib's recognition_arcface_ir_se50.pth) are TreB1eN/InsightFace_Pytorch's model.
    # Its verifier (face_verify.py: --threshold default 1.54; Learner.infer) compares a face with a person's
    # facebank entry, the mean of that person's embeddings (utils.prepare_facebank), by the *squared* Euclidean
    # distance of the network's unit-length outputs, and accepts below 1.54, i.e. cosine to the template above
    # ≈ 0.23. (Anti-DreamBooth's own evaluation uses deepface's ArcFace, another network, and no threshold;
    # deepface's verification threshold for that network is cosine distance 0.68, i.e. cosine > 0.32.)
    "retinaface": SamePersonRule("squared_euclidean", 1.54, "512-d ArcFace IR-SE50 output (unit length)",
                                 "template", "TreB1eN/InsightFace_Pytorch face_verify.py (--threshold 1.54, squared "
                                 "Euclidean distance to the mean facebank embedding, Learner.infer)"),
}


class IdMatchOptions(FaceBackendOptions):
    threshold: float | None = Field(None, gt=0, description="same-person distance threshold; none = the backend's "
                                    "published one (dlib: Euclidean 0.6; retinaface: squared Euclidean 1.54)")


class IdMatch(Metric):
    paper = ("backend-neutral identity verdict: each backend's published same-person threshold (dlib: "
             "dnn_face_recognition_ex.cpp; ArcFace IR-SE50: TreB1eN/InsightFace_Pytorch face_verify.py)")
    implements = ("per generated image 1 when its largest face is verified as the reference subject by the "
                  "backend's own same-person rule, else 0 (no face → 0); the value is the fraction accepted. "
                  "dlib: raw-descriptor Euclidean distance < 0.6 to more than half of the reference faces; "
                  "retinaface: squared Euclidean distance < 1.54 to the mean reference embedding (the verifier "
                  "of the weights' authors). idmatch_det: the fraction among images with a face")
    notes = ("Unlike ism, a gate on idmatch means the same thing under every backend: e.g. --fail-if 'idmatch>0.5' "
             "fails when more than half of the generations are recognised as the subject. A backend without a "
             "published threshold gets no idmatch. [PROP] dlib publishes a pairwise threshold: cloak asks it of "
             "every reference face and lets the majority decide (one reference image: the plain pairwise rule).")
    proposals = BACKEND_PROPOSALS
    lower_better = True  # fewer generations recognised as the subject = stronger protection
    range = (0.0, 1.0)
    mode = "SET"
    needs_ref = True
    Options = IdMatchOptions

    def compute(self, images: list[ScoreImage], ref: list[ScoreImage] | None) -> MetricResult:
        import dataclasses

        from cloak.errors import UsageError

        if self.opts.backend not in SAME_PERSON:
            raise UsageError(f"idmatch: no published same-person threshold for backend {self.opts.backend!r}; "
                             f"backends with one: {', '.join(SAME_PERSON)}")
        rule = SAME_PERSON[self.opts.backend]
        if self.opts.threshold is not None:
            rule = dataclasses.replace(rule, threshold=self.opts.threshold, source="-o threshold (not the backend's "
                                       "published threshold)")
        analyzer = face_analyzer(self)
        refs = reference_embeddings(analyzer, ref, "idmatch")
        values: list[float | None] = []
        distances: list[float | None] = []
        with self.ctx.progress.task("idmatch", len(images)) as bar:
            for img in images:
                e = analyzer.embed_largest(img.rgb, normalize=False)
                if e is None:
                    values.append(0.0)
                    distances.append(None)
                else:
                    accepted, d = rule.measure(e, refs)
                    values.append(1.0 if accepted else 0.0)
                    distances.append(d)
                bar.advance(1)
        detected = [v for v, d in zip(values, distances) if d is not None]
        return MetricResult(values, extras={
            "backend": analyzer.backend, "threshold": rule.threshold, "distance": rule.distance,
            "embedding": rule.embedding, "reference": rule.reference, "threshold_source": rule.source,
            "idmatch_det": float(np.mean(detected)) if detected else None, "faces_detected": len(detected),
            "faces_in_reference": len(refs), "distances": distances})
