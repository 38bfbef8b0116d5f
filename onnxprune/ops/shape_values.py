"""Axes of size one that shape inference cannot see.

transformers' attention masks reach the scores through `mask.expand(batch, 1, tgt, src)`, which
the legacy exporter writes as Expand with a target computed at run time:
`Where(Equal(t, -1), 1, t)` over a Concat of shape pieces and a constant -1. ONNX shape
inference leaves every axis of the result symbolic, so the mask looks like it has a head axis
and the Add that applies it would tie the heads to it. The entries of such targets that only
constants decide are evaluated here, exactly, op by op; anything else is unknown.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.flow import shape_of

_ELEMENTWISE = frozenset(
    {"Where", "Cast", "Not", "And", "Or", "Equal", "Add", "Sub", "Mul", "Div", "Neg"}
)


def is_one(tensor: gs.Tensor, axis: int) -> bool:
    """True when axis `axis` (negative: from the end) of `tensor` has size 1 at run time: stated
    by shape inference, or proven through Expand (input axis 1, target entry 1) and elementwise
    ops whose every input has that axis of size 1 or lacks it (broadcast)."""
    shape = shape_of(tensor)
    if shape is None or not -len(shape) <= axis < len(shape):
        return False
    if shape[axis] == 1:
        return True
    axis %= len(shape)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None:
        return False
    back = axis - len(shape)  # the same axis counted from the end, as broadcasting aligns
    if producer.op == "Expand":
        entry = entry_value(producer.inputs[1], len(shape) + back)
        return entry == 1 and _one_or_absent(producer.inputs[0], back)
    if producer.op in _ELEMENTWISE:
        return all(_one_or_absent(t, back) for t in producer.inputs)
    return False


def entry_value(tensor: gs.Tensor, index: int) -> int | None:
    """Entry `index` of the 1-D integer (or boolean) tensor `tensor` when constants alone decide
    it, else None."""
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values).reshape(-1)
        return int(values[index if values.size > 1 else 0]) if values.size else None
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None:
        return None
    if node.op == "Concat":
        return _concat_entry(node, index)
    if (
        node.op in ("Reshape", "Cast", "Identity")
        and _rank_one(node.inputs[0])
        and _rank_one(tensor)
    ):
        return entry_value(node.inputs[0], index)
    if node.op == "Equal":
        a, b = (entry_value(t, index) for t in node.inputs)
        return None if a is None or b is None else int(a == b)
    if node.op == "Where":
        condition = entry_value(node.inputs[0], index)
        return None if condition is None else entry_value(node.inputs[2 - condition], index)
    return None


def _concat_entry(node: gs.Node, index: int) -> int | None:
    """Entry `index` of Concat `node`'s output: that of the piece holding it."""
    start = 0
    for piece in node.inputs:
        shape = shape_of(piece)
        if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
            return None
        if index < start + shape[0]:
            return entry_value(piece, index - start)
        start += shape[0]
    return None


def _one_or_absent(tensor: gs.Tensor, back: int) -> bool:
    """Axis `back` (counted from the end) of `tensor` is missing (broadcast) or of size 1."""
    shape = shape_of(tensor)
    return shape is not None and (len(shape) < -back or is_one(tensor, back))


def _rank_one(tensor: gs.Tensor) -> bool:
    """The tensor is known to be 1-D (a shape vector)."""
    shape = shape_of(tensor)
    return shape is not None and len(shape) == 1
