"""Axes of size one and equal dims that shape inference cannot see.

transformers' attention masks reach the scores through `mask.expand(batch, 1, tgt, src)`, which
the legacy exporter writes as Expand with a target computed at run time:
`Where(Equal(t, -1), 1, t)` over a Concat of shape pieces and a constant -1. ONNX shape
inference leaves every axis of the result symbolic, so the mask looks like it has a head axis
and the Add that applies it would tie the heads to it. The entries of such targets that only
constants decide are evaluated here, exactly, op by op; anything else is unknown.

The dynamo export of the same model reshapes the hidden states into heads with the batch and
sequence read from a graph input's shape, and inference has lost that the hidden states have
those sizes (`x + position_embeddings[:, :S]` gets new symbols); `dim_origin` proves a dim's
size back to a graph input's dim through shape-keeping ops and broadcasts.

`target_entry` finds where one entry of a Reshape target is stated (a constant, or a piece of
the Concat the legacy exporter builds targets with), for the rules that edit it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.concat_split import split_sizes
from onnxprune.ops.flow import Step, axes_of, block, const, moved_from, rank_of, shape_of

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
        found = _piece_at(tensor, index)
        return None if found is None else entry_value(*found)
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


def _one_or_absent(tensor: gs.Tensor, back: int) -> bool:
    """Axis `back` (counted from the end) of `tensor` is missing (broadcast) or of size 1."""
    shape = shape_of(tensor)
    return shape is not None and (len(shape) < -back or is_one(tensor, back))


def _rank_one(tensor: gs.Tensor) -> bool:
    """The tensor is known to be 1-D (a shape vector)."""
    shape = shape_of(tensor)
    return shape is not None and len(shape) == 1


# ----------------------------------------------------------------------------- equal dims

# ops whose output has their first input's shape
_SAME_SHAPE = frozenset(
    {"LayerNormalization", "RMSNormalization", "Cast", "Relu", "Erf", "Sqrt", "Neg", "Softmax",
     "Identity", "Tanh", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Exp", "Abs", "Reciprocal",
     "Elu", "LeakyRelu", "Softplus", "Mish", "Clip", "Cos", "Sin"}
)  # fmt: skip
_BATCH_KEEPING = frozenset(
    {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
     "BatchNormalization", "InstanceNormalization", "Resize"}
)  # fmt: skip
_BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Where"})
_REDUCE = frozenset({"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin"})


def dim_origin(tensor: gs.Tensor, axis: int) -> int | str | None:
    """The size of axis `axis` of `tensor` at run time, as a static int or the name of a graph
    input's symbolic dim (inputs that share a dim name share its value, as ONNX states), when
    it is proven through the ops that produce `tensor`, else None. Shape inference names a new
    symbol wherever an op's output size depends on values (a Slice to a computed end) and loses
    the equality that broadcasting restores: `x + pos[:, :S]` has x's size S whenever it runs.

    Each (tensor, axis) is answered once per call: the walk branches at every binary op (a
    SiLU's x·σ(x), a residual Add) and would otherwise revisit shared producers exponentially
    often."""
    memo = getattr(_CALL, "memo", None)
    if memo is None:
        _CALL.memo = {}
        try:
            return dim_origin(tensor, axis)
        finally:
            _CALL.memo = None
    key = (id(tensor), axis)
    if key not in memo:
        memo[key] = None  # a cycle (none in a valid graph) answers None
        memo[key] = _dim_origin(tensor, axis)
    return memo[key]


_CALL = threading.local()  # the memo of the dim_origin call in progress on this thread


def _dim_origin(tensor: gs.Tensor, axis: int) -> int | str | None:
    shape = shape_of(tensor)
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    axis %= len(shape)
    if isinstance(shape[axis], int):
        return shape[axis]
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None:
        return shape[axis] or None  # a graph input's symbolic dim
    if node.op in _SAME_SHAPE:
        return dim_origin(node.inputs[0], axis)
    if (node.op == "Transpose" and "perm" in node.attrs) or node.op == "Unsqueeze":
        moved = moved_from(node, axis)
        return None if moved is None else dim_origin(node.inputs[0], moved)
    if node.op in _BATCH_KEEPING and axis == 0:  # N of (N, C, …)
        return dim_origin(node.inputs[0], 0)
    if node.op in ("MatMul", "Gemm") and isinstance(node.inputs[1], gs.Constant):
        return dim_origin(node.inputs[0], axis) if _keeps_rows_of(node, axis) else None
    if node.op == "MatMul" and axis >= len(shape) - 2:  # rows of the first, columns of the second
        return dim_origin(node.inputs[axis - len(shape) + 2], axis - len(shape))
    if node.op == "MatMul" and rank_of(node.inputs[1]) == len(shape):  # broadcast batch axes
        return _broadcast_origin(node, len(shape), axis)
    if node.op == "Split":
        return _split_origin(node, tensor, axis)
    if node.op == "GatherElements":  # the indices' shape
        return dim_origin(node.inputs[1], axis)
    if node.op == "Expand":
        return _expanded(node, len(shape), axis)
    if node.op == "Gather" and node.attrs.get("axis", 0) == 0:
        indices = rank_of(node.inputs[1])
        return dim_origin(node.inputs[1], axis) if indices and axis < indices else None
    if node.op in _BROADCAST:
        return _broadcast_origin(node, len(shape), axis)
    if node.op in _REDUCE and node.attrs.get("keepdims", 1):  # an RMSNorm's mean of squares
        reduced = axes_of(node)
        kept = reduced is not None and axis not in [a % len(shape) for a in reduced]
        return dim_origin(node.inputs[0], axis) if kept else None
    if node.op == "Range":  # arange(0, n, 1): n entries, n read from a shape
        start, delta = (entry_value(t, 0) for t in node.inputs[::2])
        return shape_entry(node.inputs[1], 0) if (start, delta) == (0, 1) else None
    if node.op == "Concat" and node.attrs.get("axis", 0) % len(shape) != axis:
        return dim_origin(node.inputs[0], axis)
    if node.op == "Slice" and axis not in _sliced_axes(node, len(shape)):
        return dim_origin(node.inputs[0], axis)
    if node.op == "Reshape":  # a target entry that states the size, or -1 by the element count
        size = vector_entry(node.inputs[1], axis)
        if size == -1:
            return inferred_size(node)
        if size == 0 and not node.attrs.get("allowzero", 0):  # 0 copies the input's dim
            return dim_origin(node.inputs[0], axis)
        return size if isinstance(size, str) or (size is not None and size > 0) else None
    return None


def _sliced_axes(node: gs.Node, rank: int) -> set[int]:
    """The axes Slice `node` may cut: its constant `axes`, else (not stated, or computed) every
    axis."""
    axes = const(node, 3) if len(node.inputs) > 3 else None
    if axes is None:
        return set(range(rank))
    return {int(a) % rank for a in np.asarray(axes).reshape(-1)}


def inferred_size(node: gs.Node) -> int | None:
    """The size Reshape `node`'s one -1 entry stands for: the input's element count over the
    other entries'. Sizes proven equal cancel in pairs (a 0 entry copies its input dim; a
    symbolic entry meets the input dim of the same name, since inputs that share a dim name
    share its value); the rest must be static. None when unproven or not a whole division."""
    rank, length = rank_of(node.inputs[0]), (shape_of(node.inputs[1]) or [None])[0]
    shape_out = shape_of(node.outputs[0]) or []
    if rank is None or not isinstance(length, int):
        return None
    entries = [vector_entry(node.inputs[1], k) for k in range(length)]
    if entries.count(-1) != 1 or (0 in entries and node.attrs.get("allowzero", 0)):
        return None  # allowzero's 0 is an empty axis (ONNX forbids it beside -1)
    shape_in = shape_of(node.inputs[0]) or [None] * rank
    copied = {k for k, entry in enumerate(entries) if entry == 0}
    if any(k >= rank for k in copied):
        return None
    sizes = {i: dim_origin(node.inputs[0], i) for i in range(rank) if i not in copied}
    stated = 1
    for k, entry in enumerate(entries):
        if entry is None and k < len(shape_out):  # shape inference may still know it
            entry = shape_out[k] or None
        same = [i for i in sizes if entry in (sizes[i], shape_in[i])]
        if isinstance(entry, int) and entry > 0:
            stated *= entry
        elif isinstance(entry, str) and same:
            del sizes[same[0]]
        elif entry not in (-1, 0):
            return None
    if not all(isinstance(d, int) for d in sizes.values()):
        return None
    total = math.prod(sizes.values())
    return total // stated if total % stated == 0 and total >= stated else None


def _expanded(node: gs.Node, rank: int, axis: int) -> int | str | None:
    """The size of axis `axis` of an Expand's output: the target's proven entry t where the
    input lacks the axis or is at most t there (broadcasting then makes it t: the input's size
    is 1 or t), else None."""
    length = (shape_of(node.inputs[1]) or [None])[0]
    if not isinstance(length, int) or axis < rank - length:
        return None  # the target is shorter: the input's own axis (not followed here)
    stated = vector_entry(node.inputs[1], axis - (rank - length))
    if stated is None or (isinstance(stated, int) and stated < 1):
        return None
    own = axis - (rank - (rank_of(node.inputs[0]) or 0))
    return stated if _at_most(node.inputs[0], own, stated) else None


def _split_origin(node: gs.Node, tensor: gs.Tensor, axis: int) -> int | str | None:
    """The size of axis `axis` of output `tensor` of a Split: the input's on any other axis than
    the split one; on that one the output's part size (`split_sizes`), when it is known."""
    rank = rank_of(node.inputs[0])
    if rank is None:
        return None
    if node.attrs.get("axis", 0) % rank != axis:
        return dim_origin(node.inputs[0], axis)
    total = dim_origin(node.inputs[0], axis)
    sizes = split_sizes(node, total if isinstance(total, int) else None)
    return None if sizes is None else sizes[node.outputs.index(tensor)]


