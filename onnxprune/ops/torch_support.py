"""The interpreter's side of a handler: the node description its torch equivalent receives,
and the helpers those equivalents share (measure/cost's counterpart for calib/torch_exec.py).

A handler's `torch(op_type)` returns a function `fn(n: OpNode, xs) -> tensor or tuple` taking
the node description and the positional inputs (None for an omitted optional input).
Semantics follow ai.onnx opsets 11-21; where an attribute became an input across opsets (Clip,
Split, Squeeze, Unsqueeze, Reduce*, Pad, Slice) the input wins when present and the attribute is
the fallback, so both forms work. Floats are float32, integers int64, so shape arithmetic is
exact and autograd sees one float type. torch is imported inside the functions that use it, so
the analyzer and the cost model, which import the handlers, stay torch-free.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxprune.errors import UnsupportedOpError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    Result = Tensor | tuple[Tensor, ...]
    TorchOp = Callable[["OpNode", list], Result]


_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


_INT_TYPES = {
    getattr(onnx.TensorProto, f"{kind}INT{bits}") for kind in ("", "U") for bits in (8, 16, 32, 64)
}


@dataclass(frozen=True)
class OpNode:
    """What an op function needs from its node: type, name, parsed attributes, opset, arity."""

    op_type: str
    name: str
    attrs: dict[str, Any]
    opset: int
    n_outputs: int

    def get(self, key: str, default: Any = None) -> Any:
        """Attribute value, or `default` when the node does not set it."""
        return self.attrs.get(key, default)

    def unsupported(self, what: str) -> UnsupportedOpError:
        """Error for a variant of a known op that the interpreter does not implement."""
        return UnsupportedOpError(
            f"{self.op_type} node '{self.name}': {what} is not supported by the torch interpreter"
        )


def torch_dtype(onnx_type: int) -> torch.dtype:
    """Interpreter dtype for an ONNX element type: float32, bool or int64."""
    import torch

    if onnx_type in _FLOAT_TYPES:
        return torch.float32
    if onnx_type == onnx.TensorProto.BOOL:
        return torch.bool
    if onnx_type in _INT_TYPES:
        return torch.int64
    name = onnx.TensorProto.DataType.Name(onnx_type)
    raise UnsupportedOpError(f"element type {name} is not supported by the torch interpreter")


def to_tensor(arr: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """Copy a numpy array into a torch tensor with the interpreter's dtype convention."""
    import torch

    arr = np.asarray(arr)
    if arr.dtype.kind == "f" or arr.dtype.kind == "V":
        arr = arr.astype(np.float32)
    elif arr.dtype.kind in "iu":
        arr = arr.astype(np.int64)
    elif arr.dtype.kind != "b":
        raise UnsupportedOpError(
            f"tensors of dtype {arr.dtype} are not supported by the torch interpreter"
        )
    return torch.from_numpy(np.array(arr, copy=True)).to(device)


def parse_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """Attributes as Python values; strings decoded, tensors as numpy arrays."""
    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = onnx.numpy_helper.to_array(value)
        out[attr.name] = value
    return out


def constant_value(n: OpNode) -> np.ndarray:
    """Value of a Constant node from whichever value* attribute it carries."""
    for key, dtype in (
        ("value", None),
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if key in n.attrs:
            return np.asarray(n.attrs[key], dtype=dtype)
    raise n.unsupported(f"attribute {sorted(n.attrs)}")


def opt(xs: Sequence[Tensor | None], i: int) -> Tensor | None:
    """Optional input i, None when omitted or empty-named."""
    return xs[i] if len(xs) > i else None


def ints(t: Tensor) -> list[int]:
    """A shape/axes tensor as a list of Python ints."""
    return [int(v) for v in t.reshape(-1).tolist()]


def from_input_or_attr(n: OpNode, xs: Sequence[Tensor | None], i: int, attr: str) -> Any:
    """Value given as input i (newer opsets) or as attribute `attr` (older opsets)."""
    t = opt(xs, i)
    return ints(t) if t is not None else n.get(attr)


def torch_pads(pads: Sequence[int]) -> list[int]:
    """ONNX [b1..bk, e1..ek] pads over the last k dims → F.pad order (last dim first)."""
    k = len(pads) // 2
    return [p for i in reversed(range(k)) for p in (pads[i], pads[i + k])]


def _spatial_pads(
    n: OpNode,
    shape: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[int]:
    """Explicit pads with auto_pad (SAME_UPPER/SAME_LOWER/VALID) resolved for this input."""
    k = len(kernel)
    auto = n.get("auto_pad", "NOTSET")
    if auto == "VALID":
        return [0] * (2 * k)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        return list(n.get("pads", [0] * (2 * k)))
    begins, ends = [], []
    for size, ks, s, d in zip(shape[2:], kernel, strides, dilations, strict=True):
        total = max(0, (-(-size // s) - 1) * s + (ks - 1) * d + 1 - size)
        begin = total // 2 if auto == "SAME_UPPER" else total - total // 2
        begins.append(begin)
        ends.append(total - begin)
    return begins + ends


def geometry(n: OpNode, x: Tensor, kernel: Sequence[int]) -> tuple[list, list, list]:
    """strides, dilations and explicit pads of a conv/pool node.

    Pools size SAME pads for the undilated kernel, as ONNX Runtime does; convs use the dilated one.
    """
    k = len(kernel)
    strides = list(n.get("strides", [1] * k))
    dilations = list(n.get("dilations", [1] * k))
    pad_dilations = dilations if n.op_type in ("Conv", "ConvTranspose") else [1] * k
    return strides, dilations, _spatial_pads(n, x.shape, kernel, strides, pad_dilations)


def native_pads(pads: Sequence[int], limits: Sequence[int]) -> bool:
    """True when torch can pad itself: symmetric and within its per-dim limit."""
    k = len(pads) // 2
    return pads[:k] == pads[k:] and all(p <= lim for p, lim in zip(pads[:k], limits, strict=True))


def unary(fn: Callable[[Tensor], Tensor]) -> Callable[[OpNode, list], Result]:
    """Wrap a one-input torch function as an op."""
    return lambda n, xs: fn(xs[0])


def binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[OpNode, list], Result]:
    """Wrap a two-input broadcasting torch function as an op."""
    return lambda n, xs: fn(xs[0], xs[1])


def variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[OpNode, list], Result]:
    """Fold a broadcasting binary function over all inputs (Min, Max, Sum)."""
    return lambda n, xs: functools.reduce(fn, xs)
