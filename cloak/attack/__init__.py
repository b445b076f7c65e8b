"""``cloak attack``: what an adversary does — personalize a model on the images, then generate."""

from cloak.registry import Registry

ATTACK = Registry("attack")
ATTACK.register_lazy("dreambooth", "cloak.attack.dreambooth:DreamBooth",
                     "DreamBooth with prior preservation, UNet + text encoder (Ruiz+ CVPR'23; Anti-DB protocol)")
ATTACK.register_lazy("lora", "cloak.attack.lora:Lora",
                     "DreamBooth with LoRA adapters on the UNet attention (+ optional text encoder); rank 4")
ATTACK.register_lazy("diffshortcut", "cloak.attack.diffshortcut:DiffShortcut",
                     "DiffShortcut robust training: negative-token prompts + negative-prompt sampling (Liu+ 2024)")
ATTACK.register_lazy("ipadapter", "cloak.attack.ipadapter:IPAdapter",
                     "zero-shot IP-Adapter(-FaceID) generation from each reference image; no fine-tuning")
