"""Noisy Upscaling's noise stage (docs/spec-additions.md §U1; the purifier itself is not registered yet)."""

from __future__ import annotations

import torch


def test_noise_stage_is_clipped_8_bit_gaussian_in_01_units():
    from cloak.purify.noisy_upscale import add_gaussian_noise

    image = torch.zeros(1, 3, 64, 64)  # mid-gray: no clipping
    noisy = add_gaussian_noise(image, 0.1, torch.Generator().manual_seed(0))
    levels = (noisy + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # 8-bit values
    std01 = float(((noisy - image) / 2).std())
    assert abs(std01 - 0.1) < 0.005, std01  # σ in [0,1] units
    white = add_gaussian_noise(torch.ones(1, 3, 16, 16), 0.1, torch.Generator().manual_seed(0))
    assert float(white.max()) <= 1 and float(white.min()) < 1  # clipped at the top, noisy below
