"""LSTM, GRU and RNN: hidden units as channel groups, input features as consumed channels.

An ONNX recurrent node (layout 0) of hidden size H has G gate blocks (LSTM 4: i, o, f, c; GRU 3:
z, r, h; RNN 1) stacked in W [D, G·H, In], R [D, G·H, H] and B [D, 2·G·H] (Wb then Rb), per
direction d < D. Hidden unit j of direction d is row j of every gate block of W, R and B, column
j of R (the recurrence reads h_{t-1}), entry j of the initial states and of the LSTM peepholes
P [D, 3H], and feature j of the output sequence Y [T, D, B, H] (and of Y_h, Y_c [D, B, H]). The
gates act unit by unit, so removing units in all of these at once is exact for the units kept;
one group per layer and direction (`hidden_units`), and the directions of one node keep equal
widths (`hidden_size` is shared).

The group's channels flow on from Y: unidirectionally as Y's last axis (`Squeeze` of the
direction axis and the rest are ordinary ops, or the dynamo exporter's Transpose → Reshape to
(T, B, H)) and from Y_h, Y_c (a classifier's `h_n[-1]` is a Gather of their direction axis:
concat_split.py); bidirectionally through the exporters' Transpose(0, 2, 1, 3) → Reshape to
(T, B, D·H), where direction d is the range [d·H, (d+1)·H) of the last axis, or through Slices
of one direction each on Y's direction axis (tf2onnx's Keras `Bidirectional`), and from Y_h, Y_c
only where every reader is a Gather of one direction (`cat(h_n[-2], h_n[-1])`: each Gather's
output carries that direction's units alone, and a Concat after them places them at d·H). The
recurrence is one more consumer of the hidden state: the correction of a tap carrying h (Y
itself, direction d's entry of it when Y is not merged, or that Reshape) is folded into R's
columns like into any consumer's weights (R' = R Mᵀ, Rb' = Rb + R c). What is exact there and
what is not: docs/DESIGN.md ("Recurrent layers").

A recurrent node reading the group's channels as its input X is a consumer (W's columns); a
constant `c` of the correction goes into Wb (`input_shift`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit, Tap
from onnxprune.ops.concat_split import slice_inputs
from onnxprune.ops.flow import State, Step, const, rank_of, shape_of
from onnxprune.ops.registry import Handler, ShapeOf, node_attrs, register

if TYPE_CHECKING:
    import onnx

    from onnxprune.ops.torch_support import TorchOp

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
"""Recurrent ops and their gate blocks."""

Arrays = dict[int, np.ndarray | None]
"""A recurrent node's W, R, B, initial states and peepholes by input index (None: absent)."""
Walk = tuple[tuple[State, ...], Tap | None, tuple[ParamEdit, ...]]
"""Per direction: the walk's start states, the hidden-state tap, extra edits."""

