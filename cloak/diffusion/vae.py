"""Load only the VAE of a Stable Diffusion model, for methods that never touch the UNet.

PhotoGuard's encoder attack (and Mist's textural mode) use the autoencoder alone; loading UNet and
text encoder as well would cost SD 1.5 about 3.9 GB of fp32 weights for nothing. Same resolution
(catalog id, ``[models]`` override, local directory, ``--tiny`` stand-in), same offline
``from_pretrained`` as ``Models.sd``; one load per (path, device, dtype).
"""

from __future__ import annotations

import json

from cloak.errors import ModelUnavailableError


def load_vae(models, id_or_path: str, role: str = "surrogate-vae"):
    """The frozen ``AutoencoderKL`` of ``id_or_path``, shared (never mutate it)."""
    model_id, path, _ = models.resolve(id_or_path, role)

    def build():
        from diffusers import AutoencoderKL

        from cloak.models.handle import quiet_libraries

        quiet_libraries()
        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise ModelUnavailableError(f"cannot load the VAE of {model_id} from {path}: {exc}") from None
        vae.requires_grad_(False)
        vae.eval()
        return vae.to(models.device, dtype=models.dtype)

    return models.memo(("vae", str(path), str(models.device), str(models.dtype)), build)
