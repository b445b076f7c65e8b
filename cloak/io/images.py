"""Image directories in and out.

Reading: natural sort, hidden files skipped, EXIF orientation applied, any mode → RGB, values in [-1, 1].
The working copy follows the fit mode (:data:`FITS`): ``crop`` resizes the short side (bicubic,
antialiased) and centre-crops a square (what the papers and the training verbs use); ``keep`` resizes the
short side and pads the sides up to the latent grid by reflection, so the whole photo keeps its aspect;
``resize`` squashes the photo to a square. Each item records how its working copy maps back to the photo
(:class:`Placement`), which is how ``protect`` returns a perturbation at the photo's own size.
Writing: PNG only, metadata stripped (unless the caller passes the source's, ``--keep-metadata``),
written to a temporary name and renamed, never over an existing file without ``force``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cloak.errors import InputError, OutputExistsError, UsageError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Decompression bombs are an input error, not a crash.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


def natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def list_images(root: Path, recursive: bool = True, exclude: Path | None = None) -> list[Path]:
    """Image files under ``root`` in natural order; hidden files and folders are skipped, and so is the folder
    ``exclude`` (a run's output folder inside its input folder: its outputs must not be read back as inputs on
    the next run, which would nest out/out/... one level deeper each time)."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(f"input directory {root} does not exist")
    found = []
    skip = _resolved(exclude) if exclude is not None else None
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = [d for d in dirnames if not d.startswith(".")
                       and (skip is None or _resolved(Path(dirpath) / d) != skip)]
        for name in filenames:
            if name.startswith(".") or name == "report.json":
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(path)
    return sorted(found, key=lambda p: natural_key(str(p.relative_to(root))))


def _resolved(path: Path) -> Path | None:
    try:
        return Path(path).resolve()
    except OSError:
        return None


STDIN = "-"
# (the stdin object, what it listed): the object itself is kept so that a later stream cannot pass for it
# (an id() can be reused once an object is freed).
_stdin_listing: tuple[object, list[Path], Path] | None = None


def input_files(root: Path | str, exclude: Path | str | None = None) -> tuple[list[Path], Path]:
    """The image files an INPUT argument names, and the folder their output names are relative to.

    ``-`` reads one path per line from standard input (``find shoot/ -name '*.jpg' | cloak protect - out/``),
    or the ``--jsonl`` records of an earlier verb (each record's ``output``; failed items have none):
    files are taken in the order given (a listed folder contributes its images in natural order), and the
    output names keep each file's path below the listed files' common folder, so two ``img.jpg`` from
    different folders stay apart. Standard input is read once per process; later calls get the same list.
    ``exclude``: the run's output folder, never listed as input (:func:`list_images`).
    """
    files, base = _files_from_stdin() if str(root) == STDIN else (list_images(Path(root), exclude=exclude),
                                                                    names_base(root))
    refuse_same_output_name(files, base)
    return files, base


def output_name(path: Path, base: Path) -> str:
    """The name an input's output gets: its path below ``base`` without the suffix (``a/b.jpg`` → ``a/b``)."""
    rel = path.relative_to(base) if path.is_relative_to(base) else Path(path.name)
    return str(rel.with_suffix(""))


def refuse_same_output_name(files: list[Path], base: Path) -> None:
    """Two inputs that differ only in suffix (``a.png``, ``a.jpg``) would be written as one ``a.png``:
    a usage error naming both, before any work, rather than one silently replacing the other."""
    seen: dict[str, Path] = {}
    for path in files:
        name = output_name(path, base)
        if name in seen:
            raise UsageError(f"inputs {seen[name]} and {path} would both be written as {name}.png",
                             hint="rename or move one of them (outputs keep each input's name, as PNG)")
        seen[name] = path


def names_base(root: Path | str) -> Path:
    """The folder output names are relative to: the input folder itself, or a single file's folder."""
    root = Path(root)
    return root if root.is_dir() else root.parent


