"""``cloak immunize``: model-level anti-personalization. Methods register lazily here."""

from cloak.registry import Registry

IMMUNIZE = Registry("immunize")
IMMUNIZE.register_lazy("apdm", "cloak.immunize.apdm:Apdm",
                       "APDM: DPO loss + L2P dual-path schedule, an immunized UNet (Lee+ NeurIPS'25)")
