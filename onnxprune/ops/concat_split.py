"""Ops that join, partition or select along axes: Concat, Split, Slice, Gather.

* Concat on the channel axis passes each input's channels at its offset in the output. On
  another axis (Swin's cyclic shift, `torch.roll` written as two Slices joined again) both
  inputs must carry the same channels, like the operands of a residual Add: the channels pass
  on the same axis and the inputs' producers are tied into one group.
* Split on the channel axis sends the group to the output that holds it, at that output's
  offset, and the output's size shrinks with the group. A group whose channels fall into
  several outputs is cut there (`Step.cuts`): the analyzer makes one group of each part.
  Split on another axis (LeViT's q, k, v taken from each head's features) sends every channel
  to every output, on the same axis.
* Slice (constant bounds, step 1) passes the channels inside it at a new offset and drops
  those outside; its bounds move with the channels pruned before them (after them, for a
  bound counted from the end). Groups straddling a bound are cut like at a Split.
* Gather (constant indices) on another axis than the channels passes them all (a scalar
  index before the channel axis removes an axis, so the channel axis moves down by one): the
  exporters' `h_n[-1]` (Gather on the direction axis of an LSTM's Y_h) and `y[-1]` (on the
  sequence axis). On the channel axis it passes only a repetition, indices [0]·n + [1]·n + …
  (grouped-query attention's key/value heads, graph/repeat_kv.py): channel c then spans the n
  consecutive positions of its copies (`spatial` × n), and the indices of removed channels go
  while the rest are renumbered. Any other selection of channels blocks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.flow import (
    State,
    Step,
    block,
    channel_count,
    const,
    count_edit,
    cuts_at,
    parameter_input,
    rank_of,
    shape_of,
    through,
)
from onnxprune.ops.registry import Handler, register
from onnxprune.ops.torch_support import from_input_or_attr, ints, opt

if TYPE_CHECKING:
    from torch import Tensor

    from onnxprune.ops.torch_support import OpNode, Result, TorchOp


@register("Concat")
class Concat(Handler):
    """Concat along the channel axis: the input's channels move to its offset. Along another
    axis: two activations carrying the same channels, tied."""

    strided = True

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        rank = rank_of(node.outputs[0])
        if rank is None:
            return block(f"Concat '{node.name}' has an unknown rank")
        if node.attrs.get("axis", 0) % rank != state.axis:
            if len(node.inputs) != 2 or any(isinstance(t, gs.Constant) for t in node.inputs):
                return block(
                    f"Concat '{node.name}' joins along another axis than the channels, "
                    "not two activations"
                )
            return through(node, state, couple=True)
        if state.spatial != 1:
            return block(f"Concat '{node.name}' joins channels of several features each")
        before = 0
        for tensor in node.inputs[:index]:
            shape = shape_of(tensor)
            if shape is None or not isinstance(shape[state.axis], int):
                return block(f"Concat '{node.name}' has an input of unknown channel count")
            before += shape[state.axis]
        return through(node, state, offset=state.offset + before)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return None

    def scales_along(self, node: gs.Node, index: int) -> bool:
        return True

    def torch(self, op_type: str) -> TorchOp | None:
        return _concat


@register("Split")
class Split(Handler):
    """Split on the channel axis: the group goes to the output holding it, or is cut. On
    another axis every output carries the whole group."""

    strided = True

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := _data_input(node, index, state)) is not None:
            return found
        rank = rank_of(node.inputs[0])
        if rank is None:
            return block(f"Split '{node.name}' has an unknown rank")
        if node.attrs.get("axis", 0) % rank != state.axis:
            first, *rest = (replace(state, tensor=out.name) for out in node.outputs)
            return Step("through", next=first, also=tuple(rest))
        total = channel_count(node, state.axis)
        sizes = None if total is None else split_sizes(node, total)
        if sizes is None:
            return block(f"Split '{node.name}' has non-constant sizes or an unknown channel count")
        bounds = np.cumsum([0, *sizes]).tolist()
        cuts = cuts_at(bounds[1:-1], state, channels)
        if cuts:
            return block(f"Split '{node.name}' divides the channels between its outputs", cuts)
        k = next(i for i in range(len(sizes)) if bounds[i] <= state.offset < bounds[i + 1])
        nxt = State(node.outputs[k].name, state.axis, state.offset - bounds[k], 1, state.stride)
        return Step("through", next=nxt, edits=[count_edit(node, 1, k, state)])

    def prepare(self, node: gs.Node) -> None:
        """Give the Split its sizes as a constant input (from its `split` attribute or equal
        parts), so they can be edited like any constant."""
        if len(node.inputs) > 1 and node.inputs[1].name:
            return
        total = node.inputs[0].shape[node.attrs.get("axis", 0)]
        sizes = np.asarray(split_sizes(node, int(total)), dtype=np.int64)
        node.attrs.pop("split", None)
        node.attrs.pop("num_outputs", None)
        while len(node.inputs) > 1:  # an empty optional input
            node.inputs.pop()
        node.inputs.append(gs.Constant(f"{node.name}__split", sizes))

    def finish(self, node: gs.Node, index: int, edits: list[ParamEdit], opset: int) -> None:
        """Before opset 13 a Split's sizes are its `split` attribute, not an input."""
        if opset < 13 and len(node.inputs) > 1:
            node.attrs["split"] = [int(v) for v in node.inputs.pop().values]

    def torch(self, op_type: str) -> TorchOp | None:
        return _split

    def max_outputs(self, op_type: str) -> int | None:
        return None


