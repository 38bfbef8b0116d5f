"""Ops that reshape or permute a tensor: Squeeze, Unsqueeze, Flatten, Reshape, Transpose, Shape.

The channels pass with their axis moved. Flatten from the channel axis and a channel-major
Reshape to (batch, C·H·W) make every channel `spatial` consecutive features (a Reshape with an
explicit feature count has it shrink with the group). Shape is harmless when only dims other
than the channels are read, or when the read builds the target of a Reshape or the sizes of a
Resize of the same tensor (their rules check the entry the count reaches).

A channel shuffle (ShuffleNet) is Reshape (…, C, …) → (…, g, C/g, …), a Transpose swapping those
two axes, and a Reshape back: a fixed permutation that sends channel i·C/g + j to j·g + i. A
group inside one of the g segments (one that straddles a segment boundary is cut there) comes
out with its channels `g` times further apart (`State.stride`), in the same order, so consumers
behind it read them at known rows. Pruning keeps every survivor's relative order at the
shuffle's output: where channels were removed, the rewriter replaces the three nodes by one
Gather of the surviving channels in that order, so the g segments need not keep equal widths
(which ShuffleNet's next shuffle, reading halves of this one's output, could not guarantee).
Any other Reshape splitting the channel axis is refused.

A Reshape that only inserts or removes axes of size 1 (tf2onnx writes a squeeze-excite input as
ReduceMean → Squeeze → Reshape(-1, C, 1, 1)) keeps every channel's values in place: the channel
axis moves to its place among the other axes, and a target entry stating the channel count
shrinks with the group.

A Reshape that keeps the channel axis and every axis after it (same static sizes, last axes of
the output) only regroups the axes before it: in row-major order each trailing block stays
contiguous, so channel c stays channel c. Swin writes its window partition and reverse
(channels last), and the regrouping of its attention logits by window for the shifted-window
mask (heads followed by two token axes), this way. The target's entry for the channel axis
shrinks with the group (a constant, or the constant piece of a Concat of shape pieces), or is
-1, or 0 at the same position (copies the input's axis); a computed one is refused.

`x.flatten(2)` and other Reshapes that keep the channel axis and every axis before it, the
target's entries up to the channels copying the input's dims (0, or read from the input's own
shape, as the legacy exporter writes `x.flatten(2)`), only regroup the axes after it: channel c
stays channel c. The Shape they read shrinks with the input, so it blocks nothing.

`x.reshape_as(src)` after `x = f(src.flatten(0, -2))` (LeViT's Linear + BatchNorm1d over the
tokens) is Reshape(x, Shape(src)) with the channels on the last axis of both: when the data
comes from `src` through Flatten onto the last axis and ops that keep it (BatchNormalization,
activations), the target is `src`'s shape at run time, which shrinks with the same group, so
the Reshape passes the channels to its last axis and the Shape read by it blocks nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.concat_split import slice_inputs
from onnxprune.ops.flow import (
    State,
    Step,
    axes_of,
    block,
    const,
    cuts_at,
    parameter_input,
    rank_of,
    shape_of,
    through,
    without_trailing_ones,
)
from onnxprune.ops.group_norm import group_norm_step, merges_group_norm
from onnxprune.ops.registry import Handler, register
from onnxprune.ops.shape_values import dim_origin, inferred_size, shape_source, target_entry
from onnxprune.ops.torch_support import from_input_or_attr, ints

if TYPE_CHECKING:
    from onnxprune.ops.torch_support import OpNode, Result, TorchOp


class _Commuting(Handler):
    """Moves elements without changing them, alike on every channel: commutes with a rotation
    and passes a scaling on."""

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return None

    def scales_along(self, node: gs.Node, index: int) -> bool:
        return True


@register("Squeeze", "Unsqueeze")
class Squeeze(_Commuting):
    """Squeeze/Unsqueeze: the channel axis moves by the axes removed or inserted before it."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        rank_in, rank_out = rank_of(node.inputs[0]), rank_of(node.outputs[0])
        axes = axes_of(node)
        if rank_in is None or rank_out is None or axes is None:
            return block(f"{node.op} '{node.name}' has unknown axes or shapes")
        if node.op == "Squeeze":
            axes = [a % rank_in for a in axes]
            if state.axis in axes:
                return block(f"Squeeze '{node.name}' removes the channel axis")
            return through(node, state, axis=state.axis - sum(a < state.axis for a in axes))
        axis = state.axis
        for a in sorted(a % rank_out for a in axes):
            if a <= axis:
                axis += 1
        return through(node, state, axis=axis)

    def torch(self, op_type: str) -> TorchOp | None:
        return _squeeze if op_type == "Squeeze" else _unsqueeze


