"""The resamplings in gradient paths (cloak/adversarial/resample.py): torch's own forward everywhere, and on CUDA a
gradient computed as a gather with a fixed order instead of torch's atomic scatter. Forced on here (CPU), the
gather's gradient must equal torch's own; on a GPU, two backward passes must give the same bits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cloak.adversarial.resample import grid_sample, resize


def _grads(fn, x, weight):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * weight).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("shape,size,mode,antialias", [
    ((37, 29), (16, 16), "bicubic", True),   # shrink (DLADiff's face crop to an encoder's input)
    ((10, 12), (16, 16), "bicubic", True),   # enlarge
    ((40, 40), (17, 23), "bilinear", True),
    ((9, 31), (20, 8), "bilinear", False),
])
def test_resize_gather_gradient_is_torchs(shape, size, mode, antialias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *shape, generator=g)
    weight = torch.randn(2, 3, *size, generator=g)
    ref_out, ref_grad = _grads(lambda t: F.interpolate(t, size=size, mode=mode, align_corners=False,
                                                       antialias=antialias), x, weight)
    out, grad = _grads(lambda t: resize(t, size, mode, antialias, deterministic=True), x, weight)
    assert torch.equal(out, ref_out)  # the forward is torch's own op
    assert torch.allclose(grad, ref_grad, atol=1e-5, rtol=1e-5)
    assert not torch.equal(grad, torch.zeros_like(grad))


def _rotation_grid(h, w, out, angle, scale, shift):
    """A face-alignment-like grid: a rotated, scaled square partly outside the image (align_corners=True)."""
    v, u = torch.meshgrid(torch.arange(out, dtype=torch.float64), torch.arange(out, dtype=torch.float64),
                          indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    x = shift[0] + scale * (c * u - s * v)
    y = shift[1] + scale * (s * u + c * v)
    return torch.stack([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], -1)[None].float()


@pytest.mark.parametrize("angle,scale,shift", [(0.3, 1.7, (5.0, -3.0)),   # shrink, corner outside the image
                                               (-0.2, 0.4, (10.0, 12.0)),  # enlarge: input pixels read many times
                                               (0.0, 1.0, (0.0, 0.0))])    # integer taps
def test_grid_sample_gather_gradient_is_torchs(angle, scale, shift):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 30, 41, generator=g)
    grid = _rotation_grid(30, 41, 24, angle, scale, shift)
    weight = torch.randn(1, 3, 24, 24, generator=g)
    ref_out, ref_grad = _grads(lambda t: F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros",
                                                       align_corners=True), x, weight)
    out, grad = _grads(lambda t: grid_sample(t, grid, deterministic=True), x, weight)
    assert torch.equal(out, ref_out)
    assert torch.allclose(grad, ref_grad, atol=1e-5, rtol=1e-5)
    assert not torch.equal(grad, torch.zeros_like(grad))


def test_cpu_keeps_torchs_own_backward():
    """On the CPU nothing changes: the graph holds torch's own backward nodes (the pinned CPU digests stay)."""
    x = torch.randn(1, 3, 20, 20, requires_grad=True)
    grid = _rotation_grid(20, 20, 8, 0.1, 1.0, (2.0, 2.0))
    assert type(resize(x, (8, 8)).grad_fn).__name__ == type(F.interpolate(
        x, size=(8, 8), mode="bicubic", align_corners=False, antialias=True).grad_fn).__name__
    assert type(grid_sample(x, grid).grad_fn).__name__ == type(F.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=True).grad_fn).__name__
    assert type(resize(x, (8, 8), deterministic=True).grad_fn).__name__ == "_FixedLinearBackward"


@pytest.mark.gpu
def test_cuda_gradients_repeat_to_the_bit():
    """torch's CUDA backward of both ops scatters with atomic adds (DLADiff's bytes differed between two runs of
    one seed on an H200); the gathers repeat to the bit."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 3, 300, 260, device="cuda", generator=g)
    grid = _rotation_grid(300, 260, 112, 0.25, 1.9, (40.0, 30.0)).cuda()
    weight = torch.randn(1, 3, 112, 112, device="cuda", generator=g)
    runs = [(_grads(lambda t: resize(t, (112, 112)), x, weight)[1],
             _grads(lambda t: grid_sample(t, grid), x, weight)[1]) for _ in range(5)]
    for later in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], later))
