"""What each ONNX op does to a channel axis that flows into it.

`step(node, index, state)` answers, for a node reading the group's channels at input `index`:
pass them through (channel by channel, perhaps with per-channel parameters to slice), consume them
through weights (a consumer: the plan's correction is folded there), or block pruning with a
reason. Unknown ops block: the analyzer never guesses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit


@dataclass(frozen=True)
class State:
    """Where the group's channels are: tensor, channel axis, first channel, features per channel."""

    tensor: str
    axis: int
    offset: int
    spatial: int = 1


@dataclass
class Step:
    """The outcome of one node for one incoming state.

    kind "drop": the node discards the channels on this path (a Slice outside them) but its
    `edits` still follow them. `cuts` (with "block"): channel indices of the group where
    splitting it into independent groups lets every part pass (a Split or Slice boundary).
    """

    kind: Literal["through", "consume", "block", "drop"]
    next: State | None = None
    edits: list[ParamEdit] = field(default_factory=list)
    reason: str | None = None
    couple: bool = False
    cuts: tuple[int, ...] = ()


def step(node: gs.Node, index: int, state: State, channels: int) -> Step:
    """Classify `node` reading the group's `channels` at input `index` in `state`."""
    if node.domain not in (None, "", "ai.onnx"):
        return _block(f"op {node.domain}::{node.op} is not known to act channel by channel")
    rule = RULES.get(node.op)
    if rule is None:
        return _block(f"op {node.op} is not known to act channel by channel")
    return rule(node, index, state, channels)


def shape_of(tensor: gs.Tensor) -> list | None:
    """Inferred shape as a list (ints for static dims, str/None for symbolic), or None."""
    shape = tensor.shape
    return None if shape is None else list(shape)


def const(node: gs.Node, index: int) -> np.ndarray | None:
    """Value of input `index` if it is a constant, else None."""
    if len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant):
        return node.inputs[index].values
    return None


def rank_of(tensor: gs.Tensor) -> int | None:
    shape = shape_of(tensor)
    return None if shape is None else len(shape)


def _block(reason: str) -> Step:
    return Step("block", reason=reason)


def _through(
    node: gs.Node,
    state: State,
    *,
    axis: int | None = None,
    offset: int | None = None,
    spatial: int | None = None,
    edits: list[ParamEdit] | None = None,
    couple: bool = False,
) -> Step:
    nxt = State(
        node.outputs[0].name,
        state.axis if axis is None else axis,
        state.offset if offset is None else offset,
        state.spatial if spatial is None else spatial,
    )
    return Step("through", next=nxt, edits=edits or [], couple=couple)


def _first_input_only(rule: Callable) -> Callable:
    def wrapped(node: gs.Node, index: int, state: State, channels: int) -> Step:
        if index != 0:
            return _block(f"channels enter {node.op} '{node.name}' as a parameter input")
        return rule(node, index, state, channels)

    return wrapped


@_first_input_only
def _unary(node: gs.Node, index: int, state: State, channels: int) -> Step:
    return _through(node, state)


def _param_edit(node: gs.Node, index: int, state: State, channels: int) -> Step | ParamEdit | None:
    """Edit for a constant broadcast against the channel tensor (None if it has no channel axis)."""
    value = const(node, index)
    rank = rank_of(node.inputs[0] if index != 0 else node.inputs[1])
    if value is None or rank is None:
        return _block(f"{node.op} '{node.name}' has a non-constant or unshaped operand")
    const_axis = state.axis - (rank - value.ndim)
    if const_axis < 0 or value.shape[const_axis] == 1:
        return None
    total = value.shape[const_axis]
    if total % state.spatial or total // state.spatial < state.offset + channels:
        return _block(f"{node.op} '{node.name}' has a parameter that does not match the channels")
    return ParamEdit(node.name, index, const_axis, state.offset, "chan", state.spatial)


