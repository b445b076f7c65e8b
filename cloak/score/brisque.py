"""BRISQUE (score.md §4): the PyPI ``brisque`` package's algorithm and its shipped SVR model, in numpy.

Anti-DreamBooth and APDM score with ``brisque.BRISQUE(url=False).score(img)``. That package needs
libsvm at import time and unpickles its scaling file; cloak reads the same two model files
(``svm.txt`` in libsvm's text format, ``normalize.pickle`` through an unpickler that admits no classes)
and evaluates the RBF ε-SVR itself, so the numbers match the package (tested) without importing it.

Features (Mittal et al. 2012): MSCN coefficients of the grey image (7×7 Gaussian, σ 7/6, zero-padded
'same' convolution, C = 1/255) and their four neighbour products, each fitted with an asymmetric
generalised Gaussian (moment matching solved with ``scipy.optimize.root`` from 0.2, as the package
does), at full and half size (OpenCV bicubic) — 36 features, min-max scaled to [−1, 1].
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import optimize, signal, special

SVM_FILE = "svm.txt"
SCALE_FILE = "normalize.pickle"


class _DataOnly(pickle.Unpickler):
    """Plain containers and numbers only: any class reference in the file is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a model file")


@dataclass
class SvrModel:
    gamma: float
    rho: float
    coef: np.ndarray  # n_sv
    sv: np.ndarray  # n_sv × n_features
    lo: np.ndarray  # feature minima (scaling)
    hi: np.ndarray  # feature maxima

    def predict(self, features: np.ndarray) -> float:
        x = -1.0 + 2.0 / (self.hi - self.lo) * (features - self.lo)
        k = np.exp(-self.gamma * np.sum((self.sv - x) ** 2, axis=1))
        return float(self.coef @ k - self.rho)


def load_model(model_dir: Path) -> SvrModel:
    model_dir = Path(model_dir)
    header: dict[str, str] = {}
    coefs, rows = [], []
    with open(model_dir / SVM_FILE, encoding="ascii") as fh:
        for line in fh:
            if line.strip() == "SV":
                break
            key, _, value = line.strip().partition(" ")
            header[key] = value
        for line in fh:
            parts = line.split()
            if not parts:
                continue
            coefs.append(float(parts[0]))
            rows.append({int(i): float(v) for i, v in (p.split(":") for p in parts[1:])})
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise ValueError(f"{model_dir / SVM_FILE}: expected an RBF epsilon_svr model, got {header}")
    with open(model_dir / SCALE_FILE, "rb") as fh:
        scale = _DataOnly(fh).load()
    n = len(scale["min_"])
    sv = np.zeros((len(rows), n))
    for r, row in enumerate(rows):
        for i, v in row.items():
            sv[r, i - 1] = v  # libsvm indices are 1-based; absent entries are 0
    return SvrModel(float(header["gamma"]), float(header["rho"]), np.asarray(coefs), sv,
                    np.asarray(scale["min_"], dtype=np.float64), np.asarray(scale["max_"], dtype=np.float64))


def _gaussian_kernel(n: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    # Written term for term as the package does: MSCN values of flat regions are ~1e-13 and their sign
    # (left or right half of the AGGD fit) follows the last bit of the kernel, which moves the features.
    y, x = np.indices((n, n)) - int(n / 2)
    k = 1 / (2 * np.pi * sigma**2) * np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return k / np.sum(k)


def mscn(gray: np.ndarray) -> np.ndarray:
    kernel = _gaussian_kernel()
    mu = signal.convolve2d(gray, kernel, "same")
    sigma = np.sqrt(np.abs(mu**2 - signal.convolve2d(gray**2, kernel, "same")))
    return (gray - mu) / (sigma + 1.0 / 255)


def _phi(alpha: float) -> float:
    return special.gamma(2 / alpha) ** 2 / (special.gamma(1 / alpha) * special.gamma(3 / alpha))


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """(alpha, mean, sigma_left, sigma_right) of an asymmetric generalised Gaussian, by moment matching."""
    x = x.ravel()
    left, right = x[x < 0], x[x >= 0]
    sigma_l = np.sqrt(np.mean(left**2)) if left.size else 0.0
    sigma_r = np.sqrt(np.mean(right**2)) if right.size else 0.0
    g = sigma_l / sigma_r
    r_hat = np.mean(np.abs(x)) ** 2 / np.mean(x**2)
    big_r = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha = float(optimize.root(lambda a: _phi(a) - big_r, [0.2]).x[0])
    const = np.sqrt(special.gamma(1 / alpha) / special.gamma(3 / alpha))
    mean = (sigma_r - sigma_l) * const * special.gamma(2 / alpha) / special.gamma(1 / alpha)
    return alpha, float(mean), float(sigma_l), float(sigma_r)


def features_one_scale(gray: np.ndarray) -> list[float]:
    m = mscn(gray)
    pairs = (m[:, :-1] * m[:, 1:], m[:-1, :] * m[1:, :], m[:-1, :-1] * m[1:, 1:], m[1:, :-1] * m[:-1, 1:])
    alpha, _, sl, sr = aggd_fit(m)
    out = [alpha, (sl**2 + sr**2) / 2]
    for p in pairs:
        alpha, mean, sl, sr = aggd_fit(p)
        out += [alpha, mean, sl**2, sr**2]
    return out


def features(rgb: np.ndarray) -> np.ndarray:
    import cv2

    # skimage.color.rgb2gray (ITU-R 709 luma on [0, 1]), bit for bit: scaled by the reciprocal of 255
    gray = (rgb[..., :3].astype(np.float64) * (1.0 / 255)) @ np.array([0.2125, 0.7154, 0.0721])
    half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    return np.asarray(features_one_scale(gray) + features_one_scale(half), dtype=np.float64)


def score(rgb: np.ndarray, model: SvrModel) -> float:
    return model.predict(features(rgb))
