"""Resize / Upsample and Pad: ops that change the positions, alike on every channel.

Resize with scales passes the channels when the channel scale is 1; with constant sizes, when
the channel entry states the channel count (it shrinks with the group); with computed sizes
(`F.interpolate(x, size=...)` exports `Concat(Shape(x)[0:2], size)`), when the channel entry is
read from the Resize's own input's shape: it follows the pruned input at run time. Pad passes
them when the channel axis gets no padding; it commutes with a rotation when it pads with zeros.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.flow import (
    State,
    Step,
    block,
    channel_count,
    const,
    count_edit,
    parameter_input,
    rank_of,
    through,
)
from onnxprune.ops.registry import Handler, register
from onnxprune.ops.shape_values import vector_source
from onnxprune.ops.torch_support import from_input_or_attr, ints, opt, torch_pads

if TYPE_CHECKING:
    from torch import Tensor

    from onnxprune.ops.torch_support import OpNode, Result, TorchOp


@register("Resize", "Upsample")
class Resize(Handler):
    """Resize / Upsample over the positions of an NCHW tensor."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        if len(node.inputs) > 3 and node.inputs[3].name:
            return _sizes(node, state)
        scales = const(node, 2) if len(node.inputs) > 2 and node.inputs[2].name else None
        if scales is not None and scales.size and scales.reshape(-1)[state.axis] != 1:
            return block(f"Resize '{node.name}' scales the channel axis")
        if state.axis != 1:
            return block(f"Resize '{node.name}' on a non-NCHW tensor")
        return through(node, state)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return None

    def scales_along(self, node: gs.Node, index: int) -> bool:
        return True

    def torch(self, op_type: str) -> TorchOp | None:
        return _resize if op_type == "Resize" else None


@register("Pad")
class Pad(Handler):
    """Pad with constant pads that leave the channel axis alone."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        pads = node.attrs.get("pads")
        if pads is None:
            pads = const(node, 1)
        rank = rank_of(node.inputs[0])
        if pads is None or rank is None:
            return block(f"Pad '{node.name}' has non-constant pads")
        pads = list(np.asarray(pads).reshape(-1))
        axes = const(node, 3) if len(node.inputs) > 3 and node.inputs[3].name else None
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
        if state.axis in axes:
            where = axes.index(state.axis)
            if pads[where] != 0 or pads[where + len(axes)] != 0:
                return block(f"Pad '{node.name}' pads the channel axis")
        return through(node, state)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        """Padding with zeros (or by reflection, edge or wrap) commutes; a nonzero constant
        is not rotated along."""
        mode = node.attrs.get("mode", "constant")
        value = const(node, 2) if len(node.inputs) > 2 and node.inputs[2].name else None
        zero = value is None or not np.any(value)
        if mode != "constant" or zero:
            return None
        return f"Pad '{node.name}' pads with a nonzero constant"

    def torch(self, op_type: str) -> TorchOp | None:
        return _pad


def _sizes(node: gs.Node, state: State) -> Step:
    """Explicit sizes: a constant channel entry must state C, and shrinks with the group; a
    computed one must read the channel count from the Resize's own input at run time."""
    sizes, rank = const(node, 3), rank_of(node.inputs[0])
    if rank is None:
        return block(f"Resize '{node.name}' has an unknown rank")
    axes = [int(a) % rank for a in node.attrs.get("axes", range(rank))]
    if state.axis not in axes:
        return through(node, state)
    entry = axes.index(state.axis)
    if sizes is None:
        if vector_source(node.inputs[3], entry) == (node.inputs[0], state.axis):
            return through(node, state)
        return block(f"Resize '{node.name}' computes the channel entry of its sizes elsewhere")
    if int(sizes.reshape(-1)[entry]) != channel_count(node, state.axis):
        return block(f"Resize '{node.name}' resizes the channel axis")
    return through(node, state, edits=[count_edit(node, 3, entry, state)])


# ------------------------------------------------------------ torch equivalents


def _pad(n: OpNode, xs: list) -> Result:
    """Pad (constant/reflect/edge/wrap) with pads/value/axes as inputs or older attributes."""
    import torch.nn.functional as F

    x, r = xs[0], xs[0].dim()
    pads = from_input_or_attr(n, xs, 1, "pads")
    value = opt(xs, 2)
    value = float(value.item()) if value is not None and value.numel() else n.get("value", 0.0)
    axes = [a % r for a in (ints(xs[3]) if opt(xs, 3) is not None else range(r))]
    full = [0] * (2 * r)
    for i, a in enumerate(axes):
        full[a], full[a + r] = pads[i], pads[i + len(axes)]
    mode = n.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, torch_pads(full), value=value)
    first = min((a for a in range(r) if full[a] or full[a + r]), default=r)
    if first == r:
        return x
    if r - first > 3 or mode not in ("reflect", "edge", "wrap"):
        raise n.unsupported(f"mode {mode} over {r - first} trailing axes")
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    tail = full[first:r] + full[r + first :]
    y = F.pad(x.reshape(-1, *x.shape[first:]), torch_pads(tail), mode=torch_mode)
    return y.reshape(*x.shape[:first], *y.shape[1:])


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
    import torch

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
    scales, sizes = (opt(xs, 1), None) if n.opset < 11 else (opt(xs, 2), opt(xs, 3))
    axes = [a % r for a in n.get("axes", range(r))]
    size_in = [x.shape[a] for a in axes]
    if sizes is not None and sizes.numel():
        outs = ints(sizes)
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