@register("Slice")
class Slice(Handler):
    """Slice with constant bounds: the channels inside pass, those outside are dropped."""

    strided = True

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        rank = rank_of(node.inputs[0])
        inputs = None if rank is None else slice_inputs(node, rank)
        if inputs is None:
            return block(f"Slice '{node.name}' has non-constant starts, ends, axes or steps")
        starts, ends, axes, steps = inputs
        if state.axis not in axes:  # whole channels, of any number of features
            return through(node, state)
        if (found := _data_input(node, index, state)) is not None:
            return found
        i = axes.index(state.axis)
        total = channel_count(node, state.axis)
        if steps[i] != 1 or total is None:
            return block(
                f"Slice '{node.name}' on the channel axis has a step other than 1 or an unknown "
                "channel count"
            )
        start, end = (b + total if b < 0 else min(b, total) for b in (starts[i], ends[i]))
        if start < 0 or end < 0:
            return block(f"Slice '{node.name}' has a bound before the first channel")
        cuts = cuts_at([start, end], state, channels)
        if cuts:
            return block(f"Slice '{node.name}' keeps part of the channels", cuts)
        edits = [
            *_bound_edit(node, 1, i, starts[i], total, state, channels),
            *_bound_edit(node, 2, i, ends[i], total, state, channels),
        ]
        if start <= state.offset and _end_of(state, channels) <= end:
            return through(node, state, offset=state.offset - start, edits=edits)
        return Step("drop", edits=edits)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        """A Slice of other axes only takes whole channel vectors: it commutes."""
        rank = rank_of(node.inputs[0])
        inputs = None if rank is None else slice_inputs(node, rank)
        if inputs is not None and state.axis not in inputs[2]:
            return None
        return f"Slice '{node.name}' cuts the channel axis"

    def torch(self, op_type: str) -> TorchOp | None:
        return _slice


@register("Gather")
class Gather(Handler):
    """Gather with constant indices on another axis than the channels: every channel passes,
    on an axis that moves by the indices' rank minus one when the gathered axis precedes it
    (a scalar index removes that axis). Gathering the channel axis itself selects channels by
    index, which the group's offsets cannot follow: it blocks."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        rank, indices = rank_of(node.inputs[0]), const(node, 1)
        if rank is None or indices is None:
            return block(f"Gather '{node.name}' has non-constant indices or an unknown rank")
        axis = node.attrs.get("axis", 0) % rank
        if axis == state.axis:
            copies = repeats(node)
            end = (state.offset + channels) * state.spatial * (copies or 0)
            if copies is None or end > indices.size:
                return block(f"Gather '{node.name}' selects along the channel axis")
            spatial = state.spatial * copies
            edit = ParamEdit(node.name, 1, 0, state.offset, "chan", spatial)
            return through(node, state, spatial=spatial, edits=[edit])
        moved = state.axis + indices.ndim - 1 if axis < state.axis else state.axis
        return through(node, state, axis=moved)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return None  # a repetition copies each channel: Q ⊗ I_n on the copies

    def scales_along(self, node: gs.Node, index: int) -> bool:
        return True

    def finish(self, node: gs.Node, index: int, edits: list[ParamEdit], opset: int) -> None:
        """A repetition's indices, of the kept channels only, renumbered to their new places."""
        if index == 1 and any(e.role == "chan" for e in edits):
            values = np.asarray(node.inputs[1].values)
            renumbered = np.unique(values, return_inverse=True)[1].reshape(values.shape)
            node.inputs[1] = gs.Constant(node.inputs[1].name, renumbered.astype(values.dtype))

    def torch(self, op_type: str) -> TorchOp | None:
        return _gather


