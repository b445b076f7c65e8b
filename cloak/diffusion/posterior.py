"""Distances between two VAE posteriors ``N(μ, σ²)`` — PID's objectives (docs/spec-additions.md §P2).

Each is an element-mean over the latent, per image, of the protected posterior ``q(z|x)`` against the
clean one ``q(z|x₀)`` (given as its mean and log-variance). The names are PID.py's ``--attack_type``
values (``KL`` → ``kl``, ``latent_vector`` → ``latent``).
"""

from __future__ import annotations

import torch

POSTERIOR_OBJECTIVES = ("add-log", "mean", "var", "kl", "add", "latent")


def posterior_distance(dist, clean_mean: torch.Tensor, clean_logvar: torch.Tensor, objective: str,
                       streams=None) -> torch.Tensor:
    """(B,) distance of ``dist`` (a diffusers DiagonalGaussianDistribution) from the clean posterior.

    ``latent`` compares two independent posterior samples and draws them from ``streams``
    (:class:`cloak.adversarial.per_image.ImageStreams`).
    """
    mean, logvar = dist.mean.float(), dist.logvar.float()
    clean_mean, clean_logvar = clean_mean.float(), clean_logvar.float()

    def mse(a, b):
        return (a - b).pow(2).flatten(1).mean(1)

    std, clean_std = torch.exp(0.5 * logvar), torch.exp(0.5 * clean_logvar)
    if objective == "mean":
        return mse(mean, clean_mean)
    if objective == "var":
        return mse(std, clean_std)  # PID.py's "var" compares standard deviations
    if objective == "add":
        return mse(mean, clean_mean) + mse(std, clean_std)
    if objective == "add-log":
        return mse(logvar, clean_logvar) + mse(mean, clean_mean)
    if objective == "kl":
        # KL(N(μ₀, σ₀²) ‖ N(μ, σ²)) = log σ/σ₀ + (σ₀² + (μ₀ − μ)²) / 2σ² − ½, element-wise
        kl = (0.5 * (logvar - clean_logvar) + (clean_std.pow(2) + (clean_mean - mean).pow(2)) / (2 * std.pow(2))
              - 0.5)
        return kl.flatten(1).mean(1)
    if objective == "latent":
        shape = tuple(mean.shape[1:])
        z = mean + std * streams.randn(shape, mean.device)
        z0 = clean_mean + clean_std * streams.randn(shape, mean.device)
        return mse(z, z0)
    raise ValueError(f"unknown posterior objective {objective!r}; valid: {', '.join(POSTERIOR_OBJECTIVES)}")