def _elementwise(node: gs.Node, index: int, state: State, channels: int) -> Step:
    """Add/Sub/Mul/Div/...: with a constant operand (sliced per channel) or two activations."""
    if len(node.inputs) != 2:
        return _block(f"{node.op} '{node.name}' with {len(node.inputs)} inputs")
    other = 1 - index
    if isinstance(node.inputs[other], gs.Constant):
        edit = _param_edit(node, other, state, channels)
        if isinstance(edit, Step):
            return edit
        return _through(node, state, edits=[edit] if edit else [])
    out_rank, in_rank = rank_of(node.outputs[0]), rank_of(node.inputs[index])
    other_shape = shape_of(node.inputs[other])
    if out_rank is None or in_rank is None or other_shape is None:
        return _block(f"{node.op} '{node.name}' has unknown shapes")
    if node.op == "Pow":
        return _block(f"Pow '{node.name}' with a tensor exponent")
    axis = state.axis + out_rank - in_rank
    other_axis = axis - (out_rank - len(other_shape))
    if other_axis < 0 or other_shape[other_axis] == 1:
        return _through(node, state, axis=axis)  # e.g. a spatial attention map: channel-wise
    return _through(node, state, axis=axis, couple=True)


@_first_input_only
def _prelu(node: gs.Node, index: int, state: State, channels: int) -> Step:
    edit = _param_edit(node, 1, state, channels)
    if isinstance(edit, Step):
        return edit
    return _through(node, state, edits=[edit] if edit else [])


@_first_input_only
def _batchnorm(node: gs.Node, index: int, state: State, channels: int) -> Step:
    if state.axis != 1 or state.spatial != 1:
        return _block(f"BatchNormalization '{node.name}' does not normalize the channel axis")
    if any(const(node, i) is None for i in range(1, 5)):
        return _block(f"BatchNormalization '{node.name}' has non-constant parameters")
    edits = [ParamEdit(node.name, i, 0, state.offset, "chan") for i in range(1, 5)]
    return _through(node, state, edits=edits)


@_first_input_only
def _instancenorm(node: gs.Node, index: int, state: State, channels: int) -> Step:
    if state.axis != 1 or state.spatial != 1 or const(node, 1) is None or const(node, 2) is None:
        return _block(f"InstanceNormalization '{node.name}' is not per-channel here")
    edits = [ParamEdit(node.name, i, 0, state.offset, "chan") for i in (1, 2)]
    return _through(node, state, edits=edits)


@_first_input_only
def _pool(node: gs.Node, index: int, state: State, channels: int) -> Step:
    if state.axis != 1 or state.spatial != 1:
        return _block(f"{node.op} '{node.name}' pools over the channel axis")
    return _through(node, state)


def _reduce_axes(node: gs.Node) -> list[int] | None:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        value = const(node, 1)
        axes = None if value is None else value.tolist()
    return None if axes is None else list(axes)


@_first_input_only
def _reduce(node: gs.Node, index: int, state: State, channels: int) -> Step:
    rank = rank_of(node.inputs[0])
    axes = _reduce_axes(node)
    if rank is None or not axes:
        return _block(f"{node.op} '{node.name}' reduces over all axes (or unknown axes)")
    axes = [a % rank for a in axes]
    if state.axis in axes or state.spatial != 1:
        return _block(f"{node.op} '{node.name}' reduces over the channel axis")
    keep = node.attrs.get("keepdims", 1)
    axis = state.axis if keep else state.axis - sum(a < state.axis for a in axes)
    return _through(node, state, axis=axis)


def _squeeze_axes(node: gs.Node) -> list[int] | None:
    return _reduce_axes(node)


@_first_input_only
def _squeeze(node: gs.Node, index: int, state: State, channels: int) -> Step:
    rank_in, rank_out = rank_of(node.inputs[0]), rank_of(node.outputs[0])
    axes = _squeeze_axes(node)
    if rank_in is None or rank_out is None or axes is None:
        return _block(f"{node.op} '{node.name}' has unknown axes or shapes")
    if node.op == "Squeeze":
        axes = [a % rank_in for a in axes]
        if state.axis in axes:
            return _block(f"Squeeze '{node.name}' removes the channel axis")
        return _through(node, state, axis=state.axis - sum(a < state.axis for a in axes))
    axes = sorted(a % rank_out for a in axes)
    axis = state.axis
    for a in axes:
        if a <= axis:
            axis += 1
    return _through(node, state, axis=axis)