def vector_entry(vector: gs.Tensor, index: int) -> int | str | None:
    """Entry `index` of a shape vector: `shape_entry` of the Concat piece holding it (the
    constant, or the proven size of the dim it reads)."""
    found = _piece_at(vector, index)
    return None if found is None else shape_entry(*found)


def vector_source(vector: gs.Tensor, index: int) -> tuple[gs.Tensor, int] | None:
    """(x, i) when entry `index` of shape vector `vector` (a Concat of shape pieces, or one
    piece) is dim i of tensor x (`shape_source`), else None."""
    found = _piece_at(vector, index)
    return None if found is None else shape_source(*found)


def _piece_at(vector: gs.Tensor, index: int) -> tuple[gs.Tensor, int] | None:
    """(piece, at): the piece of the Concat producing `vector` that holds entry `index`, and the
    entry's place in it (`vector` itself when no Concat produces it); None when a piece's length
    is unknown or the vector is shorter."""
    node = vector.inputs[0] if vector.inputs else None
    if node is None or node.op != "Concat":
        return vector, index
    start = 0
    for piece in node.inputs:
        size = shape_of(piece)
        if size is None or len(size) != 1 or not isinstance(size[0], int):
            return None
        if index < start + size[0]:
            return piece, index - start
        start += size[0]
    return None


