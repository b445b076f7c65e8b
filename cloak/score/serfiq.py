"""SER-FIQ face image quality (score.md §3; Terhörst et al., CVPR 2020), on the ArcFace IR-SE50 dropout head.

The released SER-FIQ code runs the insightface network once up to its ``dropout0`` input (the
batch-normalised 512×7×7 feature map), then T=100 times a stochastic head — Dropout(0.5) → the
network's own fc1 weights → an untrained BatchNorm (identity) → ℓ2 norm — and scores the spread of the
T embeddings. cloak does the same on the IR-SE50 ArcFace that its identity metrics use: body and
``output_layer[0]`` (BatchNorm2d) once, then dropout masks drawn from the run's generator and the
``Linear`` layer, batched over T. Faces: MTCNN (min face 50 px, thresholds 0.6/0.7/0.8) from
facenet-pytorch, first detection, 5-point similarity alignment to 112² (insightface's reference points).

Not the same network as the paper's mxnet LResNet100E-IR, so absolute values — and the calibration
α=130, r=0.88 that maps the raw score to [0, 1] — are not directly comparable with published tables.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from cloak.methods import MethodOptions
from cloak.score.base import Metric, MetricResult, ScoreImage


class SerFiqOptions(MethodOptions):
    passes: int = Field(100, ge=2, description="stochastic forward passes T")
    dropout: float = Field(0.5, gt=0, lt=1, description="dropout rate of the stochastic head (SER-FIQ code: 0.5)")
    alpha: float = Field(130.0, gt=0, description="sigmoid slope of the reported score q")
    r: float = Field(0.88, description="sigmoid centre of the reported score q")
    min_face: int = Field(50, ge=12, json_schema_extra={"unit": "px"}, description="MTCNN smallest face")
    thresholds: tuple[float, float, float] = Field((0.6, 0.7, 0.8), description="MTCNN P/R/O-Net thresholds "
                                                   "(-o serfiq.thresholds=0.6,0.7,0.8)")

    @field_validator("thresholds", mode="before")
    @classmethod
    def _comma_list(cls, v):
        return tuple(x.strip() for x in v.split(",")) if isinstance(v, str) else v


class SerFiq(Metric):
    paper = "Terhörst et al., SER-FIQ, CVPR 2020; Anti-DreamBooth evaluations/ser_fiq.py"
    implements = ("SER-FIQ on ArcFace IR-SE50: MTCNN (facenet-pytorch weights) + 112² alignment, T dropout passes "
                  "of the embedding head, s = 2/(1+exp(mean pairwise distance)), q = sigmoid(α(s−r)); mean over "
                  "images with a face (no face → undefined)")
    notes = ("The paper's network is insightface's mxnet LResNet100E-IR; cloak uses IR-SE50 (facexlib), so the "
             "α/r calibration is inherited, not re-fitted. The raw score s is in extras. MTCNN gets RGB: "
             "facenet-pytorch's weights (from the TensorFlow MTCNN) expect RGB, where SER-FIQ's mxnet MTCNN took BGR.")
    lower_better = False  # higher face quality = weaker protection
    range = (0.0, 1.0)
    mode = "NR"
    Options = SerFiqOptions
    tiny_options = {"passes": 4}

    def _mtcnn(self):
        from cloak.models.mtcnn import MODEL_ID, Mtcnn

        models = self.ctx.models
        path = models.packaged(MODEL_ID, "serfiq-detector")
        key = ("mtcnn", str(path), str(models.device), self.opts.min_face, tuple(self.opts.thresholds))
        return models.memo(key, lambda: Mtcnn(path, str(models.device), self.opts.min_face,
                                              tuple(self.opts.thresholds)))

    def _arcface(self):
        """ArcFace alone (alignment + network; MTCNN replaces RetinaFace here, which is not loaded)."""
        from cloak.models import faces

        models = self.ctx.models
        _, path, _ = models.resolve("arcface-irse50", "serfiq-embedder")
        device = str(models.device)
        return models.memo(("serfiq-arcface", str(path), device),
                           lambda: faces.FaceAnalyzer(None, faces.load_arcface(path, device), device))

    def compute(self, images: list[ScoreImage], ref) -> MetricResult:
        detector = self._mtcnn()
        analyzer = self._arcface()
        net = analyzer.embedder
        head = list(net.output_layer)
        if not (isinstance(head[0], torch.nn.BatchNorm2d) and isinstance(head[3], torch.nn.Linear)):
            raise RuntimeError("SER-FIQ expects the IR-SE50 output layer BatchNorm2d → Dropout → Flatten → Linear")
        values: list[float | None] = []
        raw: list[float | None] = []
        with self.ctx.progress.task("serfiq", len(images)) as bar:
            for img in images:
                faces = detector.detect(img.rgb)
                if not faces:
                    values.append(None)
                    raw.append(None)
                else:
                    s = self._raw_score(net, head, analyzer.align(img.rgb, faces[0]))
                    raw.append(s)
                    values.append(float(1.0 / (1.0 + np.exp(-self.opts.alpha * (s - self.opts.r)))))
                bar.advance(1)
        found = [s for s in raw if s is not None]
        return MetricResult(values, extras={
            "backend": "mtcnn+arcface-irse50", "faces_detected": len(found),
            "serfiq_raw_mean": float(np.mean(found)) if found else None})

    @torch.no_grad()
    def _raw_score(self, net, head, face_112: np.ndarray) -> float:
        device = next(net.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(face_112)).permute(2, 0, 1).unsqueeze(0).float()
        x = x.div(127.5).sub(1.0).to(device)
        features = head[0](net.body(net.input_layer(x))).flatten(1)  # the dropout's input, 1×25088
        p, t = self.opts.dropout, self.opts.passes
        keep = torch.rand((t, features.shape[1]), generator=self.ctx.generator) >= p
        dropped = features * keep.to(device=device, dtype=features.dtype) / (1.0 - p)
        # The released head ends in an untrained BatchNorm (identity), so the trained BatchNorm1d is skipped.
        emb = F.normalize(head[3](dropped).float(), dim=1)
        mean_dist = torch.pdist(emb).mean().item()
        return float(2.0 / (1.0 + np.exp(mean_dist)))