@_first_input_only
def _flatten(node: gs.Node, index: int, state: State, channels: int) -> Step:
    shape = shape_of(node.inputs[0])
    axis = node.attrs.get("axis", 1)
    if shape is None or axis % len(shape) != 1 or state.axis != 1:
        return _block(f"Flatten '{node.name}' does not flatten from the channel axis")
    rest = shape[2:]
    if not all(isinstance(d, int) for d in rest):
        return _block(f"Flatten '{node.name}' has dynamic spatial dims")
    return _through(node, state, spatial=state.spatial * int(np.prod(rest, dtype=np.int64)))


@_first_input_only
def _reshape(node: gs.Node, index: int, state: State, channels: int) -> Step:
    """Only a channel-major flatten of (batch, C, ...) to (batch, C·H·W) is understood."""
    shape_in, target = shape_of(node.inputs[0]), const(node, 1)
    fail = _block(f"Reshape '{node.name}' does not flatten from the channel axis")
    if shape_in is None or target is None or target.size != 2 or state.axis != 1:
        return fail
    rest = shape_in[2:]
    if not all(isinstance(d, int) for d in rest + [shape_in[1]]):
        return fail
    features = int(shape_in[1]) * int(np.prod(rest, dtype=np.int64))
    if not _flattens_to_batch(node, shape_in[0], [int(t) for t in target], features):
        return fail
    spatial = state.spatial * int(np.prod(rest, dtype=np.int64))
    edits = (
        []
        if target[1] in (-1, 0)
        else [ParamEdit(node.name, 1, 0, state.offset, "reshape", spatial)]
    )
    return _through(node, state, spatial=spatial, edits=edits)


def _flattens_to_batch(node: gs.Node, batch: object, target: list[int], features: int) -> bool:
    """True when the target provably keeps the batch axis and puts all C·H·W features second.

    [0, -1], [0, F], [-1, F] and [B, -1 or F] for a static batch B qualify; [-1, H·W] (channels
    folded into the batch) or any other split does not. `allowzero` would make 0 a real zero.
    """
    first, second = target
    if node.attrs.get("allowzero", 0) and 0 in target:
        return False
    if first == 0 or (isinstance(batch, int) and first == batch):
        return second in (-1, features)
    return first == -1 and second == features


def _conv(node: gs.Node, index: int, state: State, channels: int) -> Step:
    weight = const(node, 1)
    if index != 0 or weight is None:
        return _block(f"channels reach a weight input of Conv '{node.name}' or it is not constant")
    if state.axis != 1 or state.spatial != 1:
        return _block(f"Conv '{node.name}' reads channels on another axis")
    group = node.attrs.get("group", 1)
    if group == 1:
        edit = ParamEdit(node.name, 1, 1, state.offset, "in", tap=state.tensor)
        return Step("consume", edits=[edit])
    if group == weight.shape[0] and weight.shape[1] == 1 and _in_channels(node) == group:
        edits = [ParamEdit(node.name, 1, 0, state.offset, "chan")]
        if const(node, 2) is not None:
            edits.append(ParamEdit(node.name, 2, 0, state.offset, "chan"))
        return _through(node, state, edits=edits)
    return _block(f"grouped Conv '{node.name}' (group={group}) is not depthwise")


def _in_channels(node: gs.Node) -> int | None:
    shape = shape_of(node.inputs[0])
    return shape[1] if shape and isinstance(shape[1], int) else None


def _conv_transpose(node: gs.Node, index: int, state: State, channels: int) -> Step:
    if index != 0 or const(node, 1) is None or node.attrs.get("group", 1) != 1:
        return _block(f"ConvTranspose '{node.name}' is grouped or has a non-constant weight")
    if state.axis != 1 or state.spatial != 1:
        return _block(f"ConvTranspose '{node.name}' reads channels on another axis")
    return Step("consume", edits=[ParamEdit(node.name, 1, 0, state.offset, "in", tap=state.tensor)])


