"""``cloak purify``: remove protective perturbations, to test how much of a protection survives."""

from cloak.registry import Registry

PURIFY = Registry("purify")
PURIFY.register_lazy("gaussian", "cloak.purify.classic:Gaussian", "Gaussian blur (kernel 5, σ 1.1; --compat: PIL radius 5)")
PURIFY.register_lazy("jpeg", "cloak.purify.classic:Jpeg", "JPEG re-compression (quality 75)")
