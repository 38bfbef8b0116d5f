"""ONNX op table for the torch interpreter: one small function per op (or op family).

Each op takes its node description `n` and the positional inputs (None for an omitted optional
input) and returns one tensor or a tuple of tensors. Semantics follow ai.onnx opsets 11-21; where
an attribute became an input across opsets (Clip, Split, Squeeze, Unsqueeze, Reduce*, Pad, Slice)
the input wins when present and the attribute is the fallback, so both forms work. Floats are
float32, integers int64, so shape arithmetic is exact and autograd sees one float type.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from onnxprune.calib.torch_recurrent import RECURRENT_OPS
from onnxprune.errors import UnsupportedOpError

Tensor = torch.Tensor
Result = Tensor | tuple[Tensor, ...]

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


def _opt(xs: Sequence[Tensor | None], i: int) -> Tensor | None:
    """Optional input i, None when omitted or empty-named."""
    return xs[i] if len(xs) > i else None


def _ints(t: Tensor) -> list[int]:
    """A shape/axes tensor as a list of Python ints."""
    return [int(v) for v in t.reshape(-1).tolist()]


def _from_input_or_attr(n: OpNode, xs: Sequence[Tensor | None], i: int, attr: str) -> Any:
    """Value given as input i (newer opsets) or as attribute `attr` (older opsets)."""
    t = _opt(xs, i)
    return _ints(t) if t is not None else n.get(attr)


# ---------------------------------------------------------------- convolution and pooling


def _torch_pads(pads: Sequence[int]) -> list[int]:
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


def _geometry(n: OpNode, x: Tensor, kernel: Sequence[int]) -> tuple[list, list, list]:
    """strides, dilations and explicit pads of a conv/pool node.

    Pools size SAME pads for the undilated kernel, as ONNX Runtime does; convs use the dilated one.
    """
    k = len(kernel)
    strides = list(n.get("strides", [1] * k))
    dilations = list(n.get("dilations", [1] * k))
    pad_dilations = dilations if n.op_type in ("Conv", "ConvTranspose") else [1] * k
    return strides, dilations, _spatial_pads(n, x.shape, kernel, strides, pad_dilations)


def _native_pads(pads: Sequence[int], limits: Sequence[int]) -> bool:
    """True when torch can pad itself: symmetric and within its per-dim limit."""
    k = len(pads) // 2
    return pads[:k] == pads[k:] and all(p <= lim for p, lim in zip(pads[:k], limits, strict=True))


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _conv(n: OpNode, xs: list) -> Result:
    """Conv with groups, strides, dilations and (a)symmetric or auto pads."""
    x, w, b = xs[0], xs[1], _opt(xs, 2)
    kernel = list(w.shape[2:])
    k = len(kernel)
    if k not in _CONV:
        raise n.unsupported(f"{k}-d convolution")
    strides, dilations, pads = _geometry(n, x, kernel)
    padding: list[int] | int = pads[:k]
    if pads[:k] != pads[k:]:
        x, padding = F.pad(x, _torch_pads(pads)), 0
    return _CONV[k](x, w, b, strides, padding, dilations, n.get("group", 1))


def _conv_transpose_pads(
    n: OpNode, x: Tensor, full: Sequence[int], out_pad: Sequence[int], strides: Sequence[int]
) -> list[int]:
    """Crop amounts [b..., e...] that turn the full transposed-conv output into the ONNX one."""
    k = len(full)
    auto = n.get("auto_pad", "NOTSET")
    target = n.get("output_shape")
    if target is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [size * s for size, s in zip(x.shape[2:], strides, strict=True)]
    if target is None:
        return [0] * (2 * k) if auto == "VALID" else list(n.get("pads", [0] * (2 * k)))
    target = list(target)[-k:]
    total = [f + o - t for f, o, t in zip(full, out_pad, target, strict=True)]
    if auto == "SAME_UPPER":
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    return [t - t // 2 for t in total] + [t // 2 for t in total]


def _conv_transpose(n: OpNode, xs: list) -> Result:
    """ConvTranspose: full transposed conv, then output_padding and pads applied as a crop."""
    x, w, b = xs[0], xs[1], _opt(xs, 2)
    k = w.dim() - 2
    if k not in _CONV_T:
        raise n.unsupported(f"{k}-d transposed convolution")
    strides = list(n.get("strides", [1] * k))
    dilations = list(n.get("dilations", [1] * k))
    out_pad = list(n.get("output_padding", [0] * k))
    y = _CONV_T[k](x, w, None, strides, 0, 0, n.get("group", 1), dilations)
    pads = _conv_transpose_pads(n, x, list(y.shape[2:]), out_pad, strides)
    crop = [-p for p in pads[:k]] + [o - p for o, p in zip(out_pad, pads[k:], strict=True)]
    if any(crop):
        y = F.pad(y, _torch_pads(crop))
    return y if b is None else y + b.reshape(1, -1, *[1] * k)


def _max_pool(n: OpNode, xs: list) -> Result:
    """MaxPool with pads, dilations and ceil_mode; the Indices output is not provided."""
    x, kernel = xs[0], list(n.get("kernel_shape"))
    k = len(kernel)
    strides, dilations, pads = _geometry(n, x, kernel)
    ceil = bool(n.get("ceil_mode", 0))
    if _native_pads(pads, [ks // 2 for ks in kernel]):
        return _MAX_POOL[k](x, kernel, strides, pads[:k], dilations, ceil)
    x = F.pad(x, _torch_pads(pads), value=-math.inf)
    return _MAX_POOL[k](x, kernel, strides, 0, dilations, ceil)


def _avg_pool(n: OpNode, xs: list) -> Result:
    """AveragePool; count_include_pad decides whether padded cells count in the divisor."""
    x, kernel = xs[0], list(n.get("kernel_shape"))
    k = len(kernel)
    strides, dilations, pads = _geometry(n, x, kernel)
    if any(d != 1 for d in dilations):
        raise n.unsupported("dilations")
    ceil, include = bool(n.get("ceil_mode", 0)), bool(n.get("count_include_pad", 0))
    if _native_pads(pads, [ks // 2 for ks in kernel]):
        return _AVG_POOL[k](x, kernel, strides, pads[:k], ceil, include)
    # Asymmetric or oversized pads: ratio of window sums of data and of a validity mask.
    tp = _torch_pads(pads)
    mask = F.pad(x.new_ones((1, 1, *x.shape[2:])), tp, value=1.0 if include else 0.0)
    total = _AVG_POOL[k](F.pad(x, tp), kernel, strides, 0, ceil, True)
    return total / _AVG_POOL[k](mask, kernel, strides, 0, ceil, True)


def _global_avg_pool(n: OpNode, xs: list) -> Result:
    """Mean over all spatial dims, kept as size-1 dims."""
    return xs[0].mean(dim=tuple(range(2, xs[0].dim())), keepdim=True)


def _global_max_pool(n: OpNode, xs: list) -> Result:
    """Max over all spatial dims, kept as size-1 dims."""
    return xs[0].amax(dim=tuple(range(2, xs[0].dim())), keepdim=True)


# ------------------------------------------------------------------ dense and normalization


def _gemm(n: OpNode, xs: list) -> Result:
    """alpha * A' @ B' + beta * C."""
    a, b, c = xs[0], xs[1], _opt(xs, 2)
    a = a.t() if n.get("transA", 0) else a
    b = b.t() if n.get("transB", 0) else b
    y = a @ b
    alpha, beta = n.get("alpha", 1.0), n.get("beta", 1.0)
    y = y if alpha == 1.0 else y * alpha
    if c is None:
        return y
    return y + (c if beta == 1.0 else c * beta)


def _batch_norm(n: OpNode, xs: list) -> Result:
    """Inference BatchNormalization written out so every input (stats included) gets a grad."""
    if n.get("training_mode", 0):
        raise n.unsupported("training_mode=1")
    x, scale, bias, mean, var = xs[:5]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale * torch.rsqrt(var + n.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _layer_norm(n: OpNode, xs: list) -> Result:
    """LayerNormalization over dims axis..-1 with broadcastable scale and bias."""
    x, scale, bias = xs[0], xs[1], _opt(xs, 2)
    shape = tuple(x.shape[n.get("axis", -1) % x.dim() :])
    scale = scale if tuple(scale.shape) == shape else scale.expand(shape)
    bias = bias if bias is None or tuple(bias.shape) == shape else bias.expand(shape)
    return F.layer_norm(x, shape, scale, bias, n.get("epsilon", 1e-5))


def _instance_norm(n: OpNode, xs: list) -> Result:
    """InstanceNormalization with per-channel scale and bias."""
    return F.instance_norm(xs[0], weight=xs[1], bias=xs[2], eps=n.get("epsilon", 1e-5))


def _softmax_family(fn: Callable[[Tensor, int], Tensor]) -> Callable[[OpNode, list], Result]:
    """Softmax/LogSoftmax: opset >= 13 acts on one axis, older opsets on the 2-D coercion."""

    def op(n: OpNode, xs: list) -> Result:
        x = xs[0]
        if n.opset >= 13:
            return fn(x, n.get("axis", -1))
        axis = n.get("axis", 1) % max(x.dim(), 1)
        return fn(x.reshape(math.prod(x.shape[:axis]), -1), -1).reshape(x.shape)

    return op


# --------------------------------------------------------------------- elementwise


def _unary(fn: Callable[[Tensor], Tensor]) -> Callable[[OpNode, list], Result]:
    """Wrap a one-input torch function as an op."""
    return lambda n, xs: fn(xs[0])


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[OpNode, list], Result]:
    """Wrap a two-input broadcasting torch function as an op."""
    return lambda n, xs: fn(xs[0], xs[1])


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[OpNode, list], Result]:
    """Fold a broadcasting binary function over all inputs (Min, Max, Sum)."""
    return lambda n, xs: functools.reduce(fn, xs)


def _mean(n: OpNode, xs: list) -> Result:
    """Elementwise mean of all inputs with broadcasting."""
    return functools.reduce(torch.add, xs) / len(xs)


def _div(n: OpNode, xs: list) -> Result:
    """Division; integer inputs truncate like C++ (and ONNX Runtime)."""
    a, b = xs
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _clip(n: OpNode, xs: list) -> Result:
    """Clip with min/max as inputs (opset >= 11) or attributes (older)."""
    x = xs[0]
    lo, hi = _opt(xs, 1), _opt(xs, 2)
    lo = lo if lo is not None or n.get("min") is None else x.new_tensor(n.get("min"))
    hi = hi if hi is not None or n.get("max") is None else x.new_tensor(n.get("max"))
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


def _leaky_relu(n: OpNode, xs: list) -> Result:
    """LeakyRelu with attribute alpha (default 0.01)."""
    return F.leaky_relu(xs[0], n.get("alpha", 0.01))


def _prelu(n: OpNode, xs: list) -> Result:
    """PRelu with a slope that broadcasts to X."""
    x, slope = xs
    return torch.where(x < 0, x * slope, x)


def _elu(n: OpNode, xs: list) -> Result:
    """Elu with attribute alpha."""
    return F.elu(xs[0], n.get("alpha", 1.0))


def _hard_sigmoid(n: OpNode, xs: list) -> Result:
    """max(0, min(1, alpha * x + beta))."""
    return torch.clamp(xs[0] * n.get("alpha", 0.2) + n.get("beta", 0.5), 0.0, 1.0)


def _gelu(n: OpNode, xs: list) -> Result:
    """Gelu (opset 20) with approximate none/tanh."""
    return F.gelu(xs[0], approximate=n.get("approximate", "none"))


def _where(n: OpNode, xs: list) -> Result:
    """Elementwise select with broadcasting."""
    return torch.where(xs[0].bool(), xs[1], xs[2])


# ------------------------------------------------------------------------- reductions


def _reduce(
    fn: Callable[[Tensor, list[int], bool], Tensor], noop: Callable[[Tensor], Tensor] = lambda x: x
) -> Callable[[OpNode, list], Result]:
    """Reduce* with axes as input (ReduceSum >= 13, others >= 18) or attribute.

    With empty axes and noop_with_empty_axes=1 only the elementwise part (`noop`) is applied, as
    ONNX Runtime does (ReduceL1/L2 give |x|, ReduceSumSquare gives x**2).
    """

    def op(n: OpNode, xs: list) -> Result:
        x = xs[0]
        axes = _from_input_or_attr(n, xs, 1, "axes")
        if not axes:
            if n.get("noop_with_empty_axes", 0):
                return noop(x)
            axes = list(range(x.dim()))
        return fn(x, [a % x.dim() for a in axes], bool(n.get("keepdims", 1)))

    return op


def _reduce_prod(x: Tensor, axes: list[int], keep: bool) -> Tensor:
    """Product over several axes (torch.prod takes one)."""
    for a in sorted(axes, reverse=True):
        x = x.prod(dim=a, keepdim=keep)
    return x


def _arg_extreme(fn: Callable[..., Tensor]) -> Callable[[OpNode, list], Result]:
    """ArgMax/ArgMin along one axis (first index on ties)."""

    def op(n: OpNode, xs: list) -> Result:
        if n.get("select_last_index", 0):
            raise n.unsupported("select_last_index=1")
        return fn(xs[0], dim=n.get("axis", 0), keepdim=bool(n.get("keepdims", 1)))

    return op


# ------------------------------------------------------------------- shape manipulation


def _flatten(n: OpNode, xs: list) -> Result:
    """2-D view: dims before axis, dims from axis on."""
    x = xs[0]
    axis = n.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reshape(n: OpNode, xs: list) -> Result:
    """Reshape; 0 copies the input dim unless allowzero=1, -1 is inferred."""
    x, shape = xs[0], _ints(xs[1])
    if not n.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(n: OpNode, xs: list) -> Result:
    """Permute dims; default perm reverses them."""
    x = xs[0]
    return x.permute(n.get("perm") or list(reversed(range(x.dim()))))


def _squeeze(n: OpNode, xs: list) -> Result:
    """Drop the given size-1 axes (input >= 13, attribute before), or all size-1 axes."""
    x = xs[0]
    axes = _from_input_or_attr(n, xs, 1, "axes")
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes))


def _unsqueeze(n: OpNode, xs: list) -> Result:
    """Insert size-1 axes at positions of the output (input >= 13, attribute before)."""
    x = xs[0]
    axes = _from_input_or_attr(n, xs, 1, "axes")
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _concat(n: OpNode, xs: list) -> Result:
    """Concatenate along axis."""
    return torch.cat([x for x in xs if x is not None], dim=n.get("axis"))


def _split(n: OpNode, xs: list) -> Result:
    """Split by sizes (input >= 13, attribute before) or into equal parts (num_outputs >= 18)."""
    x, axis = xs[0], n.get("axis", 0)
    sizes = _from_input_or_attr(n, xs, 1, "split")
    if not sizes:
        count, dim = n.get("num_outputs", n.n_outputs), x.shape[axis]
        chunk = -(-dim // count)
        sizes = [max(0, min(chunk, dim - i * chunk)) for i in range(count)]
    return tuple(torch.split(x, list(sizes), dim=axis))


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    """One axis of Slice with ONNX clamping; negative steps go through index_select."""
    dim = x.shape[axis]
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        bounds = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        index = [slice(None)] * axis + [bounds]
        return x[tuple(index)]
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    idx = torch.arange(start, end, step, device=x.device) if start > end else x.new_zeros(0).long()
    return x.index_select(axis, idx)


def _slice(n: OpNode, xs: list) -> Result:
    """Slice with starts/ends/axes/steps as inputs (opset >= 10) or attributes (older)."""
    x = xs[0]
    if len(xs) > 1:
        starts, ends = _ints(xs[1]), _ints(xs[2])
        axes = _ints(xs[3]) if _opt(xs, 3) is not None else None
        steps = _ints(xs[4]) if _opt(xs, 4) is not None else None
    else:
        starts, ends, axes, steps = n.get("starts"), n.get("ends"), n.get("axes"), None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        x = _slice_axis(x, axis % x.dim(), start, end, step)
    return x


def _gather(n: OpNode, xs: list) -> Result:
    """Gather along axis with (possibly negative, any-rank) indices."""
    x, idx = xs[0], xs[1].long()
    axis = n.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


def _gather_elements(n: OpNode, xs: list) -> Result:
    """GatherElements (torch.gather) with negative index support."""
    x, idx = xs[0], xs[1].long()
    axis = n.get("axis", 0) % x.dim()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


def _shape(n: OpNode, xs: list) -> Result:
    """Shape as int64, with the opset-15 start/end window (Python slice semantics)."""
    dims = list(xs[0].shape)[n.get("start", 0) : n.get("end")]
    return torch.tensor(dims, dtype=torch.int64, device=xs[0].device)


def _size(n: OpNode, xs: list) -> Result:
    """Element count as an int64 scalar."""
    return torch.tensor(xs[0].numel(), dtype=torch.int64, device=xs[0].device)


def _expand(n: OpNode, xs: list) -> Result:
    """Bidirectional broadcast of X against the requested shape."""
    x = xs[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(xs[1]))))


def _tile(n: OpNode, xs: list) -> Result:
    """Repeat X along each axis."""
    return xs[0].repeat(_ints(xs[1]))


def _pad(n: OpNode, xs: list) -> Result:
    """Pad (constant/reflect/edge/wrap) with pads/value/axes as inputs or older attributes."""
    x, r = xs[0], xs[0].dim()
    pads = _from_input_or_attr(n, xs, 1, "pads")
    value = _opt(xs, 2)
    value = float(value.item()) if value is not None and value.numel() else n.get("value", 0.0)
    axes = [a % r for a in (_ints(xs[3]) if _opt(xs, 3) is not None else range(r))]
    full = [0] * (2 * r)
    for i, a in enumerate(axes):
        full[a], full[a + r] = pads[i], pads[i + len(axes)]
    mode = n.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, _torch_pads(full), value=value)
    first = min((a for a in range(r) if full[a] or full[a + r]), default=r)
    if first == r:
        return x
    if r - first > 3 or mode not in ("reflect", "edge", "wrap"):
        raise n.unsupported(f"mode {mode} over {r - first} trailing axes")
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    tail = full[first:r] + full[r + first :]
    y = F.pad(x.reshape(-1, *x.shape[first:]), _torch_pads(tail), mode=torch_mode)
    return y.reshape(*x.shape[:first], *y.shape[1:])


# ---------------------------------------------------------------------------- Resize


def _source_coords(mode: str, out: int, size: int, scale: float) -> np.ndarray:
    """Input coordinate of each output index (float32, as ONNX Runtime computes it)."""
    x = np.arange(out, dtype=np.float32)
    s = np.float32(scale)
    if mode == "asymmetric":
        return x / s
    if mode == "align_corners":
        return x * np.float32((size - 1) / (out - 1)) if out > 1 else np.zeros_like(x)
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / s - 0.5 if out > 1 else np.zeros_like(x)
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / s
    if mode == "half_pixel_symmetric":
        adjust = np.float32(out / (scale * size))
        return np.float32(size / 2) * (1 - adjust) + (x + 0.5) / s - 0.5
    return (x + 0.5) / s - 0.5  # half_pixel


_NEAREST = {
    "round_prefer_floor": lambda c: np.ceil(c - 0.5),
    "floor": np.floor,
    "round_prefer_ceil": lambda c: np.floor(c + 0.5),
    "ceil": np.ceil,
}


def _resize_axis(n: OpNode, x: Tensor, axis: int, out: int, scale: float) -> Tensor:
    """Resize one axis by index selection (nearest) or two-tap interpolation (linear)."""
    size, mode = x.shape[axis], n.get("mode", "nearest")
    ctm = n.get("coordinate_transformation_mode", "half_pixel" if n.opset >= 11 else "asymmetric")
    coords = _source_coords(ctm, out, size, scale)
    if mode == "nearest":
        default = "round_prefer_floor" if n.opset >= 11 else "floor"
        rounding = _NEAREST[n.get("nearest_mode", default)]
        idx = np.clip(rounding(coords), 0, size - 1).astype(np.int64)
        return x.index_select(axis, torch.from_numpy(idx).to(x.device))
    if mode != "linear":
        raise n.unsupported(f"mode {mode}")
    coords = np.clip(coords, 0, size - 1)
    lo = np.floor(coords).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    w = torch.from_numpy((coords - lo).astype(np.float32)).to(x.device)
    w = w.reshape(-1, *[1] * (x.dim() - axis - 1))
    x_lo = x.index_select(axis, torch.from_numpy(lo).to(x.device))
    x_hi = x.index_select(axis, torch.from_numpy(hi).to(x.device))
    return x_lo + (x_hi - x_lo) * w


def _resize(n: OpNode, xs: list) -> Result:
    """Resize (nearest/linear) honouring scales or sizes, axes and the coordinate mode."""
    x, r = xs[0], xs[0].dim()
    if n.get("antialias", 0) or n.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        raise n.unsupported("antialias / tf_crop_and_resize")
    scales, sizes = (_opt(xs, 1), None) if n.opset < 11 else (_opt(xs, 2), _opt(xs, 3))
    axes = [a % r for a in n.get("axes", range(r))]
    size_in = [x.shape[a] for a in axes]
    if sizes is not None and sizes.numel():
        outs = _ints(sizes)
        factors = [o / s for o, s in zip(outs, size_in, strict=True)]
        policy = n.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            f = (min if policy == "not_larger" else max)(factors)
            factors, outs = [f] * len(axes), [math.floor(f * s + 0.5) for s in size_in]
    else:
        factors = [float(v) for v in scales.reshape(-1).tolist()]
        outs = [math.floor(s * f) for s, f in zip(size_in, factors, strict=True)]
    for a, out, f in zip(axes, outs, factors, strict=True):
        if out != x.shape[a] or f != 1.0:
            x = _resize_axis(n, x, a, out, f)
    return x


# --------------------------------------------------------------------- misc and constants


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


def _constant(n: OpNode, xs: list) -> Result:
    """Constant as a tensor (the graph precomputes these once)."""
    return to_tensor(constant_value(n))


def _constant_of_shape(n: OpNode, xs: list) -> Result:
    """Tensor of the given shape filled with the one-element `value` (default float 0)."""
    value = n.get("value")
    fill = to_tensor(np.zeros(1, np.float32) if value is None else value.reshape(-1)[:1])
    return torch.full(_ints(xs[0]), fill.item(), dtype=fill.dtype, device=xs[0].device)


def _range(n: OpNode, xs: list) -> Result:
    """start, start+delta, ... < limit with the inputs' dtype."""
    start, limit, delta = (t.item() for t in xs)
    return torch.arange(start, limit, delta, dtype=xs[0].dtype, device=xs[0].device)


