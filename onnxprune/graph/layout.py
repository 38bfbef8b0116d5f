"""Ops that move or partition the channel axis without mixing channels (graph/ops.py's sequel).

`layout_step` answers like `ops.step` for Split, Slice, Transpose, Resize with explicit sizes
and LayerNormalization, and None for any other op (the analyzer then asks `ops.step`):

* Split on the channel axis sends the group to the output that holds it, at that output's
  offset, and the output's size shrinks with the group. A group whose channels fall into
  several outputs is cut there (`Step.cuts`): the analyzer makes one group of each part.
* Slice (constant bounds, step 1) passes the channels inside it at a new offset and drops
  those outside; its bounds move with the channels pruned before them (after them, for a
  bound counted from the end). Groups straddling a
  bound are cut like at a Split.
* Transpose moves the channel axis: the channels pass unchanged on their new axis.
* Resize with constant sizes that keep the channel count passes them; the channel entry of the
  sizes shrinks with the group.
* LayerNormalization over the channel axis is refused: removing channels changes the mean and
  variance it divides by, for every remaining channel.
* A channel shuffle (Reshape splitting the channel axis in two) is refused with that reason.
* A grouped Conv (not the depthwise one `ops` passes through) reads each conv group's input
  channels on their own: the group is cut at the conv-group boundaries, and each part is read
  through that conv group's filters alone, so its correction stays inside the conv group. The
  parts keep equal widths (`ChannelGroup.ties`) so `group` stays valid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.graph.ops import State, Step, _through, const, rank_of, shape_of


def layout_step(node: gs.Node, index: int, state: State, channels: int) -> Step | None:
    """The step for a channel-layout op reading the group's `channels`, or None for any other."""
    if node.domain not in (None, "", "ai.onnx"):
        return None
    rule = _RULES.get(node.op)
    if rule is None or (node.op == "Conv" and not is_grouped_conv(node)):
        return None
    if index != 0:
        return _block(f"channels enter {node.op} '{node.name}' as a parameter input")
    if state.spatial != 1 and node.op in ("Split", "Slice"):
        return _block(f"{node.op} '{node.name}' cuts flattened channels")
    return rule(node, state, channels)


def is_grouped_conv(node: gs.Node) -> bool:
    """A Conv with group > 1 that is not a plain depthwise conv (C in = C out = group, which
    `ops` passes the channels through)."""
    weight, group = const(node, 1), node.attrs.get("group", 1)
    if node.op != "Conv" or group == 1 or weight is None:
        return False
    return not (weight.shape[0] == group and weight.shape[1] == 1)  # depthwise: C in = group


def split_sizes(node: gs.Node, total: int) -> list[int] | None:
    """A Split's output sizes along its axis of length `total` (input, attribute or equal
    parts as ONNX defines them), or None when the sizes input is not constant."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = const(node, 1)
        return None if value is None else [int(v) for v in value.reshape(-1)]
    if "split" in node.attrs:
        return [int(v) for v in node.attrs["split"]]
    parts = int(node.attrs.get("num_outputs", len(node.outputs)))
    size = -(-total // parts)
    return [min(size, total - i * size) for i in range(parts)]


def _block(reason: str, cuts: tuple[int, ...] = ()) -> Step:
    return Step("block", reason=reason, cuts=cuts)


def _count(node: gs.Node, index: int, entry: int, state: State) -> ParamEdit:
    """Entry `entry` of constant input `index` counts the group's channels."""
    return ParamEdit(node.name, index, entry, state.offset, "count", state.spatial)


def _cuts(bounds: list[int], state: State, channels: int) -> tuple[int, ...]:
    """Group channel indices where a boundary (a position on the channel axis) falls inside."""
    return tuple(sorted({b - state.offset for b in bounds if 0 < b - state.offset < channels}))


def _channel_count(node: gs.Node, axis: int) -> int | None:
    shape = shape_of(node.inputs[0])
    return shape[axis] if shape is not None and isinstance(shape[axis], int) else None


def _split(node: gs.Node, state: State, channels: int) -> Step:
    rank = rank_of(node.inputs[0])
    if rank is None or node.attrs.get("axis", 0) % rank != state.axis:
        return _block(f"Split '{node.name}' splits another axis (channels reach every output)")
    total = _channel_count(node, state.axis)
    sizes = None if total is None else split_sizes(node, total)
    if sizes is None:
        return _block(f"Split '{node.name}' has non-constant sizes or an unknown channel count")
    bounds = np.cumsum([0, *sizes]).tolist()
    cuts = _cuts(bounds[1:-1], state, channels)
    if cuts:
        return _block(f"Split '{node.name}' divides the channels between its outputs", cuts)
    k = next(i for i in range(len(sizes)) if bounds[i] <= state.offset < bounds[i + 1])
    nxt = State(node.outputs[k].name, state.axis, state.offset - bounds[k])
    return Step("through", next=nxt, edits=[_count(node, 1, k, state)])


def _slice_inputs(node: gs.Node, rank: int) -> tuple[list[int], ...] | None:
    """(starts, ends, axes, steps) as int lists, or None when one of them is not constant."""
    values = []
    for index in range(1, 5):
        present = len(node.inputs) > index and node.inputs[index].name
        value = const(node, index) if present else None
        if present and value is None:
            return None
        values.append(None if value is None else [int(v) for v in value.reshape(-1)])
    starts, ends, axes, steps = values
    if starts is None or ends is None:
        return None
    axes = list(range(len(starts))) if axes is None else [a % rank for a in axes]
    return starts, ends, axes, steps or [1] * len(starts)


