#!/usr/bin/env python3
"""Write example photos from scikit-image's public-domain portrait (astronaut Eileen Collins, NASA).

Set B (photos/, to protect) and set A (clean/, same identity, other crops) for the demo and tests.
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


def main(root: str = "examples") -> None:
    from skimage import data

    img = Image.fromarray(data.astronaut())
    views = crops(img)
    for folder, chosen in (("photos", views[:3]), ("clean", views[3:])):
        target = Path(root) / folder
        target.mkdir(parents=True, exist_ok=True)
        for i, view in enumerate(chosen):
            view.save(target / f"astronaut_{i}.png")
    print(Path(root).resolve())


if __name__ == "__main__":
    main(*sys.argv[1:])