def _files_from_stdin() -> tuple[list[Path], Path]:
    import sys

    global _stdin_listing
    if _stdin_listing is not None and _stdin_listing[0] is sys.stdin:
        return _stdin_listing[1], _stdin_listing[2]
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("INPUT is '-' (one path per line on standard input) but standard input is a terminal",
                         hint="pipe the paths in, e.g. find photos/ -name '*.jpg' | cloak ... - OUTPUT")
    files: list[Path] = []
    seen: set[Path] = set()
    for number, line in enumerate(sys.stdin.read().splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            # A --jsonl record of an earlier verb (`cloak protect in out --jsonl | cloak purify - pur`): its output.
            # A record without one (a failed item; the earlier verb has already said why) is passed over.
            try:
                record = json.loads(line)
            except ValueError:
                raise InputError(f"standard input line {number}: neither a path nor a JSON record: {line[:80]}") \
                    from None
            if not isinstance(record, dict):
                raise InputError(f"standard input line {number}: a JSON record must be an object")
            if not record.get("output"):
                continue
            line = str(record["output"])
        path = Path(line.rstrip("\r")).expanduser()
        if not path.exists():
            raise InputError(f"standard input line {number}: {path} does not exist")
        for file in list_images(path) if path.is_dir() else [path]:
            key = file.resolve()
            if key not in seen:  # the same file listed twice is read once
                seen.add(key)
                files.append(key)
    if not files:
        raise InputError("no image paths on standard input")
    base = Path(os.path.commonpath([f.parent for f in files]))
    _stdin_listing = (sys.stdin, files, base)
    return files, base


FITS = ("keep", "crop", "resize")


@dataclass(frozen=True)
class Placement:
    """Where a photo's content sits in its working copy (all sizes are (width, height) in pixels).

    The photo (``native``) is resized to ``content``; in ``keep`` mode the working copy (``work``) is that
    content with ``pad`` = (left, top, right, bottom) reflected pixels around it; in ``crop`` mode the working
    copy is the window ``crop`` = (left, top, right, bottom) of the content; in ``resize`` mode content is the
    whole working copy.
    """

    fit: str
    native: tuple[int, int]
    content: tuple[int, int]
    work: tuple[int, int]
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    crop: tuple[int, int, int, int] | None = None

    @property
    def scale(self) -> tuple[float, float]:
        """Working pixels per native pixel along (x, y)."""
        return self.content[0] / self.native[0], self.content[1] / self.native[1]

    @property
    def maps_back(self) -> bool:
        """Whether the perturbation can be brought back to the whole photo (not for a centre crop)."""
        return self.fit != "crop"

    def record(self) -> dict:
        out = {"fit": self.fit, "native_size": list(self.native), "working_size": list(self.work)}
        if self.fit == "keep":
            out["padding"] = list(self.pad)
        if self.crop is not None:
            out["crop"] = list(self.crop)
        out["scale"] = [round(v, 6) for v in self.scale]
        return out


@dataclass
class ImageItem:
    name: str  # relative path without suffix: the output keeps it (``a/b.jpg`` → ``a/b.png``)
    path: Path
    size: tuple[int, int]  # original (width, height), EXIF orientation applied
    sha256: str
    placement: Placement | None = None  # None: the working copy is the photo at its own size


@dataclass
class ImageSet:
    """An ordered set of working copies, one 3×h×w float tensor in [-1, 1] per image.

    Images may differ in shape (protect keeps each photo's aspect): :meth:`buckets` groups them by
    shape so a method can batch each group through a model; :attr:`pixels` stacks them into one
    B×3×H×W tensor and is only defined when every image has the same shape.
    """

    items: list[ImageItem]
    tensors: list[torch.Tensor]
    failures: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def names(self) -> list[str]:
        return [item.name for item in self.items]

    @property
    def uniform(self) -> bool:
        return len({tuple(t.shape) for t in self.tensors}) <= 1

    @property
    def pixels(self) -> torch.Tensor:
        """All images as one B×3×H×W tensor (one shape only; mixed shapes go through :meth:`buckets`)."""
        import torch

        if not self.uniform:
            shapes = sorted({tuple(t.shape[-2:]) for t in self.tensors})
            raise ValueError(f"the set holds images of {len(shapes)} shapes {shapes}; iterate over buckets()")
        return torch.stack(self.tensors)

    def buckets(self) -> list[Bucket]:
        """Images grouped by working shape, in order of first appearance; indices into this set."""
        import torch

        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(self.tensors):
            groups.setdefault(tuple(t.shape), []).append(i)
        return [Bucket(idx, torch.stack([self.tensors[i] for i in idx])) for idx in groups.values()]

    def subset(self, indices: list[int]) -> ImageSet:
        return ImageSet([self.items[i] for i in indices], [self.tensors[i] for i in indices], [])


@dataclass
class Bucket:
    """Images of one shape: their indices in the set and their pixels as one B×3×h×w tensor."""

    indices: list[int]
    pixels: torch.Tensor


def load_pil(path: Path) -> Image.Image:
    """Open one image, apply EXIF orientation, convert to RGB (alpha composited on white).

    High-bit-depth greyscale (16-bit PNG/TIFF: modes I;16*, I; float TIFF: F) is scaled to 8 bits, not
    clipped at 255 as Pillow's own conversion does; 16-bit RGB(A) is scaled by Pillow itself. An animated
    image gives its first frame.
    """
    try:
        with Image.open(path) as img:
            img.load()
            source_format = img.format
            img = ImageOps.exif_transpose(img)
            img = _scale_to_8bit(img, source_format)
            if _has_transparency(img):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path}: {_read_failure(path, exc)}") from None


