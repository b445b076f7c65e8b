"""Classic no-reference quality: BRISQUE and NIQE (score.md §4; NIQE as pyiqa lists it), from packaged or
cached model files (the algorithms in cloak.score.brisque and cloak.score.niqe)."""

from __future__ import annotations

from pydantic import Field

from cloak.methods import MethodOptions
from cloak.score.base import Metric, MetricResult, ScoreImage


class Brisque(Metric):
    paper = "Mittal et al. 2012; Anti-DreamBooth evaluations/brisques.py and APDM (PyPI brisque)"
    implements = ("BRISQUE exactly as the PyPI brisque package scores the full image (36 MSCN/AGGD features at two "
                  "scales, its RBF ε-SVR), evaluated in numpy from the package's model files")
    notes = ("Nominally 0–100, but the SVR's output is unbounded (declared range: none). MetaCloak's "
             "piq.BRISQUELoss at 256² is a different model and not offered.")
    lower_better = True  # higher = more distorted = stronger protection
    range = (None, None)
    mode = "NR"

    def compute(self, images: list[ScoreImage], ref) -> MetricResult:
        from cloak.score import brisque

        models = self.ctx.models
        path = models.packaged("brisque-svm", "brisque")
        model = models.memo(("brisque", str(path)), lambda: brisque.load_model(path))
        values = []
        with self.ctx.progress.task("brisque", len(images)) as bar:
            for img in images:
                values.append(brisque.score(img.rgb, model))
                bar.advance(1)
        extras = {}
        if len(values) >= 10:  # APDM also prints the mean of the ten highest scores
            extras["top10_mean"] = float(sum(sorted(values)[-10:]) / 10)
        return MetricResult(values, extras=extras)


class NiqeOptions(MethodOptions):
    block: int = Field(96, ge=16, json_schema_extra={"unit": "px"}, description="block size (the release's 96)")


class Niqe(Metric):
    paper = "Mittal, Soundararajan & Bovik, NIQE, IEEE SPL 2013 (MATLAB niqe_release)"
    implements = ("NIQE as the authors' computequality.m: 96² blocks, MSCN AGGD features at two scales, MVG distance "
                  "to the pristine model niqe_modelparameters.mat; images under two blocks → undefined")
    lower_better = True
    range = (0.0, None)
    mode = "NR"
    Options = NiqeOptions

    def compute(self, images: list[ScoreImage], ref) -> MetricResult:
        from cloak.score import niqe

        models = self.ctx.models
        _, path, _ = models.resolve("niqe-pristine", "niqe")
        mu, cov = models.memo(("niqe", str(path)), lambda: niqe.load_params(path))
        values = []
        with self.ctx.progress.task("niqe", len(images)) as bar:
            for img in images:
                values.append(niqe.niqe(img.rgb, mu, cov, self.opts.block))
                bar.advance(1)
        small = sum(v is None for v in values)
        return MetricResult(values, extras={"too_small": small} if small else {})
