"""The flow contract every handler's `step` answers in, and the helpers its rules share.

`step(node, index, state, channels) -> Step` answers, for a node reading a group's `channels` at
input `index` in `state`: pass them through (channel by channel, perhaps with per-channel
parameters to slice), consume them through weights (a consumer: the plan's correction is folded
there), drop them (a Slice outside them), or block pruning with a reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit


@dataclass(frozen=True)
class State:
    """Where the group's channels are: tensor, channel axis, first channel, features per channel,
    and the step between consecutive channels (> 1 behind a channel shuffle)."""

    tensor: str
    axis: int
    offset: int
    spatial: int = 1
    stride: int = 1


@dataclass
class Step:
    """The outcome of one node for one incoming state.

    kind "drop": the node discards the channels on this path (a Slice outside them) but its
    `edits` still follow them. `cuts` (with "block"): channel indices of the group where
    splitting it into independent groups lets every part pass (a Split or Slice boundary).
    `also`: further tensors the channels reach besides `next` (the outputs of a Split of
    another axis).
    """

    kind: Literal["through", "consume", "block", "drop"]
    next: State | None = None
    edits: list[ParamEdit] = field(default_factory=list)
    reason: str | None = None
    couple: bool = False
    cuts: tuple[int, ...] = ()
    also: tuple[State, ...] = ()


@dataclass(frozen=True)
class Output:
    """The channels a producer writes through its weight: how many, on which axis of its output,
    the constants holding them (role "out" edits: weight rows, bias), why they cannot be pruned
    (None: they can), and `blocks` > 1 for a grouped Conv, whose conv groups write apart."""

    channels: int
    axis: int
    edits: tuple[ParamEdit, ...]
    reason: str | None = None
    blocks: int = 1


def block(reason: str, cuts: tuple[int, ...] = ()) -> Step:
    """Refuse the group here, with the reason (and where cutting it would let the parts pass)."""
    return Step("block", reason=reason, cuts=cuts)


def through(
    node: gs.Node,
    state: State,
    *,
    axis: int | None = None,
    offset: int | None = None,
    spatial: int | None = None,
    edits: list[ParamEdit] | None = None,
    couple: bool = False,
) -> Step:
    """Pass the channels on to the node's first output, moved as the keywords say."""
    nxt = State(
        node.outputs[0].name,
        state.axis if axis is None else axis,
        state.offset if offset is None else offset,
        state.spatial if spatial is None else spatial,
        state.stride,
    )
    return Step("through", next=nxt, edits=edits or [], couple=couple)


def parameter_input(node: gs.Node, index: int) -> Step | None:
    """A block when the channels enter the node anywhere but its data input (index 0)."""
    if index != 0:
        return block(f"channels enter {node.op} '{node.name}' as a parameter input")
    return None


def shape_of(tensor: gs.Tensor) -> list | None:
    """Inferred shape as a list (ints for static dims, str/None for symbolic), or None."""
    shape = tensor.shape
    return None if shape is None else list(shape)


def const(node: gs.Node, index: int) -> np.ndarray | None:
    """Value of input `index` if it is a constant, else None."""
    if len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant):
        return node.inputs[index].values
    return None


def single_user(node: gs.Node, op: str) -> gs.Node | None:
    """The one node reading `node`'s first output, if there is exactly one and it is an `op`."""
    users = node.outputs[0].outputs if node.outputs else []
    return users[0] if len(users) == 1 and users[0].op == op else None


def without_trailing_ones(shape: list) -> list:
    """`shape` without the axes of size 1 at its end."""
    end = len(shape)
    while end and shape[end - 1] == 1:
        end -= 1
    return shape[:end]


def readers_ahead(
    start: gs.Tensor, limit: int, follow: Callable[[gs.Node], Sequence[gs.Tensor]]
) -> Iterator[tuple[gs.Tensor, gs.Node]]:
    """(tensor, reader) pairs from `start` on, depth first, each tensor once and at most
    `limit` of them; the walk goes on into `follow(reader)` (a look-ahead for a pattern)."""
    stack, seen = [start], set()
    while stack and len(seen) < limit:
        tensor = stack.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        for user in tensor.outputs:
            yield tensor, user
            stack.extend(follow(user))


def rank_of(tensor: gs.Tensor) -> int | None:
    """The tensor's rank when shape inference knows it."""
    shape = shape_of(tensor)
    return None if shape is None else len(shape)


def channel_count(node: gs.Node, axis: int) -> int | None:
    """The static size of axis `axis` of the node's first input, or None."""
    shape = shape_of(node.inputs[0])
    return shape[axis] if shape is not None and isinstance(shape[axis], int) else None


def param_edit(node: gs.Node, index: int, state: State, channels: int) -> Step | ParamEdit | None:
    """Edit for a constant broadcast against the channel tensor (None if it has no channel axis)."""
    value = const(node, index)
    rank = rank_of(node.inputs[0] if index != 0 else node.inputs[1])
    if value is None or rank is None:
        return block(f"{node.op} '{node.name}' has a non-constant or unshaped operand")
    const_axis = state.axis - (rank - value.ndim)
    if const_axis < 0 or value.shape[const_axis] == 1:
        return None
    total = value.shape[const_axis]
    if total % state.spatial or total // state.spatial < state.offset + channels:
        return block(f"{node.op} '{node.name}' has a parameter that does not match the channels")
    return ParamEdit(
        node.name, index, const_axis, state.offset, "chan", state.spatial, stride=state.stride
    )


def with_param(node: gs.Node, index: int, state: State, channels: int) -> Step:
    """Pass the channels through, slicing constant input `index` along them where it has them."""
    edit = param_edit(node, index, state, channels)
    if isinstance(edit, Step):
        return edit
    return through(node, state, edits=[edit] if edit else [])


def count_edit(node: gs.Node, index: int, entry: int, state: State) -> ParamEdit:
    """Entry `entry` of constant input `index` counts the group's channels."""
    return ParamEdit(node.name, index, entry, state.offset, "count", state.spatial)


def cuts_at(bounds: list[int], state: State, channels: int) -> tuple[int, ...]:
    """Group channel indices where a boundary (a position on the channel axis) falls inside:
    the first channel at or after the boundary (channel c lies at offset + stride·c)."""
    firsts = {-(-(b - state.offset) // state.stride) for b in bounds}
    return tuple(sorted(c for c in firsts if 0 < c < channels))


def axes_of(node: gs.Node) -> list[int] | None:
    """The `axes` attribute, or the constant second input that replaced it in newer opsets."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        value = const(node, 1)
        axes = None if value is None else value.reshape(-1).tolist()
    return None if axes is None else [int(a) for a in axes]


AXIS_MOVES = frozenset({"Transpose", "Unsqueeze", "Squeeze"})  # ops that only move axes


def moved_from(node: gs.Node, axis: int) -> int | None:
    """The input axis that Transpose, Unsqueeze or Squeeze `node` moves to output axis `axis`
    (None: an axis it inserts, or unknown axes)."""
    if node.op == "Transpose":
        rank = rank_of(node.inputs[0])
        perm = node.attrs.get("perm", None if rank is None else list(range(rank))[::-1])
        return None if perm is None else int(perm[axis])
    axes, rank = axes_of(node), rank_of(node.outputs[0])
    if axes is None or rank is None:
        return None
    if node.op == "Unsqueeze":
        added = sorted(a % rank for a in axes)
        return None if axis in added else axis - sum(a < axis for a in added)
    removed = sorted(a % (rank + len(axes)) for a in axes)
    for a in removed:
        axis += a <= axis
    return axis