def _read_failure(path: Path, exc: Exception) -> str:
    """Why a file could not be read, in the user's terms where Pillow's words mislead: a dangling link is
    "No such file" though ``ls`` lists it, and an empty file "cannot identify image file"."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link (to {os.readlink(path)})"
    try:
        if path.is_file() and path.stat().st_size == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    return str(exc)


GREY_MODES = ("1", "L", "LA", "La", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def read_notes(path: Path) -> dict:
    """What reading a file as 8-bit RGB changed about it, for its report item (empty for plain 8-bit RGB).

    ``input_mode`` is Pillow's mode of the file; ``conversion`` lists each change in words: colour space,
    greyscale read as RGB (the output is RGB: a protection's perturbation uses all three channels),
    samples over 8 bits scaled down, transparency composited on white, frames after the first not read.
    Only the header is read.
    """
    try:
        with Image.open(path) as img:
            mode, frames = img.mode, getattr(img, "n_frames", 1)
            rawmode = img.tile[0].args if img.tile else ""
            rawmode = rawmode[0] if isinstance(rawmode, tuple) and rawmode else rawmode
            transparent = _has_transparency(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return {}
    notes = []
    if mode in GREY_MODES or mode.startswith("I;16"):
        notes.append("greyscale read as RGB (R = G = B)")
    elif mode == "P":
        notes.append("palette colours read as RGB")
    elif mode not in ("RGB", "RGBA", "RGBa"):
        notes.append(f"{mode} converted to RGB")
    if mode.startswith("I;16") or mode in ("I", "F") or (isinstance(rawmode, str) and ";16" in rawmode):
        notes.append("samples of more than 8 bits scaled to 8 bits")
    if transparent:
        notes.append("transparent pixels' colours composited on white")
    if frames > 1:
        notes.append(f"first of {frames} frames read; the others are not in the output")
    return {"input_mode": mode, "conversion": notes} if notes else {}


def multi_frame_warning(paths: list[Path]) -> str | None:
    """A run warning for animated or multi-page inputs: only their first frame is read and written (each item's
    ``conversion`` says so too), which a user should not find out by opening the output."""
    multi = [str(p) for p in paths if any("frames" in n for n in read_notes(p).get("conversion", []))]
    if not multi:
        return None
    return (f"{len(multi)} input(s) hold several frames (e.g. {multi[0]}); only the first frame of each was read "
            f"and written")


def source_alpha(path: Path) -> np.ndarray | None:
    """The file's alpha channel, upright (EXIF orientation applied), as a uint8 H×W array, or None when the
    file has no transparency or every pixel is opaque. Outputs keep it: a cut-out portrait stays a cut-out,
    not a white box (the colours under it are the white-composited ones the method saw)."""
    try:
        with Image.open(path) as img:
            if not _has_transparency(img):
                return None
            img.load()
            img = ImageOps.exif_transpose(img)
            alpha = np.asarray(img.convert("RGBA").getchannel("A"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    return None if alpha.min() == 255 else alpha


def _scale_to_8bit(img: Image.Image, source_format: str | None) -> Image.Image:
    """Single-channel images of more than 8 bits as 8-bit greyscale (``L``), scaled over their bit depth."""
    mode = img.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return img
    arr = np.nan_to_num(np.asarray(img).astype(np.float64))
    peak = float(arr.max()) if arr.size else 0.0
    if mode == "F":  # float TIFF: [0, 1] when it fits there, 8-bit values otherwise
        scale = 255.0 if peak <= 1.0 else 1.0
    elif mode.startswith("I;16") or source_format == "PNG" or 255 < peak <= 65535:
        scale = 255.0 / 65535.0  # 16 bits (a PNG's "I" can only be 16-bit greyscale)
    elif peak > 65535:
        scale = 255.0 / (2**31 - 1)  # 32-bit integer samples
    else:
        scale = 1.0  # 32-bit container holding 8-bit values
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")


def fit(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` and centre-crop a square."""
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError("empty image")
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def round_up(n: int, grid: int) -> int:
    return -(-n // grid) * grid


def short_side_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(w, h) scaled so the short side is ``resolution`` (the long side rounded, at least ``resolution``)."""
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


# ``keep``: a working copy's long side is at most this many times the resolution (a 4:1 panorama still gets
# the full resolution on its short side).
MAX_ASPECT = 4


def working_copy(img: Image.Image, resolution: int, fit_mode: str = "crop",
                 grid: int = 64) -> tuple[Image.Image | np.ndarray, Placement]:
    """The working copy of one (upright RGB) photo and where the photo sits in it.

    ``crop``: :func:`fit` (short side to ``resolution``, centre square); ``resize``: squashed to
    ``resolution``²; ``keep``: short side to ``resolution`` (long side at most :data:`MAX_ASPECT` times it),
    then each side padded by reflection up to a multiple of ``grid`` (the latent grid: 8 latent pixels × the
    VAE factor), half on each side. Returns a PIL image, or a uint8 H×W×3 array for ``keep`` (padding is done
    in numpy).
    """
    if fit_mode not in FITS:
        raise ValueError(f"unknown fit {fit_mode!r}; valid: {', '.join(FITS)}")
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError("empty image")
    if fit_mode == "crop":
        nw, nh = short_side_size((w, h), resolution)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        return fit(img, resolution), Placement("crop", (w, h), (nw, nh), (resolution, resolution),
                                               crop=(left, top, left + resolution, top + resolution))
    if fit_mode == "resize":
        size = (resolution, resolution)
        out = img if img.size == size else img.resize(size, Image.BICUBIC, reducing_gap=None)
        return out, Placement("resize", (w, h), size, size)
    nw, nh = short_side_size((w, h), resolution)
    if max(nw, nh) > MAX_ASPECT * resolution:
        # A 4000×4 strip would be a 320000×64 working copy (tens of GB through a UNet): past MAX_ASPECT the
        # long side is held at MAX_ASPECT·resolution and the short side falls below the resolution.
        scale = MAX_ASPECT * resolution / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    ww, wh = round_up(nw, grid), round_up(nh, grid)
    px, py = ww - nw, wh - nh
    pad = (px // 2, py // 2, px - px // 2, py - py // 2)
    arr = np.asarray(img, dtype=np.uint8)
    if px or py:
        # numpy's "symmetric" mode reflects again past the far edge, so any pad width works (torch's reflect
        # needs pad < size); it repeats the edge pixel, which keeps the border continuous.
        arr = np.pad(arr, ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), mode="symmetric")
    return arr, Placement("keep", (w, h), (nw, nh), (ww, wh), pad=pad)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    import torch

    arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1,1] B×3×H×W (or 3×H×W) → uint8 ...×H×W×3, rounding (spec: round((x+1)·127.5))."""
    import torch

    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return arr.movedim(-3, -1).numpy()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_images(
    root: Path | str,
    resolution: int | None,
    *,
    keep_going: bool = False,
    paths: list[Path] | None = None,
    fit: str = "crop",
    mixed: bool = False,
    grid: int = 64,
    exclude: Path | str | None = None,
) -> ImageSet:
    """Read a directory (or an explicit list of files) into an ImageSet.

    ``resolution=None`` keeps each image's own size (all images must then share one size). Otherwise
    ``fit`` says how the working copy is made (:func:`working_copy`; ``grid`` is the latent grid for
    ``keep``): ``crop`` (the default, the training verbs' square) and ``resize`` give one shape for the
    whole set, ``keep`` one shape per aspect (see :meth:`ImageSet.buckets`).
    A file that cannot be read raises :class:`InputError` naming it, unless ``keep_going``: then it
    is recorded in ``failures`` and skipped.
    """
    import torch

    files, base = (paths, names_base(root)) if paths is not None else input_files(root, exclude)
    root = Path(root)
    if not files:
        raise InputError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    items, tensors, failures = [], [], []
    for path in files:
        try:
            img = load_pil(path)
            size, placement = img.size, None
            if resolution is not None:
                try:
                    img, placement = working_copy(img, resolution, fit, grid)
                except ValueError as exc:
                    raise InputError(f"cannot use image {path}: {exc}") from None
            tensors.append(pil_to_tensor(img))
        except InputError as exc:
            if not keep_going:
                raise
            failures.append((path, str(exc)))
            continue
        rel = path.relative_to(base) if path.is_relative_to(base) else Path(path.name)
        items.append(ImageItem(str(rel.with_suffix("")), path, size, file_sha256(path), placement))
    if not items:
        raise InputError(f"none of the {len(files)} images in {root} could be read")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1 and resolution is None and not mixed:
        raise InputError(f"images in {root} differ in size {sorted(shapes)}; pass --resolution to resize them")
    return ImageSet(items, tensors, failures)


def output_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.png"


EXIF_ORIENTATION = 0x0112
# Tags that describe how a TIFF stores its pixels (a TIFF's EXIF is its own first IFD): copied into a PNG they
# would claim the source's layout and size (ImageWidth/ImageLength of the unrotated image, strip offsets into
# a file that is not there). Also XMP (700), which --keep-metadata does not keep from any format, and the ICC
# profile tag (34675), kept as the PNG's own iCCP chunk instead.
LAYOUT_TAGS = frozenset({256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325,
                         330, 338, 339, 347, 513, 514, 700, 34675})
EXIF_IFD, PIXEL_X_DIMENSION, PIXEL_Y_DIMENSION = 0x8769, 0xA002, 0xA003


def source_metadata(path: Path) -> dict:
    """PNG save arguments that carry one source file's metadata over to its output (``--keep-metadata``).

    Kept: EXIF (GPS and camera tags included: the user asked for it) with Orientation reset to 1, because
    the pixels were turned upright when read (and the recorded pixel size made the upright one), less a
    TIFF's pixel-layout tags (:data:`LAYOUT_TAGS`); the ICC colour profile; the resolution (dpi); PNG text
    chunks. Not kept: XMP, JPEG comments, EXIF thumbnails (they would show the unprotected picture).
    """
    from PIL import PngImagePlugin

    try:
        with Image.open(path) as img:
            info = dict(img.info)
            exif = img.getexif()
            text = dict(getattr(img, "text", {}) or {})
            upright = img.size[::-1] if exif.get(EXIF_ORIENTATION) in (5, 6, 7, 8) else img.size
            sub_ifd = exif.get_ifd(EXIF_IFD) if EXIF_IFD in exif else {}
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read the metadata of {path}: {exc}") from None
    kwargs: dict = {}
    for tag in LAYOUT_TAGS & set(exif):
        del exif[tag]
    if len(exif):
        if EXIF_ORIENTATION in exif:
            exif[EXIF_ORIENTATION] = 1
        if PIXEL_X_DIMENSION in sub_ifd or PIXEL_Y_DIMENSION in sub_ifd:
            # The camera's pixel size of the unrotated image; the output is the upright photo.
            sub_ifd[PIXEL_X_DIMENSION], sub_ifd[PIXEL_Y_DIMENSION] = upright
        exif_bytes = exif.tobytes()  # IFD0 (+ Exif/GPS sub-IFDs); the IFD1 thumbnail is not written
        kwargs["exif"] = exif_bytes
    if info.get("icc_profile"):
        kwargs["icc_profile"] = info["icc_profile"]
    if "dpi" in info:
        kwargs["dpi"] = tuple(float(v) for v in info["dpi"])
    if text:
        chunks = PngImagePlugin.PngInfo()
        for key, value in text.items():
            chunks.add_text(str(key), str(value))
        kwargs["pnginfo"] = chunks
    return kwargs


def write_png(path: Path, pixels, *, force: bool = False, metadata: dict | None = None,
              alpha: np.ndarray | None = None) -> Path:
    """Write one image (a [-1,1] 3×H×W tensor or a uint8 H×W×3 array) atomically; with ``alpha`` (uint8 H×W,
    from :func:`source_alpha`) as RGBA.

    Metadata-free unless ``metadata`` (from :func:`source_metadata`) is given. The file gets the umask's
    permissions; a full or read-only disk is :class:`~cloak.errors.OutputError` (exit 3) naming the path,
    and no partial file is left (cloak.io.output.write_atomic).
    """
    from cloak.io.output import write_atomic

    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists", hint="pass --force to overwrite, or --resume to skip finished items")
    arr = pixels if isinstance(pixels, np.ndarray) else to_uint8(pixels)
    # A fresh Image carries no EXIF/GPS/text chunks: metadata is stripped by construction.
    image = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if alpha is not None:
        if alpha.shape != arr.shape[:2]:
            raise ValueError(f"alpha of shape {alpha.shape} for an image of {arr.shape[:2]}")
        image.putalpha(Image.fromarray(np.ascontiguousarray(alpha), "L"))
    return write_atomic(path, lambda fh: image.save(fh, format="PNG", **(metadata or {})))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    from cloak.io.output import write_atomic

    write_atomic(Path(path), lambda fh: fh.write(data))