@register("Flatten")
class Flatten(_Commuting):
    """Flatten from the channel axis: each channel becomes the product of the later dims in
    consecutive features on axis 1 (H·W for NCHW; one for channels last, LeViT's BatchNorm1d
    over tokens)."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        shape = shape_of(node.inputs[0])
        axis = node.attrs.get("axis", 1)
        if shape is None or axis % len(shape) != state.axis or state.axis == 0:
            return block(f"Flatten '{node.name}' does not flatten from the channel axis")
        rest = shape[state.axis + 1 :]
        if not all(isinstance(d, int) for d in rest):
            return block(f"Flatten '{node.name}' has dynamic spatial dims")
        spatial = state.spatial * int(np.prod(rest, dtype=np.int64))
        return through(node, state, axis=1, spatial=spatial)

    def torch(self, op_type: str) -> TorchOp | None:
        return _flatten


@register("Reshape")
class Reshape(_Commuting):
    """A channel-major flatten of (batch, C, ...) to (batch, C·H·W), a channel shuffle's first
    Reshape (the shuffle as a whole), or a regrouping of the axes before the channels."""

    strided = True

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        if (norm := group_norm_step(node, state)) is not None:
            return norm
        if state.stride == 1 and (unit := _moves_unit_axes(node, state)) is not None:
            return unit
        if _splits_channel_axis(node, state):
            return _shuffle_step(node, state, channels)
        if state.stride != 1:
            return block(f"Reshape '{node.name}' reshapes shuffled channels")
        if (restored := _restores(node, state)) is not None:
            return restored
        if (kept := _keeps_trailing(node, state)) is not None:
            return kept
        if (merged := _keeps_leading(node, state)) is not None:
            return merged
        if _folds_before(node, state):
            return block(
                f"Reshape '{node.name}' folds the channels into the axis before them (an unfold "
                "into patches, MobileViT's): not followed"
            )
        shape_in, target = shape_of(node.inputs[0]), const(node, 1)
        fail = block(f"Reshape '{node.name}' does not flatten from the channel axis")
        if shape_in is None or target is None or target.size != 2 or state.axis != 1:
            return fail
        rest = shape_in[2:]
        if not all(isinstance(d, int) for d in rest + [shape_in[1]]):
            return fail
        features = int(shape_in[1]) * int(np.prod(rest, dtype=np.int64))
        if not flattens_to_batch(node, shape_in[0], [int(t) for t in target], features):
            return fail
        spatial = state.spatial * int(np.prod(rest, dtype=np.int64))
        edits = (
            []
            if target[1] in (-1, 0)
            else [ParamEdit(node.name, 1, 0, state.offset, "reshape", spatial)]
        )
        return through(node, state, spatial=spatial, edits=edits)

    def torch(self, op_type: str) -> TorchOp | None:
        return _reshape


def _folds_before(node: gs.Node, state: State) -> bool:
    """True when Reshape `node` states the axis before the channels as a product computed with
    the channel count as a factor (MobileViT's unfold `reshape(B·C·nh, ph, nw, pw)`)."""
    shape_in = shape_of(node.inputs[0])
    if state.axis == 0 or shape_in is None or not isinstance(shape_in[state.axis], int):
        return False
    stated = target_entry(node, state.axis - 1)
    if isinstance(stated, Step) or isinstance(stated.tensor, gs.Constant):
        return False
    tensor = stated.tensor
    for _ in range(_RESTORE_DEPTH):
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None or producer.op not in ("Unsqueeze", "Cast", "Mul"):
            return False
        factors = [const(producer, i) for i in range(len(producer.inputs))]
        if producer.op == "Mul" and any(
            f is not None and f.size == 1 and int(f.reshape(-1)[0]) == shape_in[state.axis]
            for f in factors
        ):
            return True
        tensor = next((t for t, f in zip(producer.inputs, factors, strict=True) if f is None), None)
        if tensor is None:
            return False
    return False


def _keeps_trailing(node: gs.Node, state: State) -> Step | None:
    """The step when Reshape `node` keeps the channel axis and every axis after it (module
    docstring), up to axes of size 1 after them all (tf2onnx's Einsums reshape rows to
    (batch, tokens, C, 1)), else None."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if shape_in is None or shape_out is None:
        return None
    tail, out = without_trailing_ones(shape_in[state.axis :]), without_trailing_ones(shape_out)
    if not tail or not all(isinstance(d, int) for d in tail) or len(out) < len(tail):
        return None
    axis = len(out) - len(tail)
    if out[axis:] != tail:
        return None
    return _channels_to(node, state, axis, shape_in[state.axis])


def _moves_unit_axes(node: gs.Node, state: State) -> Step | None:
    """The step when Reshape `node` only inserts or removes axes of size 1 (module docstring),
    else None: with those dropped, both shapes read the same dims, at most one of them (the
    batch) symbolic, so the channel axis keeps its place among the others."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if shape_in is None or shape_out is None or shape_in[state.axis] in (1, None):
        return None
    kept_in = [(i, d) for i, d in enumerate(shape_in) if d != 1]
    kept_out = [(i, d) for i, d in enumerate(shape_out) if d != 1]
    dims_in, dims_out = [d for _, d in kept_in], [d for _, d in kept_out]
    symbolic = [i for i, d in enumerate(dims_in) if not isinstance(d, int)]
    if len(kept_in) != len(kept_out) or len(symbolic) > 1:
        return None
    pairs = zip(dims_in, dims_out, strict=True)
    if any(a != b and (isinstance(a, int) or isinstance(b, int)) for a, b in pairs):
        return None
    axis = kept_out[[i for i, _ in kept_in].index(state.axis)][0]
    return _channels_to(node, state, axis, shape_in[state.axis])


def _channels_to(node: gs.Node, state: State, axis: int, size: int) -> Step:
    """The channels (`size` entries of their axis) pass to output axis `axis` of Reshape `node`:
    the target's entry there shrinks with the group when it states `size`, or needs nothing
    when it is -1 or copies the same input axis (0); anything else blocks."""
    stated = target_entry(node, axis)
    if isinstance(stated, Step):
        return stated
    value = stated.value()
    if value == size:
        edits = [stated.edit(state.offset, state.spatial)]
    elif value == -1 or (value == 0 and axis == state.axis and not node.attrs.get("allowzero")):
        edits = []
    else:
        return block(f"Reshape '{node.name}' states the channel count of axis {axis} as {value}")
    return through(node, state, axis=axis, edits=edits)


def _keeps_leading(node: gs.Node, state: State) -> Step | None:
    """The step when Reshape `node` keeps the channel axis and every axis before it, each
    target entry up to the channels copying the input's dim (0, or read from the input's own
    shape; the channels' entry may also state their static count, which then shrinks with
    them: dynamo's `x.flatten(2)` as [0, C, H·W]; or be -1 where the entries after it are
    constants whose product is the input's proven size after the channels, so that -1 is the
    channel count before and after pruning: HF SegFormer's decode head, tokens back to an image
    as [0, -1, H, W]), and only regroups the axes after it (module docstring); else None."""
    shape_in, shape_out, data = shape_of(node.inputs[0]), shape_of(node.outputs[0]), node.inputs[0]
    if shape_out is None or len(shape_out) <= state.axis or state.spatial != 1:
        return None
    edits = []
    for entry in range(state.axis + 1):
        stated = target_entry(node, entry)
        if isinstance(stated, Step):
            return None
        if isinstance(stated.tensor, gs.Constant):
            count = shape_in[entry] if shape_in is not None and entry == state.axis else None
            if isinstance(count, int) and stated.value() == count > 1:
                edits.append(stated.edit(state.offset))
            elif entry == state.axis and stated.value() == -1:
                if not _fixed_after(node, state.axis):
                    return None
            elif stated.value() != 0 or node.attrs.get("allowzero", 0):
                return None
        elif shape_source(stated.tensor, stated.at) != (data, entry):
            return None
    return through(node, state, edits=edits)


def _fixed_after(node: gs.Node, axis: int) -> bool:
    """True when Reshape `node`'s target is a constant whose -1 entry `axis` stands for the
    input's static size there (`inferred_size`): the constants after it then hold the input's
    sizes after it, and the -1 follows the channel count when it shrinks."""
    size = dim_origin(node.inputs[0], axis)
    return const(node, 1) is not None and isinstance(size, int) and inferred_size(node) == size


def _restores(node: gs.Node, state: State) -> Step | None:
    """The step when Reshape `node` is `x.reshape_as(src)` (module docstring), else None."""
    src = restored_source(node)
    shape_in = shape_of(node.inputs[0])
    if src is None or shape_in is None or state.axis != len(shape_in) - 1:
        return None
    return through(node, state, axis=len(shape_of(src)) - 1)


def restored_source(node: gs.Node) -> gs.Tensor | None:
    """`src` when Reshape `node` reads its target from `Shape(src)` (whole) and its data comes
    from `src` through ops that keep the last axis (module docstring), with that axis static
    and equal in both; else None."""
    shape = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
    if shape is None or shape.op != "Shape" or shape.attrs.get("start", 0) != 0:
        return None
    if shape.attrs.get("end") is not None:
        return None
    src, data = shape.inputs[0], node.inputs[0]
    last_src, last_data = shape_of(src), shape_of(data)
    if last_src is None or last_data is None or not isinstance(last_src[-1], int):
        return None
    if last_src[-1] != last_data[-1]:
        return None
    for _ in range(_RESTORE_DEPTH):
        if data is src:
            return src
        data = keeps_last_axis(data)
        if data is None:
            return None
    return None


_SHAPE_PIECE_OPS = frozenset({"Slice", "Gather", "Unsqueeze", "Squeeze", "Cast", "Concat"})


# ops whose shape-valued input (by index) the reshape / resize rules check against their data
_SHAPED_BY = {"Reshape": 1, "Resize": 3}


def _reshapes_itself(reader: gs.Node, tensor: gs.Tensor, depth: int = 4) -> bool:
    """True when what `reader` reads from `tensor`'s shape only builds targets (through shape
    pieces and their Concat) of Reshapes of `tensor` itself, or the sizes of its Resizes; their
    rules check which entries the channel count reaches."""
    if reader.op not in _SHAPE_PIECE_OPS or depth == 0:
        return False
    users = [u for out in reader.outputs for u in out.outputs]
    return bool(users) and all(
        _shapes(u, tensor, reader.outputs[0]) or _reshapes_itself(u, tensor, depth - 1)
        for u in users
    )


def _shapes(user: gs.Node, tensor: gs.Tensor, vector: gs.Tensor) -> bool:
    """True when `user` reshapes or resizes `tensor` to the shape vector `vector`."""
    index = _SHAPED_BY.get(user.op)
    return (
        index is not None
        and len(user.inputs) > index
        and user.inputs[0] is tensor
        and user.inputs[index] is vector
    )


_RESTORE_DEPTH = 8
_LAST_AXIS_OPS = frozenset({"BatchNormalization", "Identity", "Relu", "HardSwish", "Sigmoid"})


def keeps_last_axis(tensor: gs.Tensor) -> gs.Tensor | None:
    """The one variable input of the node producing `tensor` when that node keeps the last axis
    element for element (Flatten onto it, a BatchNormalization or activation), else None."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None:
        return None
    variable = [t for t in node.inputs if not isinstance(t, gs.Constant)]
    if len(variable) != 1:
        return None
    rank = rank_of(variable[0])
    if node.op == "Flatten" and rank is not None and node.attrs.get("axis", 1) % rank == rank - 1:
        return variable[0]
    return variable[0] if node.op in _LAST_AXIS_OPS else None


@register("Transpose")
class Transpose(Handler):
    """Transpose: the channels pass unchanged on their new axis."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        rank = rank_of(node.inputs[0])
        if rank is None:
            return block(f"Transpose '{node.name}' has an unknown rank")
        perm = list(node.attrs.get("perm", range(rank - 1, -1, -1)))
        return through(node, state, axis=perm.index(state.axis))

    def torch(self, op_type: str) -> TorchOp | None:
        return _transpose


@register("Shape")
class Shape(Handler):
    """Shape reads no values; it ends the path unless the channel count is read from it."""

    strided = True

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        rank = rank_of(node.inputs[0])
        if rank is None:
            return block(f"Shape '{node.name}' reads a tensor of unknown rank")
        start, end = slice(node.attrs.get("start", 0), node.attrs.get("end")).indices(rank)[:2]
        for user in node.outputs[0].outputs:
            if user.op == "Reshape" and restored_source(user) is node.inputs[0]:
                continue  # reshape_as: the restored tensor's channels shrink alike
            if _reshapes_itself(user, node.inputs[0]) or merges_group_norm(user, node.inputs[0]):
                continue  # x.reshape(..., x.shape[c], ...): the read count shrinks with x
            read = _entries_read(user, max(end - start, 0))
            if read is None or state.axis - start in read:
                return block(f"the shape of the channels is read by '{user.name}' ({user.op})")
        return Step("consume")

    def torch(self, op_type: str) -> TorchOp | None:
        return _shape


@register("Size", "Expand", "Tile")
class ShapeArithmetic(Handler):
    """Size, Expand and Tile: interpreted, not analyzed (channels block)."""

    def torch(self, op_type: str) -> TorchOp | None:
        return {"Size": _size, "Expand": _expand, "Tile": _tile}[op_type]


def _entries_read(reader: gs.Node, length: int, depth: int = 4) -> set[int] | None:
    """The entries of a shape vector of `length` entries that `reader` reads: a Gather with
    constant indices, or a Slice of consecutive entries with constant bounds (tf2onnx's batch
    size for a zero initial state: Shape → Cast → Slice(0, 1)), through Casts and through a
    Gather's output when its own readers can be told (tf2onnx permutes an NCHW shape to NHWC,
    then slices the batch); None when it cannot be told."""
    if reader.op == "Cast" and depth:
        return _read_later(reader, length, depth)
    if reader.op == "Gather" and (indices := const(reader, 1)) is not None:
        taken = [int(i) % length for i in np.asarray(indices).reshape(-1)] if length else []
        later = _read_later(reader, len(taken), depth) if np.ndim(indices) == 1 else None
        return set(taken) if later is None else {taken[i] for i in later}
    bounds = slice_inputs(reader, 1) if reader.op == "Slice" else None
    if bounds is not None and len(bounds[0]) == 1 and bounds[3] == [1]:
        return set(range(*slice(bounds[0][0], bounds[1][0]).indices(length)))
    return None


def _read_later(reader: gs.Node, length: int, depth: int) -> set[int] | None:
    """The entries of `reader`'s output (`length` of them) that its users read, or None."""
    if not depth:
        return None
    found: set[int] = set()
    for user in reader.outputs[0].outputs:
        part = _entries_read(user, length, depth - 1)
        if part is None:
            return None
        found |= part
    return found


@dataclass(frozen=True)
class Shuffle:
    """A channel shuffle seen from its first Reshape: `groups` segments of `size` channels on
    `axis`, merged back by the Reshape `last`."""

    groups: int
    size: int
    axis: int
    last: gs.Node

    def permutation(self) -> np.ndarray:
        """Output position → the input position it reads (i·size + j lands at j·groups + i)."""
        out = np.arange(self.groups * self.size)
        return (out % self.groups) * self.size + out // self.groups


def channel_shuffle(node: gs.Node, axis: int) -> Shuffle | str:
    """The channel shuffle whose first Reshape `node` splits channel axis `axis` into two, or
    the reason it is not one (the split axes are not swapped by one Transpose and merged back by
    one Reshape, or their sizes are unknown)."""
    shape_in, middle = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    groups, size = middle[axis], middle[axis + 1]
    what = f"Reshape '{node.name}' splits the channel axis but"
    if not isinstance(groups, int) or not isinstance(size, int):
        return f"{what} the sizes of the split are unknown"
    users = node.outputs[0].outputs
    if len(users) != 1 or users[0].op != "Transpose":
        return f"{what} is not followed by one Transpose (not a channel shuffle)"
    transpose = users[0]
    swapped = list(range(len(middle)))
    swapped[axis : axis + 2] = [axis + 1, axis]
    if list(transpose.attrs.get("perm", range(len(middle) - 1, -1, -1))) != swapped:
        return f"{what} Transpose '{transpose.name}' does not swap the two parts"
    after = transpose.outputs[0].outputs
    last = after[0] if len(after) == 1 and after[0].op == "Reshape" else None
    shape_out = None if last is None else shape_of(last.outputs[0])
    if shape_out is None or len(shape_out) != len(shape_in):
        return f"{what} Transpose '{transpose.name}' is not followed by one Reshape back"
    if shape_out[axis] != groups * size:
        return f"{what} Reshape '{last.name}' does not merge the channels back"
    return Shuffle(groups, size, axis, last)


def _shuffle_step(node: gs.Node, state: State, channels: int) -> Step:
    """The group through a channel shuffle: inside segment i at j0 (every `stride` channels),
    it comes out at j0·g + i, every g·stride channels; a group spanning segments is cut."""
    found = channel_shuffle(node, state.axis)
    if isinstance(found, str):
        return block(found)
    if state.spatial != 1:
        return block(f"Reshape '{node.name}' shuffles flattened channels")
    bounds = [k * found.size for k in range(1, found.groups)]
    cuts = cuts_at(bounds, state, channels)
    if cuts:
        return block(f"channel shuffle '{node.name}' spreads the channels over its segments", cuts)
    segment, first = divmod(state.offset, found.size)
    nxt = State(
        found.last.outputs[0].name,
        state.axis,
        first * found.groups + segment,
        stride=state.stride * found.groups,
    )
    edit = ParamEdit(node.name, 0, state.axis, state.offset, "shuffle", stride=state.stride)
    return Step("through", next=nxt, edits=[edit])


def _splits_channel_axis(node: gs.Node, state: State) -> bool:
    """True when the output has one more axis, everything but the channel axis kept: the
    channel axis was split in two (a channel shuffle's first half)."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if shape_in is None or shape_out is None or len(shape_out) != len(shape_in) + 1:
        return False
    axis = state.axis
    head, tail = shape_in[:axis], shape_in[axis + 1 :]
    return shape_out[:axis] == head and shape_out[axis + 2 :] == tail


def flattens_to_batch(node: gs.Node, batch: object, target: list[int], features: int) -> bool:
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


# ------------------------------------------------------------ torch equivalents


def _flatten(n: OpNode, xs: list) -> Result:
    """2-D view: dims before axis, dims from axis on."""
    x = xs[0]
    axis = n.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reshape(n: OpNode, xs: list) -> Result:
    """Reshape; 0 copies the input dim unless allowzero=1, -1 is inferred."""
    x, shape = xs[0], ints(xs[1])
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
    axes = from_input_or_attr(n, xs, 1, "axes")
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes))


def _unsqueeze(n: OpNode, xs: list) -> Result:
    """Insert size-1 axes at positions of the output (input >= 13, attribute before)."""
    x = xs[0]
    axes = from_input_or_attr(n, xs, 1, "axes")
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _shape(n: OpNode, xs: list) -> Result:
    """Shape as int64, with the opset-15 start/end window (Python slice semantics)."""
    import torch

    dims = list(xs[0].shape)[n.get("start", 0) : n.get("end")]
    return torch.tensor(dims, dtype=torch.int64, device=xs[0].device)


def _size(n: OpNode, xs: list) -> Result:
    """Element count as an int64 scalar."""
    import torch

    return torch.tensor(xs[0].numel(), dtype=torch.int64, device=xs[0].device)


def _expand(n: OpNode, xs: list) -> Result:
    """Bidirectional broadcast of X against the requested shape."""
    import torch

    x = xs[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(xs[1]))))


def _tile(n: OpNode, xs: list) -> Result:
    """Repeat X along each axis."""
    return xs[0].repeat(ints(xs[1]))