_INITIAL = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
_PASS_ZERO = frozenset({"Slice", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Cast"})


@dataclass(frozen=True)
class Hidden:
    """One direction's hidden units of a recurrent node, as a producer for the analyzer.

    `starts`: where the walk follows the units (the first is the output sequence). `tap`: a
    tensor carrying the hidden state itself, whose correction is folded into the recurrence.
    """

    channels: int
    lo: int
    whole: bool
    edits: tuple[ParamEdit, ...]
    starts: tuple[State, ...]
    tap: Tap | None
    tie: str
    reason: str | None = None


ROTATION_BLOCK = (
    "gates act unit by unit (sigmoid, tanh): a rotation of the hidden units does not commute"
)


def is_recurrent(node: gs.Node) -> bool:
    """An ONNX LSTM, GRU or RNN node."""
    return node.op in GATES and node.domain in (None, "", "ai.onnx")


def hidden_units(node: gs.Node, outputs: set[str]) -> list[Hidden]:
    """One producer per direction of recurrent `node` (blocked ones carry the reason);
    `outputs` are the graph's output names."""
    size = _hidden_size(node)
    bidirectional = node.attrs.get("direction", "forward") in ("bidirectional", b"bidirectional")
    directions = 2 if bidirectional else 1
    reason = _unsupported(node) or _outputs_reason(node, directions, outputs)
    walks = _starts(node, directions, size) if reason is None else None
    if walks is None:
        reason = reason or (
            f"bidirectional {node.op} '{node.name}': its output is read other than through "
            "Transpose(0, 2, 1, 3) → Reshape to (T, B, 2·H) or Slices of one direction"
        )
        fallback = (State(next(t.name for t in node.outputs if t.name), 0, 0),)
        walks = [(fallback, None, ())] * directions
    return [
        Hidden(
            channels=size,
            lo=d * size,
            whole=directions == 1,
            edits=(_hidden_edit(node, d, tap), *extra) if tap else (),
            starts=starts,
            tap=tap,
            tie=f"{node.name}:hidden",
            reason=reason,
        )
        for d, (starts, tap, extra) in enumerate(walks)
    ]


@register("RNN", "GRU", "LSTM")
class Recurrent(Handler):
    """A recurrent layer reading a group's channels as its input sequence X (W's columns
    consume them); its own hidden units are producers (`hidden_units`)."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        """W's columns consume the channels of X; any other input (initial state, lengths)
        blocks."""
        if index != 0:
            return Step("block", reason=f"channels reach input {index} of {node.op} '{node.name}'")
        reason = _unsupported(node)
        if reason is None and (rank_of(node.inputs[0]) != 3 or state.axis != 2):
            reason = f"{node.op} '{node.name}' reads the channels other than as input features"
        if reason is not None:
            return Step("block", reason=reason)
        edit = ParamEdit(node.name, 1, 2, state.offset, "in", state.spatial, state.tensor)
        return Step("consume", edits=[edit])

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        """Per step and batch row: W·x and R·h for every gate and direction."""
        x = shape_of(node.input[0])
        steps, batch = (x[1], x[0]) if node_attrs(node).get("layout", 0) else (x[0], x[1])
        weights = math.prod(shape_of(node.input[1])) + math.prod(shape_of(node.input[2]))
        return steps * batch * weights

    def torch(self, op_type: str) -> TorchOp | None:
        from onnxprune.ops.torch_recurrent import recurrent

        return recurrent

    def max_outputs(self, op_type: str) -> int | None:
        return 3 if op_type == "LSTM" else 2


def unit_rows(weight: np.ndarray, gates: int, direction: int, channels: int) -> np.ndarray:
    """(H, G·In) rows of W [D, G·H, In] (or its gradient) for `direction`: unit j's rows of
    every gate block side by side (what magnitude ranks and IPPRO pairs with gradients)."""
    block = np.asarray(weight, dtype=np.float64)[direction].reshape(gates, channels, -1)
    return block.transpose(1, 0, 2).reshape(channels, -1)


def input_shift(segment: np.ndarray, c: np.ndarray, axis: int) -> np.ndarray:
    """W c per direction and gate row, (D, G·H), for a consumer W [D, G·H, m, spatial] whose
    input channels (on `axis`) are replaced by constants c."""
    return np.tensordot(segment, c, axes=([axis], [0])).sum(axis=-1)


@dataclass(frozen=True)
class Units:
    """What one direction keeps: unit indices `keep`, and the recurrence's correction (M (k, H),
    c (H,)), None for plain selection."""

    keep: np.ndarray
    M: np.ndarray | None = None
    c: np.ndarray | None = None


def pruned_arrays(node: gs.Node, arrays: Arrays, units: dict[int, Units]) -> Arrays:
    """W, R, B, initial states and peepholes (by input index; None: absent or zero) with the
    hidden units of each direction in `units` removed and the recurrence corrected; directions
    not in `units` keep all units. All directions must keep the same count."""
    out = dict(arrays)
    gates, size = GATES[node.op], arrays[2].shape[-1]
    whole = Units(np.arange(size))
    per = [units.get(d, whole) for d in range(arrays[2].shape[0])]
    if len({len(u.keep) for u in per}) > 1:
        raise ValueError(f"{node.op} '{node.name}': directions would keep unequal hidden sizes")
    reset_inside = node.op == "GRU" and not node.attrs.get("linear_before_reset", 0)
    if out.get(3) is None and any(u.c is not None and np.any(u.c) for u in per):
        out[3] = np.zeros((len(per), 2 * gates * size))
    stacked = [_direction(arrays, out, d, u, gates, reset_inside) for d, u in enumerate(per)]
    for index in stacked[0]:
        out[index] = np.stack([s[index] for s in stacked])
    return out


def is_zero(tensor: gs.Tensor) -> bool:
    """True when `tensor` is provably all zeros: a zero constant, or ConstantOfShape(0), through
    ops that only move or select values and Concats of zeros (the exporters' zero initial
    states; tf2onnx's are Expand(0, [batch, H]))."""
    for _ in range(16):
        if isinstance(tensor, gs.Constant):
            return not np.any(tensor.values)
        if not tensor.inputs:
            return False
        node = tensor.inputs[0]
        if node.op == "Concat":  # tf2onnx stacks a bidirectional layer's zero states
            return all(is_zero(part) for part in node.inputs)
        if node.op == "ConstantOfShape":
            value = node.attrs.get("value")
            return value is None or not np.any(value.values)
        if node.op not in _PASS_ZERO:
            return False
        tensor = node.inputs[0]
    return False


def _hidden_edit(node: gs.Node, direction: int, tap: Tap) -> ParamEdit:
    """The edit of every array the units of `direction` touch; the recurrence takes the
    correction of `tap` (role "hidden": `axis` is the direction)."""
    return ParamEdit(node.name, 2, direction, tap.offset, "hidden", 1, tap.tensor)


def _direction(
    arrays: Arrays, out: Arrays, d: int, units: Units, gates: int, reset_inside: bool
) -> dict[int, np.ndarray]:
    """Direction d's arrays with `units` applied (B from `out`, which may hold a new bias)."""
    size = arrays[2].shape[-1]
    rows = np.concatenate([g * size + units.keep for g in range(gates)])
    recurrence = arrays[2][d]
    if units.M is None:
        folded = recurrence[:, units.keep]
    else:
        folded = recurrence @ np.asarray(units.M).T
        if reset_inside:  # GRU's h block reads r ⊙ h_{t-1}, which no map of h_S reproduces
            folded[2 * size :] = recurrence[2 * size :, units.keep]
    result = {1: arrays[1][d][rows], 2: folded[rows]}
    if out.get(3) is not None:
        bias = out[3][d].reshape(2, gates * size).copy()
        if units.c is not None:
            shift = recurrence @ np.asarray(units.c)
            if reset_inside:
                shift[2 * size :] = 0.0
            bias[1] += shift
        result[3] = bias[:, rows].reshape(-1)
    for index in (5, 6):
        if arrays.get(index) is not None:
            result[index] = arrays[index][d][:, units.keep]
    if arrays.get(7) is not None:
        result[7] = arrays[7][d].reshape(3, size)[:, units.keep].reshape(-1)
    return result


def _initial_inputs(node: gs.Node) -> tuple[int, ...]:
    """Input indices of the initial states (h, and c for an LSTM)."""
    return _INITIAL[node.op]


def _hidden_size(node: gs.Node) -> int:
    size = node.attrs.get("hidden_size")
    recurrence = const(node, 2)
    return int(size if size is not None else recurrence.shape[-1])


def _unsupported(node: gs.Node) -> str | None:
    """Why `node`'s weights cannot be edited, or None."""
    if node.attrs.get("layout", 0) != 0:
        return f"{node.op} '{node.name}' has layout=1 (batch-first): not supported"
    for index, what in ((1, "W"), (2, "R"), (3, "B"), (7, "P")):
        present = len(node.inputs) > index and node.inputs[index].name
        if (present or index < 3) and const(node, index) is None:
            return f"{node.op} '{node.name}' has a non-constant {what}"
    for index in _initial_inputs(node):
        tensor = node.inputs[index] if len(node.inputs) > index else None
        if (
            tensor is not None
            and tensor.name
            and not (isinstance(tensor, gs.Constant) or is_zero(tensor))
        ):
            return f"{node.op} '{node.name}' has an initial state that is neither constant nor zero"
    return None


def _outputs_reason(node: gs.Node, directions: int, outputs: set[str]) -> str | None:
    """Bidirectional final states (Y_h, Y_c) hold the directions on axis 0: followed only
    through Gathers that each read one direction."""
    sequence = node.outputs[0] if node.outputs else None
    if sequence is None or not sequence.name:
        return f"{node.op} '{node.name}' does not output its hidden-state sequence Y"
    if directions == 2 and any(t.name in outputs for t in node.outputs):
        return f"bidirectional {node.op} '{node.name}': Y, Y_h or Y_c is a graph output"
    if directions == 2 and any(_final_reads(t, directions) is None for t in _finals(node)):
        return (
            f"bidirectional {node.op} '{node.name}': its final states Y_h/Y_c are read other "
            "than one direction at a time (a Gather on axis 0)"
        )
    return None


def _finals(node: gs.Node) -> list[gs.Tensor]:
    """The final states Y_h (and Y_c) the node outputs."""
    return [t for t in node.outputs[1:] if t.name]


def _final_reads(final: gs.Tensor, directions: int) -> list[tuple[int, State]] | None:
    """(direction, where its units are) for every reader of a final state [D, B, H]: a Gather
    on axis 0 with constant indices that all name one direction, whose output holds that
    direction's units on the axis after the indices'. None when any reader is something else."""
    found = []
    for reader in final.outputs:
        indices = const(reader, 1) if reader.op == "Gather" else None
        if indices is None or reader.inputs[0] is not final or reader.attrs.get("axis", 0) % 3:
            return None
        named = {int(i) % directions for i in indices.reshape(-1)}
        if len(named) != 1:
            return None
        found.append((named.pop(), State(reader.outputs[0].name, indices.ndim + 1, 0)))
    return found


def _direction_slices(sequence: gs.Tensor, directions: int) -> list[tuple[int, State]] | None:
    """(direction, where its units are) for every reader of Y [T, D, B, H], each a Slice of
    one direction on axis 1 (tf2onnx's Bidirectional: Slice, Squeeze, then a time step); []
    when Y is unread, None when any reader is something else."""
    found = []
    for reader in sequence.outputs:
        bounds = slice_inputs(reader, 4) if reader.op == "Slice" else None
        if bounds is None or bounds[2] != [1] or bounds[3] != [1]:
            return None
        picked = range(*slice(bounds[0][0], bounds[1][0]).indices(directions))
        if len(picked) != 1:
            return None
        found.append((picked[0], State(reader.outputs[0].name, 3, 0)))
    return found


def _starts(node: gs.Node, directions: int, size: int) -> list[Walk] | None:
    """Per direction: (walk start states, hidden-state tap, extra edits); None when a
    bidirectional output is not merged the way the exporters merge it."""
    sequence = node.outputs[0]
    merged = _merged(sequence, directions, size)
    if directions == 1:
        finals = tuple(State(t.name, 2, 0) for t in node.outputs[1:] if t.name)
        if merged is None:  # Y read as it is (Squeeze of the direction axis, or not at all)
            return [((State(sequence.name, 3, 0), *finals), Tap(sequence.name, 3, 0), ())]
        reshape, stated = merged  # the dynamo exporter merges (T, B, 1, H) to (T, B, H)
        out = reshape.outputs[0].name
        extra = tuple(ParamEdit(n, i, e, 0, "count") for n, i, e in stated)
        return [((State(out, 2, 0), *finals), Tap(out, 2, 0), extra)]
    gathers = [read for t in _finals(node) for read in _final_reads(t, directions) or ()]
    sliced = _direction_slices(sequence, directions) if merged is None else []
    if sliced is None:
        return None
    walks = []
    for d in range(directions):
        gathered = tuple(state for direction, state in gathers + sliced if direction == d)
        if merged is None:  # Y itself is unread: direction d's entry of it is the hidden tap
            tap = Tap(sequence.name, 3, 0, select=(1, d))
            walks.append((gathered or (State(sequence.name, 3, 0),), tap, ()))
            continue
        reshape, stated = merged
        out = reshape.outputs[0].name
        extra = tuple(ParamEdit(n, i, e, d * size, "count") for n, i, e in stated)
        walks.append(((State(out, 2, d * size), *gathered), Tap(out, 2, d * size), extra))
    return walks


def _merged(
    sequence: gs.Tensor, directions: int, size: int
) -> tuple[gs.Node, list[tuple[str, int, int]]] | None:
    """The Reshape after Transpose(0, 2, 1, 3) that turns Y into (T, B, D·H), and the
    (node, input, entry) of every constant that states D·H (none for -1); None when Y is read
    any other way. Besides the Reshape, only Shape nodes reading the leading dims may read the
    transposed tensor (the dynamo exporter computes the target from them)."""
    if len(sequence.outputs) != 1 or sequence.outputs[0].op != "Transpose":
        return None
    transpose = sequence.outputs[0]
    if list(transpose.attrs.get("perm", [])) != [0, 2, 1, 3]:
        return None
    users = transpose.outputs[0].outputs
    reshapes = [u for u in users if u.op == "Reshape"]
    if len(reshapes) != 1 or not all(u.op == "Reshape" or _leading_dims_only(u) for u in users):
        return None
    reshape = reshapes[0]
    shape = shape_of(reshape.outputs[0])
    if shape is None or len(shape) != 3:  # (allowzero is moot: the inferred shape says D·H)
        return None
    stated = _last_entry(reshape, directions * size)
    return None if shape[2] != directions * size or stated is None else (reshape, stated)


def _last_entry(reshape: gs.Node, width: int) -> list[tuple[str, int, int]] | None:
    """Where the Reshape target's last entry (the merged D·H) is stated: [] for -1, the
    constant holding `width` as (node, input, entry), None when it is anything else."""
    target = const(reshape, 1)
    where = (reshape.name, 1, 2)
    if target is None:  # dynamo: Concat(leading dims from Shape, constant last entry)
        source = reshape.inputs[1].inputs
        if (
            not source
            or source[0].op != "Concat"
            or const(source[0], len(source[0].inputs) - 1) is None
        ):
            return None
        concat = source[0]
        target = const(concat, len(concat.inputs) - 1)
        where = (concat.name, len(concat.inputs) - 1, target.size - 1)
    last = int(target.reshape(-1)[-1])
    if last == -1:
        return []
    return [where] if last == width else None


def _leading_dims_only(node: gs.Node) -> bool:
    """A Shape whose readers take only entries before the last (the hidden axis) from it."""
    if node.op != "Shape":
        return False
    return all(_reads_before(user, 3) for user in node.outputs[0].outputs)


def _reads_before(node: gs.Node, last: int) -> bool:
    """A Slice or Gather of a shape vector (length last + 1) that never reads entry `last`."""
    if node.op == "Gather":
        indices = const(node, 1)
        return indices is not None and all(i % (last + 1) < last for i in indices.reshape(-1))
    if node.op == "Slice" and len(node.inputs) in (3, 4):
        starts, ends = const(node, 1), const(node, 2)
        if starts is None or ends is None or starts.size != 1:
            return False
        end = int(ends.reshape(-1)[0])
        return int(starts.reshape(-1)[0]) >= 0 and 0 <= end <= last
    return False
