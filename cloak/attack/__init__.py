"""``cloak attack``: what an adversary does — personalize a model on the images, then generate."""

from cloak.registry import Registry

ATTACK = Registry("attack")
ATTACK.register_lazy("dreambooth", "cloak.attack.dreambooth:DreamBooth",
                     "DreamBooth with prior preservation, UNet + text encoder (Ruiz+ CVPR'23; Anti-DB protocol)")
