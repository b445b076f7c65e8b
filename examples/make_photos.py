#!/usr/bin/env python3
"""Write example photos from scikit-image's public-domain portrait (astronaut Eileen Collins, NASA).

Set B (photos/, to protect) and set A (clean/, same identity, other crops) for the demo and tests, and
full/: whole photos of three shapes (the 512×512 original, a 1200×800 landscape JPEG and an 800×1200
portrait JPEG made from it) to show that protect returns each photo at its own size.
Nothing is committed: the images come from the installed scikit-image.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image


def crops(img: Image.Image) -> list[Image.Image]:
    """Different framings of the same face: shifts, a zoom and a mirror."""
    boxes = [(90, 0, 350, 260), (110, 20, 350, 260), (100, 0, 330, 230), (80, 10, 360, 290), (120, 10, 320, 210)]
    out = [img.crop(b) for b in boxes]
    out.append(img.crop(boxes[0]).transpose(Image.FLIP_LEFT_RIGHT))
    return out


def full_size(img: Image.Image) -> dict[str, Image.Image]:
    """The photo itself and two camera-like frames of it (scaled to cover, centre-cropped)."""
    out = {"astronaut.png": img}
    for w, h in ((1200, 800), (800, 1200)):
        scale = max(w / img.width, h / img.height)
        big = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        left, top = (big.width - w) // 2, (big.height - h) // 2
        out[f"astronaut_{w}x{h}.jpg"] = big.crop((left, top, left + w, top + h))
    return out


def main(root: str = "examples") -> None:
    from skimage import data

    img = Image.fromarray(data.astronaut())
    views = crops(img)
    for folder, chosen in (("photos", views[:3]), ("clean", views[3:])):
        target = Path(root) / folder
        target.mkdir(parents=True, exist_ok=True)
        for i, view in enumerate(chosen):
            view.save(target / f"astronaut_{i}.png")
    full = Path(root) / "full"
    full.mkdir(parents=True, exist_ok=True)
    for name, photo in full_size(img).items():
        photo.save(full / name, **({"quality": 95} if name.endswith(".jpg") else {}))
    print(Path(root).resolve())


if __name__ == "__main__":
    main(*sys.argv[1:])
