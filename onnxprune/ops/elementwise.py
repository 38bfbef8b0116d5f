"""Binary elementwise ops (Add, Sub, Mul, Div, Max, Min, Pow).

With a constant operand the channels pass and the constant is sliced along them where it has a
channel axis. Two activations tie their producers into one group (a residual Add, an SE gate's
Mul: `couple`) unless the other operand has no channel axis (a spatial attention map), or is a
constant table's columns moved onto the channel axis (T5's position bias, `table_edit`). A Pow or
Mul that squares the channels and starts an RMSNorm pattern reads them only for the norm.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.flow import (
    AXIS_MOVES,
    State,
    Step,
    block,
    moved_from,
    rank_of,
    shape_of,
    through,
    with_param,
)
from onnxprune.ops.registry import Handler, register
from onnxprune.ops.rmsnorm import is_rms_end, rms_kind, rms_square
from onnxprune.ops.shape_values import is_one
from onnxprune.ops.torch_support import binary, variadic

if TYPE_CHECKING:
    from onnxprune.ops.torch_support import OpNode, Result, TorchOp


@register("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow")
class Elementwise(Handler):
    """Add/Sub/Mul/Div/...: with a constant operand (sliced per channel) or two activations."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if node.op in ("Pow", "Mul") and rms_square(node, state.tensor, state.axis):
            return Step("consume")  # the norm branch of an RMSNorm pattern: nothing to fold
        if len(node.inputs) != 2:
            return block(f"{node.op} '{node.name}' with {len(node.inputs)} inputs")
        other = 1 - index
        if isinstance(node.inputs[other], gs.Constant):
            return with_param(node, other, state, channels)
        out_rank, in_rank = rank_of(node.outputs[0]), rank_of(node.inputs[index])
        other_shape = shape_of(node.inputs[other])
        if out_rank is None or in_rank is None or other_shape is None:
            return block(f"{node.op} '{node.name}' has unknown shapes")
        if node.op == "Pow":
            return block(f"Pow '{node.name}' with a tensor exponent")
        axis = state.axis + out_rank - in_rank
        other_axis = axis - (out_rank - len(other_shape))
        if other_axis < 0 or is_one(node.inputs[other], other_axis):
            return through(node, state, axis=axis)  # e.g. a spatial attention map: channel-wise
        table = table_edit(node.inputs[other], other_axis, state, channels)
        if node.op in ("Add", "Sub") and table is not None:
            return through(node, state, axis=axis, edits=[table])  # T5's position bias
        return through(node, state, axis=axis, couple=True)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        """Sums of channels rotated alike, per-channel additive constants (rotated along) and
        scalings that are the same for every channel commute; the rest does not."""
        what = f"{node.op} '{node.name}'"
        if node.op not in ("Add", "Sub", "Mul", "Div"):
            return f"{what} is not rotation-equivariant"
        other = node.inputs[1 - index]
        if node.op in ("Add", "Sub"):
            if isinstance(other, gs.Constant):  # a per-channel constant is rotated along
                uniform = not result.edits and np.any(other.values)
                return f"{what} adds the same constant to every channel" if uniform else None
            return None if result.couple else f"{what} adds a tensor that is not rotated alike"
        if node.op == "Div" and index != 0:
            return f"{what} divides by the channels"
        if result.couple:
            return f"{what} multiplies two channel tensors elementwise"
        if isinstance(other, gs.Constant) and result.edits:
            return f"{what} scales each channel differently"
        return None  # a scalar, or a per-position map (e.g. an RMS denominator)

    def invariant(self, node: gs.Node, state: State) -> str | None:
        """The Div/Mul that completes an RMSNorm pattern of the channels."""
        if node.op in ("Div", "Mul") and is_rms_end(node, state.tensor, state.axis):
            return rms_kind(node, state.tensor)
        return None

    def scales_along(self, node: gs.Node, index: int) -> bool:
        """Scaling by a constant (or dividing the channels by one) scales the output alike."""
        constant = [isinstance(t, gs.Constant) for t in node.inputs]
        return (node.op == "Mul" and any(constant)) or (
            node.op == "Div" and index == 0 and constant[1]
        )

    def torch(self, op_type: str) -> TorchOp | None:
        import torch

        return {
            "Add": binary(torch.add),
            "Sub": binary(torch.sub),
            "Mul": binary(torch.mul),
            "Div": _div,
            "Pow": binary(torch.pow),
            "Max": variadic(torch.maximum),
            "Min": variadic(torch.minimum),
        }[op_type]


def table_edit(tensor: gs.Tensor, axis: int, state: State, channels: int) -> ParamEdit | None:
    """The edit of a constant table whose columns become axis `axis` of `tensor` by data
    movement alone: rows Gathered by computed indices, then Transposes, Unsqueezes, Squeezes,
    each tensor read once (T5's relative position bias: a (buckets, heads) table Gathered by
    bucket, permuted to (1, heads, queries, keys)). Added to the channels, the table is a
    per-channel parameter like a constant's: its columns are sliced with them. None for any
    other tensor."""
    while tensor.inputs and tensor.inputs[0].op in AXIS_MOVES and len(tensor.outputs) == 1:
        node = tensor.inputs[0]
        axis = moved_from(node, axis)
        if axis is None:
            return None
        tensor = node.inputs[0]
    gather = tensor.inputs[0] if tensor.inputs else None
    if gather is None or gather.op != "Gather" or len(tensor.outputs) != 1:
        return None
    table, indices = gather.inputs
    rank = rank_of(indices)
    if not isinstance(table, gs.Constant) or isinstance(indices, gs.Constant) or rank is None:
        return None
    along = gather.attrs.get("axis", 0) % table.values.ndim
    if along <= axis < along + rank or len(table.outputs) != 1:
        return None  # the channels on the gathered (index) axes, or the table read elsewhere
    column = axis if axis < along else axis - rank + 1
    total = table.values.shape[column]
    if total % state.spatial or total // state.spatial < state.offset + channels:
        return None
    return ParamEdit(gather.name, 0, column, state.offset, "chan", state.spatial)


@register("Sum", "Mean")
class Variadic(Handler):
    """Sum and Mean of any number of inputs: interpreted, not analyzed (channels block)."""

    def torch(self, op_type: str) -> TorchOp | None:
        import torch

        return variadic(torch.add) if op_type == "Sum" else _mean


# ------------------------------------------------------------ torch equivalents


def _mean(n: OpNode, xs: list) -> Result:
    """Elementwise mean of all inputs with broadcasting."""
    import torch

    return functools.reduce(torch.add, xs) / len(xs)


def _div(n: OpNode, xs: list) -> Result:
    """Division; integer inputs truncate like C++ (and ONNX Runtime)."""
    import torch

    a, b = xs
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")