def _slice(node: gs.Node, state: State, channels: int) -> Step:
    rank = rank_of(node.inputs[0])
    inputs = None if rank is None else _slice_inputs(node, rank)
    if inputs is None:
        return _block(f"Slice '{node.name}' has non-constant starts, ends, axes or steps")
    starts, ends, axes, steps = inputs
    if state.axis not in axes:
        return _through(node, state)
    i = axes.index(state.axis)
    total = _channel_count(node, state.axis)
    if steps[i] != 1 or total is None:
        return _block(
            f"Slice '{node.name}' on the channel axis has a step other than 1 or an unknown "
            "channel count"
        )
    start, end = (b + total if b < 0 else min(b, total) for b in (starts[i], ends[i]))
    if start < 0 or end < 0:
        return _block(f"Slice '{node.name}' has a bound before the first channel")
    cuts = _cuts([start, end], state, channels)
    if cuts:
        return _block(f"Slice '{node.name}' keeps part of the channels", cuts)
    edits = [
        *_bound_edit(node, 1, i, starts[i], total, state, channels),
        *_bound_edit(node, 2, i, ends[i], total, state, channels),
    ]
    if start <= state.offset and state.offset + channels <= end:
        return _through(node, state, offset=state.offset - start, edits=edits)
    return Step("drop", edits=edits)


def _bound_edit(
    node: gs.Node, index: int, entry: int, bound: int, total: int, state: State, channels: int
) -> list[ParamEdit]:
    """How a Slice bound follows the group: counted from the start, it shrinks with the group's
    removed channels when the group lies before it; counted from the end (negative), it grows
    with them when the group lies after it; past the last channel it needs nothing."""
    if bound < 0 and state.offset >= total + bound:
        return [ParamEdit(node.name, index, entry, state.offset, "tail", state.spatial)]
    if 0 <= bound <= total and state.offset + channels <= bound:
        return [_count(node, index, entry, state)]
    return []


def _grouped_conv(node: gs.Node, state: State, channels: int) -> Step:
    if state.axis != 1 or state.spatial != 1:
        return _block(f"Conv '{node.name}' reads channels on another axis")
    per_group = int(const(node, 1).shape[1])
    bounds = list(range(per_group, per_group * node.attrs["group"], per_group))
    cuts = _cuts(bounds, state, channels)
    if cuts:
        return _block(f"grouped Conv '{node.name}' reads the channels in several conv groups", cuts)
    edit = ParamEdit(node.name, 1, 1, state.offset, "in", tap=state.tensor)
    return Step("consume", edits=[edit])


def _transpose(node: gs.Node, state: State, channels: int) -> Step:
    rank = rank_of(node.inputs[0])
    if rank is None:
        return _block(f"Transpose '{node.name}' has an unknown rank")
    perm = list(node.attrs.get("perm", range(rank - 1, -1, -1)))
    return _through(node, state, axis=perm.index(state.axis))


def _resize(node: gs.Node, state: State, channels: int) -> Step | None:
    """Explicit sizes only (scales are `ops._resize`'s): the channel entry must state C."""
    if len(node.inputs) < 4 or not node.inputs[3].name:
        return None
    sizes, rank = const(node, 3), rank_of(node.inputs[0])
    if sizes is None or rank is None:
        return _block(f"Resize '{node.name}' has non-constant sizes")
    axes = [int(a) % rank for a in node.attrs.get("axes", range(rank))]
    if state.axis not in axes:
        return _through(node, state)
    entry = axes.index(state.axis)
    if int(sizes.reshape(-1)[entry]) != _channel_count(node, state.axis):
        return _block(f"Resize '{node.name}' resizes the channel axis")
    return _through(node, state, edits=[_count(node, 3, entry, state)])


def _layernorm(node: gs.Node, state: State, channels: int) -> Step:
    rank = rank_of(node.inputs[0])
    if rank is None or state.axis >= node.attrs.get("axis", -1) % rank:
        return _block(
            f"LayerNormalization '{node.name}' normalizes over the channel axis: removing "
            "channels changes the mean and variance of every channel left"
        )
    return _through(node, state)  # per channel position; its scale and bias do not see channels


def _reshape(node: gs.Node, state: State, channels: int) -> Step | None:
    """Refuse a Reshape that splits the channel axis in two (a channel shuffle's first half)."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if shape_in is None or shape_out is None or len(shape_out) != len(shape_in) + 1:
        return None
    axis = state.axis
    head, tail = shape_in[:axis], shape_in[axis + 1 :]
    if shape_out[:axis] != head or shape_out[axis + 2 :] != tail:
        return None
    return _block(
        f"Reshape '{node.name}' splits the channel axis into groups (a channel shuffle): "
        "not supported"
    )


_RULES: dict[str, Callable[[gs.Node, State, int], Step | None]] = {
    "Conv": _grouped_conv,
    "Split": _split,
    "Slice": _slice,
    "Transpose": _transpose,
    "Resize": _resize,
    "LayerNormalization": _layernorm,
    "Reshape": _reshape,
}
