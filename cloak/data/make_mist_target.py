"""Write ``mist_target.png``: cloak's own target texture for Mist's textural loss (protect.md §5).

Mist pulls the image's latent toward the latent of a target texture; the released code ships a
pattern of its own (``MIST.png``). cloak draws its own instead, entirely from code, so its licence
is cloak's (Apache-2.0): a high-contrast periodic pattern — a black/white checkerboard of 32-px
cells crossed by diagonal bands and overlaid with a coarser colour lattice — whose strong edges at
several frequencies survive the VAE's 8× downsampling and resizing to smaller working resolutions
(every period is a multiple of 8 px at 512).

Run ``python cloak/data/make_mist_target.py`` to regenerate it; the output is byte-identical on
every run (no randomness; PNG written with fixed settings and no metadata).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 512
CELL = 32  # checker cell (px); 4 latent pixels at SD's factor 8
BAND = 80  # diagonal band period (px), not a multiple of the cell: the pattern does not degenerate
LATTICE = 128  # colour lattice period (px)
# Saturated, far-apart colours: black, white, and two complementary pairs.
PALETTE = np.array([[0, 0, 0], [255, 255, 255], [255, 32, 32], [32, 224, 255], [255, 224, 0], [96, 0, 255]],
                   dtype=np.uint8)


def pattern(size: int = SIZE) -> np.ndarray:
    """H×W×3 uint8."""
    y, x = np.mgrid[0:size, 0:size]
    checker = ((x // CELL) + (y // CELL)) % 2  # 0/1
    band = ((x + y) // (BAND // 2)) % 2  # diagonal stripes, half period on, half off
    index = checker ^ band  # black/white, high contrast at two orientations
    # A coarse lattice of coloured lines (16 px wide) cuts through both; colours change per lattice cell.
    on_line = ((x % LATTICE) < 16) | ((y % LATTICE) < 16)
    colour = 2 + ((x // LATTICE) + 2 * (y // LATTICE)) % 4
    partner = colour ^ 1  # red↔cyan, yellow↔violet: the line keeps the checker's contrast in colour
    index = np.where(on_line, np.where(index == 1, colour, partner), index)
    return PALETTE[index]


def main(out: Path | None = None) -> Path:
    out = out or Path(__file__).with_name("mist_target.png")
    img = Image.fromarray(pattern(), "RGB").quantize(colors=len(PALETTE), method=Image.Quantize.FASTOCTREE,
                                                     dither=Image.Dither.NONE)
    img.save(out, format="PNG", optimize=True)
    return out


if __name__ == "__main__":
    print(main())