def _keeps_rows_of(node: gs.Node, axis: int) -> bool:
    """A MatMul/Gemm with a constant weight, whose output has its input's size on `axis` (any
    axis but the last)."""
    rank = rank_of(node.outputs[0]) if node.outputs else None
    weighted = node.op in ("MatMul", "Gemm") and isinstance(node.inputs[1], gs.Constant)
    return weighted and rank is not None and axis < rank - 1


def _broadcast_origin(node: gs.Node, rank: int, axis: int) -> int | str | None:
    """The output size of a broadcasting op: an input's proven size when every other input lacks
    the axis or is at most that size (then, whenever the op runs, they are 1 or equal to it)."""
    for tensor in node.inputs:
        own = axis - (rank - (rank_of(tensor) or 0))
        if own < 0:
            continue
        size = dim_origin(tensor, own)
        if size is not None and all(
            _at_most(other, axis - (rank - (rank_of(other) or 0)), size)
            for other in node.inputs
            if other is not tensor
        ):
            return size
    return None


def _at_most(tensor: gs.Tensor, axis: int, size: int | str) -> bool:
    """Axis `axis` of `tensor` is missing, of size 1, provably `size`, or a Slice from 0 to
    `size` (step 1) of a longer constant (at most `size`)."""
    if axis < 0 or dim_origin(tensor, axis) in (1, size):
        return True
    node = tensor.inputs[0] if tensor.inputs else None
    if node is not None and node.op == "Gather" and node.attrs.get("axis", 0) == 0:
        indices = rank_of(node.inputs[1])
        return indices is not None and axis < indices and _at_most(node.inputs[1], axis, size)
    if node is not None and (node.op in _SAME_SHAPE or _keeps_rows_of(node, axis)):
        return _at_most(node.inputs[0], axis, size)  # cob's inserted MatMul after an embedding
    if node is not None and node.op == "GatherElements":  # the indices' shape
        return _at_most(node.inputs[1], axis, size)
    if node is None or node.op != "Slice" or len(node.inputs) < 4:
        return False
    axes = node.inputs[3]
    if not isinstance(axes, gs.Constant) or axis not in np.asarray(axes.values).reshape(-1):
        return dim_origin(node.inputs[0], axis) in (1, size)  # not sliced: the input's size
    if list(np.asarray(axes.values).reshape(-1)) != [axis]:
        return False
    starts, steps = node.inputs[1], node.inputs[4] if len(node.inputs) > 4 else None
    from_zero = isinstance(starts, gs.Constant) and np.asarray(starts.values).reshape(-1)[0] == 0
    unit = steps is None or (isinstance(steps, gs.Constant) and np.all(steps.values == 1))
    return from_zero and unit and shape_entry(node.inputs[2], 0) == size


