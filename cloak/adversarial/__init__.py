"""Shared adversarial math: budgets with units, ℓ∞ projection, PGD steps, 8-bit quantisation."""

from cloak.adversarial.budget import UNITS, Budget, to_m11
from cloak.adversarial.pgd import pgd_step, project, quantize_within_budget, random_start

__all__ = ["UNITS", "Budget", "to_m11", "pgd_step", "project", "quantize_within_budget", "random_start"]