def _cast(n: OpNode, xs: list) -> Result:
    """Cast to float32 / int64 / bool according to the target element type."""
    return xs[0].to(torch_dtype(n.get("to")))


def _dropout(n: OpNode, xs: list) -> Result:
    """Inference Dropout: identity, plus an all-true mask when the second output is used."""
    x = xs[0]
    return (x, torch.ones_like(x, dtype=torch.bool)) if n.n_outputs > 1 else x


def _einsum(n: OpNode, xs: list) -> Result:
    """Einstein summation with the node's equation."""
    return torch.einsum(n.get("equation"), *xs)


def _identity(n: OpNode, xs: list) -> Result:
    """Pass the input through."""
    return xs[0]


OPS: dict[str, Callable[[OpNode, list], Result]] = {
    **RECURRENT_OPS,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Einsum": _einsum,
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "Relu": _unary(torch.relu),
    "LeakyRelu": _leaky_relu,
    "PRelu": _prelu,
    "Elu": _elu,
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Clip": _clip,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _unary(F.hardswish),
    "Gelu": _gelu,
    "Softplus": _unary(F.softplus),
    "Erf": _unary(torch.erf),
    "Softmax": _softmax_family(torch.softmax),
    "LogSoftmax": _softmax_family(torch.log_softmax),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),
    "Sign": _unary(torch.sign),
    "Min": _variadic(torch.minimum),
    "Max": _variadic(torch.maximum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le),
    "GreaterOrEqual": _binary(torch.ge),
    "Not": _unary(torch.logical_not),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Where": _where,
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": _global_avg_pool,
    "GlobalMaxPool": _global_max_pool,
    "ReduceMean": _reduce(lambda x, a, k: x.mean(dim=a, keepdim=k)),
    "ReduceSum": _reduce(lambda x, a, k: x.sum(dim=a, keepdim=k)),
    "ReduceMax": _reduce(lambda x, a, k: x.amax(dim=a, keepdim=k)),
    "ReduceMin": _reduce(lambda x, a, k: x.amin(dim=a, keepdim=k)),
    "ReduceProd": _reduce(_reduce_prod),
    "ReduceL1": _reduce(lambda x, a, k: x.abs().sum(dim=a, keepdim=k), torch.abs),
    "ReduceL2": _reduce(lambda x, a, k: x.square().sum(dim=a, keepdim=k).sqrt(), torch.abs),
    "ReduceSumSquare": _reduce(lambda x, a, k: x.square().sum(dim=a, keepdim=k), torch.square),
    "ReduceLogSumExp": _reduce(lambda x, a, k: torch.logsumexp(x, dim=a, keepdim=k)),
    "ArgMax": _arg_extreme(torch.argmax),
    "ArgMin": _arg_extreme(torch.argmin),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "Shape": _shape,
    "Size": _size,
    "Expand": _expand,
    "Tile": _tile,
    "Pad": _pad,
    "Resize": _resize,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Cast": _cast,
    "Identity": _identity,
    "Dropout": _dropout,
}

#: Most outputs an op may have in use; other ops allow one. None means any number.
MAX_OUTPUTS: dict[str, int | None] = {"Split": None, "Dropout": 2, "LSTM": 3, "GRU": 2, "RNN": 2}
