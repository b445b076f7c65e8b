"""A small ONNX interpreter in torch: the face-recognition graphs cloak attacks, made differentiable.

onnxruntime computes no input gradients, so an attack on an ONNX recognizer (insightface's
``w600k_r50.onnx`` in DLADiff layer 2) evaluates the same graph with torch operators instead. Only the
operators of ArcFace-style recognizers are supported — Conv, BatchNormalization, PRelu, Relu, Sigmoid,
Add/Sub/Mul/Div, Flatten, Reshape (constant shape), Gemm, MatMul, Identity, Dropout, Constant — and a graph
with any other operator is refused by name rather than approximated. Tests compare every supported
operator against onnxruntime on random weights (tests/test_faceid_embedder.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from cloak.errors import ModelUnavailableError

SUPPORTED = frozenset({"Conv", "BatchNormalization", "PRelu", "Relu", "Sigmoid", "Add", "Sub", "Mul", "Div",
                       "Flatten", "Reshape", "Gemm", "MatMul", "Identity", "Dropout", "Constant"})


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class OnnxGraphModule(torch.nn.Module):
    """``forward(x)`` evaluates a single-input, single-output ONNX graph with torch ops (differentiable in x).

    Weights become buffers (float32, frozen); ``.to(device)`` moves them like any module's."""

    def __init__(self, model):
        super().__init__()
        from onnx import numpy_helper

        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node} - SUPPORTED)
        if unsupported:
            raise ModelUnavailableError(f"cannot convert ONNX graph {graph.name!r} to torch: unsupported operators "
                                        f"{', '.join(unsupported)}")
        self._names: dict[str, str] = {}  # ONNX value name → buffer attribute
        for init in graph.initializer:
            self._constant(init.name, numpy_helper.to_array(init))
        initialised = {i.name for i in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in initialised]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ModelUnavailableError(f"expected one input and one output, got {len(inputs)} and "
                                        f"{len(graph.output)}")
        self.input_name, self.output_name = inputs[0], graph.output[0].name
        self._nodes: list[tuple[str, list[str], list[str], dict]] = []
        for node in graph.node:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                if "value" not in attrs:
                    raise ModelUnavailableError("only tensor-valued Constant nodes are supported")
                self._constant(node.output[0], numpy_helper.to_array(attrs["value"]))
                continue
            self._nodes.append((node.op_type, list(node.input), list(node.output), attrs))

    def _constant(self, name: str, array) -> None:
        attr = f"c{len(self._names)}"
        tensor = torch.from_numpy(array.copy())
        self.register_buffer(attr, tensor.float() if tensor.is_floating_point() else tensor, persistent=False)
        self._names[name] = attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {name: getattr(self, attr) for name, attr in self._names.items()}
        env[self.input_name] = x
        for op, inputs, outputs, attrs in self._nodes:
            args = [env[i] if i else None for i in inputs]
            env[outputs[0]] = _OPS[op](args, attrs)
        return env[self.output_name]


def _conv(args, attrs):
    x, w, b = (args + [None])[:3]
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ModelUnavailableError("Conv with auto_pad is not supported")
    dims = w.dim() - 2
    pads = list(attrs.get("pads", [0] * 2 * dims))
    begin, end = pads[:dims], pads[dims:]
    if begin != end:  # asymmetric: pad explicitly (F.pad takes the last axis first)
        x = F.pad(x, [p for pair in zip(reversed(begin), reversed(end)) for p in pair])
        begin = [0] * dims
    conv = F.conv2d if dims == 2 else F.conv1d
    return conv(x, w, b, stride=attrs.get("strides", 1), padding=begin, dilation=attrs.get("dilations", 1),
                groups=attrs.get("group", 1))


def _batch_norm(args, attrs):
    x, scale, bias, mean, var = args[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=attrs.get("epsilon", 1e-5))


def _flatten(args, attrs):
    x = args[0]
    axis = attrs.get("axis", 1) % max(x.dim(), 1)
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _reshape(args, attrs):
    x, shape = args[0], [int(v) for v in args[1].tolist()]
    if not attrs.get("allowzero", 0):  # 0 copies the input's size on that axis
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _gemm(args, attrs):
    a, b, c = (args + [None])[:3]
    a = a.transpose(0, 1) if attrs.get("transA", 0) else a
    b = b.transpose(0, 1) if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b)
    return out if c is None else out + attrs.get("beta", 1.0) * c


_OPS = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "PRelu": lambda a, _: torch.where(a[0] >= 0, a[0], a[0] * a[1]),
    "Relu": lambda a, _: torch.relu(a[0]),
    "Sigmoid": lambda a, _: torch.sigmoid(a[0]),
    "Add": lambda a, _: a[0] + a[1],
    "Sub": lambda a, _: a[0] - a[1],
    "Mul": lambda a, _: a[0] * a[1],
    "Div": lambda a, _: a[0] / a[1],
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Gemm": _gemm,
    "MatMul": lambda a, _: torch.matmul(a[0], a[1]),
    "Identity": lambda a, _: a[0],
    "Dropout": lambda a, _: a[0],  # inference: the identity
}


def load(path: Path) -> OnnxGraphModule:
    from cloak.models.insightface import import_onnx

    onnx = import_onnx()
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf decode errors have no common base class
        raise ModelUnavailableError(f"cannot read ONNX model {path}: {exc}") from None
    return OnnxGraphModule(model)