def _gemm(node: gs.Node, index: int, state: State, channels: int) -> Step:
    if index != 0 or const(node, 1) is None or node.attrs.get("transA", 0) or state.axis != 1:
        return _block(f"Gemm '{node.name}' reads the channels other than as features of A")
    axis = 1 if node.attrs.get("transB", 0) else 0
    edit = ParamEdit(node.name, 1, axis, state.offset, "in", state.spatial, state.tensor)
    return Step("consume", edits=[edit])


def _matmul(node: gs.Node, index: int, state: State, channels: int) -> Step:
    weight, rank = const(node, 1), rank_of(node.inputs[0])
    if index != 0 or weight is None or weight.ndim != 2 or rank is None or state.axis != rank - 1:
        return _block(f"MatMul '{node.name}' reads the channels other than as its last axis")
    edit = ParamEdit(node.name, 1, 0, state.offset, "in", state.spatial, state.tensor)
    return Step("consume", edits=[edit])


def _concat(node: gs.Node, index: int, state: State, channels: int) -> Step:
    rank = rank_of(node.outputs[0])
    if rank is None or node.attrs.get("axis", 0) % rank != state.axis or state.spatial != 1:
        return _block(f"Concat '{node.name}' joins along another axis than the channels")
    before = 0
    for tensor in node.inputs[:index]:
        shape = shape_of(tensor)
        if shape is None or not isinstance(shape[state.axis], int):
            return _block(f"Concat '{node.name}' has an input of unknown channel count")
        before += shape[state.axis]
    return _through(node, state, offset=state.offset + before)


@_first_input_only
def _pad(node: gs.Node, index: int, state: State, channels: int) -> Step:
    pads = node.attrs.get("pads")
    if pads is None:
        pads = const(node, 1)
    rank = rank_of(node.inputs[0])
    if pads is None or rank is None:
        return _block(f"Pad '{node.name}' has non-constant pads")
    pads = list(np.asarray(pads).reshape(-1))
    axes = const(node, 3) if len(node.inputs) > 3 and node.inputs[3].name else None
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    if state.axis in axes:
        where = axes.index(state.axis)
        if pads[where] != 0 or pads[where + len(axes)] != 0:
            return _block(f"Pad '{node.name}' pads the channel axis")
    return _through(node, state)


@_first_input_only
def _resize(node: gs.Node, index: int, state: State, channels: int) -> Step:
    scales = const(node, 2) if len(node.inputs) > 2 and node.inputs[2].name else None
    if len(node.inputs) > 3 and node.inputs[3].name:
        return _block(f"Resize '{node.name}' is given explicit sizes")
    if scales is not None and scales.size and scales.reshape(-1)[state.axis] != 1:
        return _block(f"Resize '{node.name}' scales the channel axis")
    if state.axis != 1:
        return _block(f"Resize '{node.name}' on a non-NCHW tensor")
    return _through(node, state)


def _shape(node: gs.Node, index: int, state: State, channels: int) -> Step:
    """Shape is harmless when only dims other than the channel axis are read from it."""
    start = node.attrs.get("start", 0)
    for user in node.outputs[0].outputs:
        indices = const(user, 1) if user.op == "Gather" else None
        if indices is None or state.axis - start in np.asarray(indices).reshape(-1).tolist():
            return _block(f"the shape of the channels is read by '{user.name}' ({user.op})")
    return Step("consume")


_UNARY = [
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Clip",
    "HardSigmoid",
    "HardSwish",
    "Gelu",
    "Erf",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "Mish",
    "Abs",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Cast",
    "Identity",
    "Dropout",
    "ThresholdedRelu",
    "Sin",
    "Cos",
]
NONLINEAR = frozenset(
    {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish"}
    | {"Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu"}
)
_BINARY = ["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"]

RULES: dict[str, Callable[[gs.Node, int, State, int], Step]] = {
    **{op: _unary for op in _UNARY},
    **{op: _elementwise for op in _BINARY},
    "PRelu": _prelu,
    "BatchNormalization": _batchnorm,
    "InstanceNormalization": _instancenorm,
    **{
        op: _pool
        for op in ["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"]
    },
    **{
        op: _reduce
        for op in ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1"]
    },
    "Squeeze": _squeeze,
    "Unsqueeze": _squeeze,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Concat": _concat,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    "Shape": _shape,
}