def shape_entry(piece: gs.Tensor, at: int) -> int | str | None:
    """Entry `at` of a shape piece: the constant, or the proven size (`dim_origin`) of the dim
    `shape_source` finds it reads."""
    if isinstance(piece, gs.Constant):
        values = np.asarray(piece.values).reshape(-1)
        return int(values[at]) if at < values.size else None
    source = shape_source(piece, at)
    return None if source is None else dim_origin(*source)


def shape_source(piece: gs.Tensor, at: int) -> tuple[gs.Tensor, int] | None:
    """(x, i) when entry `at` of shape piece `piece` is dim i of tensor x: `Shape(x)` (with
    start/end) read whole, or by a Gather with constant indices or a Slice with a constant start
    (through Unsqueeze/Cast/Squeeze); else None."""
    node = piece.inputs[0] if piece.inputs else None
    while node is not None and node.op in ("Unsqueeze", "Cast", "Squeeze"):
        node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if node is None:
        return None
    if node.op == "Shape":
        return _shape_dim(node, at, whole=True)
    index = const(node, 1) if len(node.inputs) > 1 else None
    shape = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if index is None or shape is None or shape.op != "Shape":
        return None
    values = index.reshape(-1)
    if node.op == "Gather" and at < max(values.size, 1):
        return _shape_dim(shape, int(values[at if values.size > 1 else 0]))
    if node.op == "Slice" and _unit_slice(node) and values.size == 1:
        return _shape_dim(shape, int(values[0]), offset=at)
    return None


def _unit_slice(node: gs.Node) -> bool:
    """True when Slice `node` on a 1-D tensor takes consecutive entries: no axes and steps, or
    axes [0] (or [-1]) and steps [1] stated as constants (torch's legacy exporter states axes)."""
    allowed = ([[0], [-1]], [[1]])
    for index, values in zip(range(3, len(node.inputs)), allowed, strict=False):
        stated = const(node, index)
        if stated is None or np.asarray(stated).reshape(-1).tolist() not in values:
            return False
    return True


def _shape_dim(
    shape: gs.Node, entry: int, *, offset: int = 0, whole: bool = False
) -> tuple[gs.Tensor, int] | None:
    """(x, axis) for entry `entry` + `offset` of `Shape(x, start, end)`; `entry` negative counts
    from the end (a Gather index), or is clamped like a Slice start unless `whole`."""
    rank = rank_of(shape.inputs[0])
    if rank is None:
        return None
    start, end = (slice(shape.attrs.get("start", 0), shape.attrs.get("end")).indices(rank))[:2]
    if not whole:
        entry = slice(entry, None).indices(end - start)[0]
    axis = start + entry + offset
    return (shape.inputs[0], axis) if start <= axis < end else None


@dataclass(frozen=True)
class TargetEntry:
    """Where one entry of a Reshape target is stated: entry `at` of input `input` of `node`
    (the Reshape's constant target, or a piece of the Concat that builds it)."""

    node: gs.Node
    input: int
    at: int

    @property
    def tensor(self) -> gs.Tensor:
        return self.node.inputs[self.input]

    def value(self) -> int | None:
        """The stated value when it is a constant, else None."""
        if not isinstance(self.tensor, gs.Constant):
            return None
        return int(np.asarray(self.tensor.values).reshape(-1)[self.at])

    def edit(self, offset: int, spatial: int = 1) -> ParamEdit:
        """The entry counts the group's channels (`spatial` features each): it shrinks with
        them."""
        return ParamEdit(self.node.name, self.input, self.at, offset, "count", spatial)


def target_entry(node: gs.Node, entry: int) -> TargetEntry | Step:
    """Where entry `entry` of Reshape `node`'s target is stated, or a block; a Concat's pieces
    are read through the Casts between it and the Reshape."""
    target = node.inputs[1]
    if isinstance(target, gs.Constant):
        return TargetEntry(node, 1, entry)
    source = target.inputs[0] if target.inputs else None
    while source is not None and source.op == "Cast":  # tf2onnx: int32 shape pieces, cast back
        source = source.inputs[0].inputs[0] if source.inputs[0].inputs else None
    if source is None or source.op != "Concat":
        return block(f"Reshape '{node.name}' gets its target from a computed shape")
    start = 0
    for i, piece in enumerate(source.inputs):
        size = shape_of(piece)
        if size is None or len(size) != 1 or not isinstance(size[0], int):
            return block(f"Concat '{source.name}' builds a shape from pieces of unknown size")
        if start <= entry < start + size[0]:
            return TargetEntry(source, i, entry - start)
        start += size[0]
    return block(f"Concat '{source.name}' is shorter than the target of '{node.name}'")
