"""NIQE (Mittal, Soundararajan & Bovik 2013) as the authors' MATLAB release computes it (``computequality.m``).

Grey image (MATLAB ``rgb2gray``, rounded to 8 bits), cropped to whole 96×96 blocks; at two scales
(full, then MATLAB's antialiased bicubic ``imresize(·, 0.5)``) MSCN coefficients (7×7 Gaussian,
σ 7/6, replicate padding, C = 1), per block 18 AGGD features (grid search of the shape over
0.2:0.001:10, pairwise products with circular shifts inside the block); the blocks' multivariate
Gaussian is compared with the pristine model (``mu_prisparam``, ``cov_prisparam`` from
``niqe_modelparameters.mat``): ``sqrt(Δμ · pinv((Σ_p + Σ_d)/2) · Δμᵀ)``. Lower = more natural.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage, special

PARAMS_FILE = "niqe_modelparameters.mat"
_GAM = np.arange(0.2, 10.0 + 5e-4, 0.001)
_R_GAM = special.gamma(2 / _GAM) ** 2 / (special.gamma(1 / _GAM) * special.gamma(3 / _GAM))


def load_params(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    data = loadmat(str(Path(model_dir) / PARAMS_FILE))
    return np.ravel(data["mu_prisparam"]).astype(np.float64), np.asarray(data["cov_prisparam"], dtype=np.float64)


def rgb2gray_matlab(rgb: np.ndarray) -> np.ndarray:
    """MATLAB's rgb2gray on uint8 input (its exact weights, rounded back to 8 bits), as float64."""
    w = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
    return np.round(rgb[..., :3].astype(np.float64) @ w).clip(0, 255)


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return ((1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1)
            + (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _resize_axis(img: np.ndarray, scale: float, axis: int) -> np.ndarray:
    """MATLAB imresize along one axis: bicubic, antialiased when shrinking, symmetric borders."""
    n_in = img.shape[axis]
    n_out = int(np.ceil(n_in * scale))
    width = 4.0 / scale if scale < 1 else 4.0
    x = np.arange(1, n_out + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(np.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    dist = u[:, None] - idx
    weights = scale * _cubic(scale * dist) if scale < 1 else _cubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n_in), np.arange(n_in - 1, -1, -1)])
    idx = mirror[np.mod(idx.astype(int) - 1, 2 * n_in)]
    moved = np.moveaxis(img, axis, 0)
    out = np.einsum("ok,ok...->o...", weights, moved[idx])
    return np.moveaxis(out, 0, axis)


def imresize_half(img: np.ndarray) -> np.ndarray:
    return _resize_axis(_resize_axis(img, 0.5, 0), 0.5, 1)


def _window() -> np.ndarray:
    x = np.arange(7) - 3
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * (7 / 6) ** 2))
    return g / g.sum()


def aggd(vec: np.ndarray) -> tuple[float, float, float]:
    """(alpha, beta_left, beta_right) by the release's grid search."""
    left, right = vec[vec < 0], vec[vec > 0]
    lstd = np.sqrt(np.mean(left**2)) if left.size else 0.0
    rstd = np.sqrt(np.mean(right**2)) if right.size else 0.0
    g = lstd / rstd if rstd > 0 else np.inf
    rhat = np.mean(np.abs(vec)) ** 2 / np.mean(vec**2)
    rhatnorm = rhat * (g**3 + 1) * (g + 1) / ((g**2 + 1) ** 2)
    alpha = float(_GAM[np.argmin((_R_GAM - rhatnorm) ** 2)])
    c = np.sqrt(special.gamma(1 / alpha) / special.gamma(3 / alpha))
    return alpha, float(lstd * c), float(rstd * c)


def block_features(block: np.ndarray) -> list[float]:
    alpha, bl, br = aggd(block.ravel())
    feat = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        pair = block * np.roll(block, shift, axis=(0, 1))
        alpha, bl, br = aggd(pair.ravel())
        mean = (br - bl) * special.gamma(2 / alpha) / special.gamma(1 / alpha)
        feat += [alpha, mean, bl, br]
    return feat


def niqe(rgb: np.ndarray, mu_p: np.ndarray, cov_p: np.ndarray, block: int = 96) -> float | None:
    """NIQE of an RGB uint8 image; None when it holds fewer than two whole blocks."""
    im = rgb2gray_matlab(rgb)
    rows, cols = im.shape[0] // block, im.shape[1] // block
    if rows * cols < 2:
        return None
    im = im[: rows * block, : cols * block]
    window = _window()
    feats = []
    for scale in (1, 2):
        mu = ndimage.correlate(im, window, mode="nearest")
        sigma = np.sqrt(np.abs(ndimage.correlate(im * im, window, mode="nearest") - mu * mu))
        structdis = (im - mu) / (sigma + 1)
        b = block // scale
        feats.append(np.array([block_features(structdis[r * b:(r + 1) * b, c * b:(c + 1) * b])
                               for c in range(cols) for r in range(rows)]))
        im = imresize_half(im)
    dist = np.concatenate(feats, axis=1)
    dist = dist[~np.isnan(dist).any(axis=1)]  # nancov/nanmean: complete rows
    mu_d = dist.mean(axis=0)
    cov_d = np.cov(dist, rowvar=False)
    delta = mu_p - mu_d
    return float(np.sqrt(delta @ np.linalg.pinv((cov_p + cov_d) / 2) @ delta))


def build_standin(target: Path) -> None:
    """A pristine model of the release's shape (1×36 mean, 36×36 covariance), seeded, positive definite."""
    from scipy.io import savemat

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(17)
    a = rng.normal(size=(36, 36)) * 0.1
    savemat(str(target / PARAMS_FILE), {"mu_prisparam": rng.uniform(0.1, 1.0, size=(1, 36)),
                                        "cov_prisparam": a @ a.T + 0.01 * np.eye(36)})
