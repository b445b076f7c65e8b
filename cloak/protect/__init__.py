"""``cloak protect``: image-level protective perturbations. Methods register lazily here."""

from cloak.registry import Registry

PROTECT = Registry("protect")
PROTECT.register_lazy("aspl", "cloak.protect.aspl:Aspl",
                      "Anti-DreamBooth ASPL: alternate surrogate DreamBooth and PGD (Le+ ICCV'23)")
