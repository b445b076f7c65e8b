"""LPIPS to the same-named reference (score.md §10: purification faithfulness), via cloak.models.lpips."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from cloak.methods import MethodOptions
from cloak.score.base import Metric, MetricResult, ScoreImage, pair_by_name
from cloak.score.fullref import SizeMismatch, _matched


class LpipsOptions(MethodOptions):
    net: Literal["alex", "vgg"] = Field("alex", description="LPIPS backbone (the papers do not state it)")


class Lpips(Metric):
    paper = "Zhang et al., LPIPS, CVPR 2018; DiffShortcut Table 2"
    implements = ("LPIPS v0.1 (lpips package's linear layers, torchvision backbone from the cache) between each "
                  "image and its same-named reference, both in [-1, 1]")
    proposals = ("net",)
    lower_better = True  # closer to the reference
    range = (0.0, None)
    mode = "FR"
    needs_ref = True
    Options = LpipsOptions

    @torch.no_grad()
    def compute(self, images: list[ScoreImage], ref: list[ScoreImage] | None) -> MetricResult:
        from cloak.models.lpips import MIN_SIDE, lpips_model

        model = lpips_model(self.ctx.models, self.opts.net, role="lpips")
        device = self.ctx.models.device
        pairs = pair_by_name(images, ref or [], self.name)
        values: list[float | None] = []
        errors: dict[int, str] = {}
        with self.ctx.progress.task("lpips", len(images)) as bar:
            for i, (img, r) in enumerate(zip(images, pairs)):
                try:
                    pair = None if r is None else _matched(img, r, self.ctx.extras.get("align", "none"))
                except SizeMismatch as exc:
                    pair, errors[i] = None, str(exc)
                if pair is None or min(img.rgb.shape[:2]) < MIN_SIDE[self.opts.net]:
                    values.append(None)
                else:
                    a, b = (torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1)[None].float().mul(2).sub(1)
                            for t in pair)
                    values.append(float(model(a.to(device), b.to(device)).flatten()[0]))
                bar.advance(1)
        unpaired = sum(r is None for r in pairs)
        return MetricResult(values, extras={"net": self.opts.net, **({"unpaired": unpaired} if unpaired else {})},
                            errors=errors)
