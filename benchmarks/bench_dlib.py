#!/usr/bin/env python3
"""dlib's face-recognition ResNet in torch (``dlib-resnet``): speed on the real weights and a real photo.

Measured on scikit-image's astronaut (512², one face), weights of the ``face-recognition-models`` package:

* ``pgd_step``: seconds per DLADiff layer-2 PGD step against dlib-resnet (chip resampling at the clean
  image's dlib landmarks, forward, backward to the 512² pixels, signed step and projection) — what
  ``-o zs_steps`` multiplies;
* ``descriptor_torch`` / ``descriptor_dlib``: seconds per descriptor of one aligned 150² chip, the torch
  port (no gradient) against dlib's ``compute_face_descriptor`` on the same chip (the score backend's
  network), and batched torch descriptors per chip.

    OMP_NUM_THREADS=2 python benchmarks/bench_dlib.py [--threads N] [--repeats N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _harness import DEFAULT_CACHE, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="chips per batched torch call")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import dlib
    import numpy as np
    import torch
    from skimage import data

    from cloak.adversarial import pgd_step
    from cloak.adversarial.identity import IdentityLoss, Region
    from cloak.models.encoders import load_identity_encoder
    from cloak.models.handle import Models

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    models = Models(cache_dir=Path(DEFAULT_CACHE), device=device)
    encoder = load_identity_encoder(models, "dlib-resnet")
    img = data.astronaut()
    x0 = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    objective = IdentityLoss([encoder], [Region(None, "image")], x0)
    eps, alpha = 8 / 127.5, 1 / 127.5
    state = {"x": x0.clone()}

    def step() -> None:
        x = state["x"].detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x), x)
        state["x"] = pgd_step(x.detach(), grad, x0, alpha, eps, ascent=False)

    results = {"threads": args.threads, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "image": "skimage astronaut 512x512",
               "pgd_step_s": timed(step, args.repeats, device)}

    path = models.packaged("dlib-resnet", "bench")
    analyzer = encoder.analyzer
    rect = analyzer.detect(img)[0]._rect
    chip = dlib.get_face_chip(img, analyzer._shape(img, rect), 150, 0.25)
    reference = dlib.face_recognition_model_v1(str(path / "dlib_face_recognition_resnet_model_v1.dat"))
    chip_t = torch.from_numpy(np.array(chip)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        results["descriptor_torch_s"] = timed(lambda: encoder(chip_t), args.repeats, device)
        batch = chip_t.repeat(args.batch, 1, 1, 1)
        results[f"descriptor_torch_batch{args.batch}_s_per_chip"] = \
            timed(lambda: encoder(batch), args.repeats, device) / args.batch
    results["descriptor_dlib_s"] = timed(lambda: reference.compute_face_descriptor(chip), args.repeats, device)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
