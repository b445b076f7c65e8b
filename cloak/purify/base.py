"""The purify interface: one image (1×3×H×W in [-1,1], any size) in, one image of the same size out."""

from __future__ import annotations

from typing import ClassVar

import torch

from cloak.methods import Method


class PurifyMethod(Method):
    # Learned purifiers load their models once in prepare(); classic ones need nothing.
    def prepare(self) -> None:
        pass

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    uses_models: ClassVar[bool] = False