def repeats(node: gs.Node) -> int | None:
    """n when Gather `node` repeats positions 0 … L − 1 of its axis n times each, in order
    (indices [0]·n + [1]·n + … + [L − 1]·n), else None. Positions from L on are not read: a
    group's channels must lie below L·n in the output (the rule checks)."""
    indices = const(node, 1)
    if indices is None or indices.ndim != 1 or not indices.size or indices.min() != 0:
        return None
    size = int(indices.max()) + 1
    if indices.size % size:
        return None
    copies = indices.size // size
    return copies if np.array_equal(indices, np.repeat(np.arange(size), copies)) else None


@register("GatherElements")
class GatherElements(Handler):
    """GatherElements: interpreted, not analyzed (each element picks its own source, so
    channels block)."""

    def torch(self, op_type: str) -> TorchOp | None:
        return _gather_elements


def split_sizes(node: gs.Node, total: int | None) -> list[int] | None:
    """A Split's output sizes along its axis of length `total` (input, attribute or equal
    parts as ONNX defines them), or None when the sizes input is not constant or the parts are
    equal and `total` is unknown (None)."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = const(node, 1)
        return None if value is None else [int(v) for v in value.reshape(-1)]
    if "split" in node.attrs:
        return [int(v) for v in node.attrs["split"]]
    if total is None:
        return None
    parts = int(node.attrs.get("num_outputs", len(node.outputs)))
    size = -(-total // parts)
    return [min(size, total - i * size) for i in range(parts)]


def _data_input(node: gs.Node, index: int, state: State) -> Step | None:
    """Blocks channels entering as a parameter, or flattened ones (`spatial` > 1), which a
    bound on the channel axis would cut mid-channel."""
    if (found := parameter_input(node, index)) is not None:
        return found
    if state.spatial != 1:
        return block(f"{node.op} '{node.name}' cuts flattened channels")
    return None


def slice_inputs(node: gs.Node, rank: int) -> tuple[list[int], ...] | None:
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


def _bound_edit(
    node: gs.Node, index: int, entry: int, bound: int, total: int, state: State, channels: int
) -> list[ParamEdit]:
    """How a Slice bound follows the group: counted from the start, it shrinks with the group's
    removed channels when the group lies before it; counted from the end (negative), it grows
    with them when the group lies after it; past the last channel it needs nothing."""
    if bound < 0 and state.offset >= total + bound:
        return [ParamEdit(node.name, index, entry, state.offset, "tail", state.spatial)]
    if 0 <= bound <= total and _end_of(state, channels) <= bound:
        return [count_edit(node, index, entry, state)]
    return []


def _end_of(state: State, channels: int) -> int:
    """One past the position of the group's last channel on the channel axis."""
    return state.offset + state.stride * (channels - 1) + 1


# ------------------------------------------------------------ torch equivalents


def _concat(n: OpNode, xs: list) -> Result:
    """Concatenate along axis."""
    import torch

    return torch.cat([x for x in xs if x is not None], dim=n.get("axis"))


def _split(n: OpNode, xs: list) -> Result:
    """Split by sizes (input >= 13, attribute before) or into equal parts (num_outputs >= 18)."""
    import torch

    x, axis = xs[0], n.get("axis", 0)
    sizes = from_input_or_attr(n, xs, 1, "split")
    if not sizes:
        count, dim = n.get("num_outputs", n.n_outputs), x.shape[axis]
        chunk = -(-dim // count)
        sizes = [max(0, min(chunk, dim - i * chunk)) for i in range(count)]
    return tuple(torch.split(x, list(sizes), dim=axis))


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    """One axis of Slice with ONNX clamping; negative steps go through index_select."""
    import torch

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
        starts, ends = ints(xs[1]), ints(xs[2])
        axes = ints(xs[3]) if opt(xs, 3) is not None else None
        steps = ints(xs[4]) if opt(xs, 4) is not None else None
    else:
        starts, ends, axes, steps = n.get("starts"), n.get("ends"), n.get("axes"), None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        x = _slice_axis(x, axis % x.dim(), start, end, step)
    return x


def _gather(n: OpNode, xs: list) -> Result:
    """Gather along axis with (possibly negative, any-rank) indices."""
    import torch

    x, idx = xs[0], xs[1].long()
    axis = n.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


def _gather_elements(n: OpNode, xs: list) -> Result:
    """GatherElements (torch.gather) with negative index support."""
    import torch

    x, idx = xs[0], xs[1].long()
    axis = n.get("axis", 0) % x.dim()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))
