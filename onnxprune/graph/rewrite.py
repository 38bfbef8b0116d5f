"""Apply Plans to a graph: slice producers and per-channel parameters, fold corrections downstream.

For a tap a ≈ Mᵀ a_S + c, a consumer with weight W (input axis of size m) becomes W' = W Mᵀ and
its bias b' = b + W c (summed over kernel taps and flattened positions; a ConvTranspose gets the
exact per-position response of c, which strides make non-uniform). Edits on one constant are
applied from the highest channel offset down, so Concat segments of several groups stay aligned.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from itertools import groupby

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import OnnxPruneError
from onnxprune.graph.channel_norm import norm_readers, rebuild
from onnxprune.graph.external import drop_pages
from onnxprune.graph.groups import ChannelGroup, ParamEdit, tap_key
from onnxprune.graph.load import infer_shapes, set_bias_input
from onnxprune.graph.weights import edit_rows
from onnxprune.ops.conv import is_grouped_conv
from onnxprune.ops.flow import single_user
from onnxprune.ops.recurrent import Units, input_shift, is_recurrent, is_zero, pruned_arrays
from onnxprune.ops.registry import handler_for
from onnxprune.ops.reshape import channel_shuffle
from onnxprune.plan import Plan


def rewrite(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    plans: Mapping[str, Plan],
    *,
    exact_borders: bool = False,
) -> gs.Graph:
    """Return a new graph with every planned group pruned; `graph` is left unchanged.

    With `exact_borders`, a correction's constant reaches a zero-padded Conv consumer as an
    exact per-position map (an Add after it) instead of the per-unit bias, which is exact only
    away from the borders."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            _ = tensor.values  # loaded once here, so that the copy shares the array
    graph = graph.copy()  # shares the arrays: every edit below makes a new constant
    nodes = {node.name: node for node in graph.nodes}
    jobs: dict[tuple[str, int], list[tuple[ParamEdit, ChannelGroup, Plan]]] = defaultdict(list)
    splits: dict[str, list[tuple[ParamEdit, ChannelGroup, Plan]]] = defaultdict(list)
    hidden: dict[str, list[tuple[ParamEdit, ChannelGroup, Plan]]] = defaultdict(list)
    shuffles: dict[str, list[tuple[ParamEdit, ChannelGroup, Plan]]] = defaultdict(list)
    norms: list[tuple[ParamEdit, ChannelGroup, Plan]] = []
    for group in groups:
        plan = plans.get(group.name)
        if plan is None or not group.prunable:
            continue
        for edit in group.edits:
            if edit.role == "split":
                splits[edit.node].append((edit, group, plan))
            elif edit.role == "hidden":
                hidden[edit.node].append((edit, group, plan))
            elif edit.role == "shuffle":
                shuffles[edit.node].append((edit, group, plan))
            elif edit.role == "norm":
                norms.append((edit, group, plan))
            else:
                jobs[(edit.node, edit.input)].append((edit, group, plan))
    for edit, _, plan in norms:
        for item in _rebuilt_norm(graph, nodes[edit.node], edit, plan):
            jobs[(item[0].node, item[0].input)].append(item)
    deltas: dict[str, np.ndarray] = {}
    for plan in plans.values():
        for name, shift in plan.shifts.items():
            _accumulate(deltas, name, np.asarray(shift, dtype=np.float64))
    for (name, index), items in jobs.items():
        node = nodes[name]
        handler_for(node).prepare(node)
        source = node.inputs[index].values
        value = np.asarray(source)
        grouped = index == 1 and is_grouped_conv(node)
        apply = _apply_grouped if grouped else _apply_all
        exact = not grouped and all(_selects(edit, plan, node) for edit, _, plan in items)
        work = apply(value if exact else value.astype(np.float64), items, node, deltas,
                     exact_borders)  # fmt: skip
        fresh = not np.may_share_memory(work, value)  # then no second copy of a new weight
        node.inputs[index] = gs.Constant(
            f"{node.inputs[index].name}__{name}", work.astype(value.dtype, copy=not fresh)
        )
        drop_pages(source)  # read once: a mapped weight's pages need not stay resident
    for name in sorted({*hidden, *(n for n in deltas if is_recurrent(nodes[n]))}):
        _prune_recurrent(nodes[name], hidden.get(name, []), deltas.pop(name, None))
    for (name, index), items in jobs.items():
        handler_for(nodes[name]).finish(nodes[name], index, [e for e, _, _ in items], graph.opset)
    for name, items in splits.items():
        nodes[name].attrs["split"] = _new_split(items)
    for name, items in shuffles.items():
        _gather_survivors(graph, nodes[name], items)
    outputs = _output_plans(groups, plans)
    for name, delta in deltas.items():
        add_bias(graph, nodes[name], _to_new_outputs(delta, name, outputs.get(name, [])))
    graph.cleanup().toposort()
    return infer_shapes(graph)


def _rebuilt_norm(
    graph: gs.Graph, node: gs.Node, edit: ParamEdit, plan: Plan
) -> list[tuple[ParamEdit, ChannelGroup, Plan]]:
    """Rebuild a LayerNorm over the group's channels from the kept ones (graph/channel_norm.py)
    and return the folds of its map into the layers reading it, as consumer edits."""
    readers = norm_readers(node)
    if isinstance(readers, str) or any(t is node.outputs[0] for t in graph.outputs):
        why = readers if isinstance(readers, str) else "its output is a graph output"
        raise OnnxPruneError(f"cannot rebuild LayerNormalization '{node.name}': {why}")
    rebuilt = rebuild(graph, node, plan, tap_key(edit.tap, edit.offset))
    if rebuilt is None:
        return []
    fold = ChannelGroup(f"{node.name}__rebuilt", rebuilt.width, (node.name,))
    kept = np.arange(np.shape(rebuilt.correction.M)[0])
    return [
        (reader, fold, Plan(kept, {tap_key(reader.tap, reader.offset): rebuilt.correction}))
        for reader in readers
    ]


def _prune_recurrent(
    node: gs.Node, items: list[tuple[ParamEdit, ChannelGroup, Plan]], shift: np.ndarray | None
) -> None:
    """Remove the planned hidden units of an LSTM/GRU/RNN (its weights already carry the
    folds of the groups it consumes, and `shift` = W c of their constants goes into Wb first).

    Zero initial states are dropped (an absent state is zero); the recurrence takes the
    correction of the hidden-state tap the edit names."""
    arrays = {i: _optional(node, i) for i in (1, 2, 3, 5, 6, 7)}
    if shift is not None:
        if arrays[3] is None:
            arrays[3] = np.zeros((shift.shape[0], 2 * shift.shape[1]))
        arrays[3][:, : shift.shape[1]] += shift
    units = {}
    for edit, _, plan in items:
        correction = plan.corrections.get(tap_key(edit.tap, edit.offset))
        units[edit.axis] = Units(
            np.asarray(plan.keep),
            None if correction is None else np.asarray(correction.M, dtype=np.float64),
            None if correction is None or correction.c is None else np.asarray(correction.c),
        )
    try:
        arrays = pruned_arrays(node, arrays, units)
    except ValueError as err:
        raise OnnxPruneError(str(err)) from None
    _set_recurrent_inputs(node, arrays)
    node.attrs["hidden_size"] = int(arrays[2].shape[-1])


def _set_recurrent_inputs(node: gs.Node, arrays: dict[int, np.ndarray | None]) -> None:
    """Write the new arrays as the node's inputs: a bias created here is appended, and a
    dropped (zero) initial state becomes an empty input."""
    dtype = node.inputs[1].values.dtype
    while len(node.inputs) < 8 and arrays.get(len(node.inputs)) is not None:
        node.inputs.append(gs.Variable.empty())
    for index, value in arrays.items():
        if index < len(node.inputs) and (value is not None or index in (5, 6)):
            node.inputs[index] = (
                gs.Variable.empty()
                if value is None
                else gs.Constant(f"{node.name}__in{index}", value.astype(dtype))
            )


def _optional(node: gs.Node, index: int) -> np.ndarray | None:
    """Input `index` of a recurrent node as float64; None when absent, or for an initial state
    (5, 6) that is provably zero (it may be computed, e.g. ConstantOfShape of the batch)."""
    tensor = node.inputs[index] if len(node.inputs) > index else None
    if tensor is None or not tensor.name or (index in (5, 6) and is_zero(tensor)):
        return None
    return np.asarray(tensor.values, dtype=np.float64)


def _apply_all(
    work: np.ndarray,
    items: list[tuple[ParamEdit, ChannelGroup, Plan]],
    node: gs.Node,
    deltas: dict[str, np.ndarray],
    exact_borders: bool,
) -> np.ndarray:
    """Every edit of one constant, in `_edit_order`; the edits along an axis where a group
    lies behind a channel shuffle (interleaved with others) are applied in place together."""
    ordered = sorted(items, key=_edit_order)
    for _, batch in groupby(ordered, key=lambda item: _edit_order(item)[:2]):
        batch = list(batch)
        if any(edit.stride != 1 for edit, _, _ in batch):
            work = _apply_in_place(work, batch, node, deltas, exact_borders)
            continue
        for edit, group, plan in batch:
            work = _apply(work, edit, group, plan, node, deltas, exact_borders)
    return work


def _apply_in_place(
    work: np.ndarray,
    items: list[tuple[ParamEdit, ChannelGroup, Plan]],
    node: gs.Node,
    deltas: dict[str, np.ndarray],
    exact_borders: bool,
) -> np.ndarray:
    """Edits along one axis whose groups interleave (channels every `stride` rows, behind a
    channel shuffle): each group's rows are edited as a segment of their own and written back
    over the rows of the channels it keeps; the rows of removed channels are dropped last.

    The survivors keep their original order, the order of the pruned tensor: ops between the
    shuffle and here keep order, and a pruned shuffle gathers its survivors in that order."""
    work, axis, dropped = work.copy(), items[0][0].axis, []
    for edit, group, plan in items:
        keep = _ordered_keep(group, plan)
        rows = edit_rows(edit, group.channels)
        key = tap_key(edit.tap, edit.offset) if edit.tap else None  # its correction's key
        alone = replace(edit, offset=0, stride=1, tap=key)
        done = _apply(np.take(work, rows, axis=axis), alone, group, plan, node, deltas,
                      exact_borders)  # fmt: skip
        kept = rows.reshape(group.channels, -1)[keep].reshape(-1)
        index = [slice(None)] * work.ndim
        index[axis] = kept
        work[tuple(index)] = done
        dropped.append(np.setdiff1d(rows, kept))
    return np.delete(work, np.concatenate(dropped), axis=axis)


def _ordered_keep(group: ChannelGroup, plan: Plan) -> np.ndarray:
    """The plan's kept channels, which must be in increasing order where a channel shuffle
    places them by their original order."""
    keep = np.asarray(plan.keep)
    if np.any(np.diff(keep) <= 0):
        raise OnnxPruneError(
            f"group '{group.name}' keeps its channels out of order behind a channel shuffle"
        )
    return keep


def _gather_survivors(
    graph: gs.Graph, node: gs.Node, items: list[tuple[ParamEdit, ChannelGroup, Plan]]
) -> None:
    """Replace the channel shuffle starting at Reshape `node`, where it loses channels, by a
    Gather of the surviving channels in their order at its output (ops/reshape.py)."""
    axis = items[0][0].axis
    found = channel_shuffle(node, axis)
    if isinstance(found, str):
        raise OnnxPruneError(f"cannot rewrite a pruned channel shuffle: {found}")
    alive = np.ones(found.groups * found.size, dtype=bool)
    for edit, group, plan in items:
        rows = edit_rows(edit, group.channels)
        alive[np.delete(rows, _ordered_keep(group, plan))] = False
    if alive.all():
        return
    order = found.permutation()
    survivors = (np.cumsum(alive) - 1)[order[alive[order]]]
    last = found.last
    indices = gs.Constant(f"{last.name}__survivors", survivors.astype(np.int64))
    gather = gs.Node("Gather", f"{last.name}__gather", {"axis": axis}, outputs=list(last.outputs))
    gather.inputs.extend([node.inputs[0], indices])
    last.outputs.clear()
    graph.nodes.append(gather)


def _apply_grouped(
    work: np.ndarray,
    items: list[tuple[ParamEdit, ChannelGroup, Plan]],
    node: gs.Node,
    deltas: dict[str, np.ndarray],
    exact_borders: bool,
) -> np.ndarray:
    """A grouped Conv's filters, edited one conv group at a time: an edit of its outputs
    (axis 0) or of its input channels (axis 1, at an offset into all input channels) touches
    only the filters of the conv group it falls in, and a bias shift only that group's outputs.
    The conv group's filters are padded to the edit's offset, so the edit applies unchanged.
    """
    blocks = node.attrs["group"]
    rows, width = work.shape[0] // blocks, work.shape[1]
    chunks = np.split(work, blocks, axis=0)
    for edit, group, plan in sorted(items, key=_edit_order):
        size = rows if edit.axis == 0 else width
        k = edit.offset // size
        pads = [(0, 0)] * work.ndim
        pads[edit.axis] = (k * size, 0)  # conv group k's filters, at the edit's own offsets
        shifts: dict[str, np.ndarray] = {}
        done = _apply(np.pad(chunks[k], pads), edit, group, plan, node, shifts, exact_borders)
        chunks[k] = np.take(done, np.arange(k * size, done.shape[edit.axis]), axis=edit.axis)
        for shift in shifts.values():
            full = np.zeros((work.shape[0], *shift.shape[1:]))
            full[k * rows : (k + 1) * rows] = shift
            _accumulate(deltas, node.name, full)
    if len({chunk.shape[:2] for chunk in chunks}) > 1:
        raise OnnxPruneError(
            f"grouped Conv '{node.name}' would keep unequal channel counts per conv group"
        )
    return np.concatenate(chunks, axis=0)


def _new_split(items: list[tuple[ParamEdit, ChannelGroup, Plan]]) -> int:
    """A TSRA's new split: the original less every group's pruned channels that lay before it."""
    split = int(items[0][0].split)
    removed = 0
    for edit, group, plan in items:
        before = min(max(split - edit.offset, 0), group.channels)  # the group's channels in U
        removed += before - int(np.sum(np.asarray(plan.keep) < before))
    return split - removed


def _edit_order(item: tuple[ParamEdit, ChannelGroup, Plan]) -> tuple[bool, int, int]:
    """Consumer folds before output slicing (their bias shifts are computed on the original
    outputs), and along one axis the highest offset first (lower segments stay in place)."""
    edit = item[0]
    return edit.role == "out", edit.axis, -edit.offset


def _output_plans(
    groups: tuple[ChannelGroup, ...], plans: Mapping[str, Plan]
) -> dict[str, list[tuple[ChannelGroup, Plan]]]:
    """Producer node → its groups and plans (several where a Split cut its outputs), to map
    consumer bias shifts to the pruned outputs."""
    found = defaultdict(list)
    for group in groups:
        if group.prunable and group.name in plans:
            for name in group.producers:
                found[name].append((group, plans[group.name]))
    return found


def _to_new_outputs(
    delta: np.ndarray, name: str, owners: list[tuple[ChannelGroup, Plan]]
) -> np.ndarray:
    """A shift computed for the original output channels of producer `name`, rotated and sliced
    like its outputs (each group's segment, from the highest first row down)."""
    for group, plan in sorted(owners, key=lambda owner: -owner[0].row_span(name)[0]):
        lo, rows = group.row_span(name)
        end = lo + group.channels * rows
        segment = delta[lo:end].reshape(group.channels, rows, *delta.shape[1:])
        if plan.rotation is not None:
            segment = np.tensordot(np.asarray(plan.rotation), segment, axes=([1], [0]))
        segment = segment[np.asarray(plan.keep)].reshape(-1, *delta.shape[1:])
        delta = np.concatenate([delta[:lo], segment, delta[end:]])
    return delta


def _apply(
    work: np.ndarray,
    edit: ParamEdit,
    group: ChannelGroup,
    plan: Plan,
    node: gs.Node,
    deltas: dict[str, np.ndarray],
    exact_borders: bool,
) -> np.ndarray:
    m, keep = group.channels, np.asarray(plan.keep)
    if edit.role in ("reshape", "count", "tail"):
        work = work.copy()
        sign = 1 if edit.role == "tail" else -1  # counted from the end, the entry grows
        entry = 1 if edit.role == "reshape" else edit.axis  # a 0-d count is its entry 0
        work.reshape(-1)[entry] += sign * (m - len(keep)) * edit.spatial
        return work
    if plan.rotation is not None and _rotates(edit, node):
        work = _map_segment(work, edit, m, np.asarray(plan.rotation))
    if edit.role != "in":
        return _select(work, edit, m, keep)
    correction = plan.corrections.get(tap_key(edit.tap, edit.offset)) if edit.tap else None
    if correction is None:
        return _select(work, edit, m, keep)
    if np.shape(correction.M)[1] == m * edit.spatial != m:  # a map of every feature (heads)
        edit, m = replace(edit, offset=edit.offset * edit.spatial, spatial=1), m * edit.spatial
    if correction.c is not None and np.any(correction.c):
        c = np.asarray(correction.c, dtype=np.float64)
        delta = _padded_conv_shift(work, edit, m, node, c) if exact_borders else None
        if node.op == "ConvTranspose":
            delta = _conv_transpose_shift(work, edit, m, node, c)
        if delta is None:
            delta = _weight_times(work, edit, m, node, c)
        _accumulate(deltas, node.name, delta)
    return _map_segment(work, edit, m, np.asarray(correction.M, dtype=np.float64))


def _selects(edit: ParamEdit, plan: Plan, node: gs.Node) -> bool:
    """True when `_apply` only selects entries of the constant for this edit (no arithmetic):
    then it runs in the constant's own dtype, exactly, without a float64 copy of it (a large
    model's first weight is often larger than all the others)."""
    if edit.role in ("reshape", "count", "tail"):
        return False
    if plan.rotation is not None and _rotates(edit, node):
        return False
    if edit.role != "in" or not edit.tap:
        return True
    return plan.corrections.get(tap_key(edit.tap, edit.offset)) is None


def _accumulate(deltas: dict[str, np.ndarray], name: str, delta: np.ndarray) -> None:
    """Sum shifts per output unit (C,) and per output position (C, H, W) of one consumer."""
    old = deltas.get(name)
    if old is None:
        deltas[name] = delta
        return
    if old.ndim != delta.ndim:
        rank = max(old.ndim, delta.ndim)
        old, delta = (x.reshape(-1, *[1] * (rank - 1)) if x.ndim == 1 else x for x in (old, delta))
    deltas[name] = old + delta


def _rotates(edit: ParamEdit, node: gs.Node) -> bool:
    """Producer rows and per-channel additive constants turn with the channels (Q(x+c) = Qx+Qc)."""
    return edit.role == "out" or (edit.role == "chan" and node.op in ("Add", "Sub"))


def _split(work: np.ndarray, edit: ParamEdit, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(before, segment with the channel axis split into (m, spatial), after) along edit.axis."""
    sp, start = edit.spatial, edit.offset * edit.spatial
    before, seg, after = np.split(work, [start, start + m * sp], axis=edit.axis)
    shape = list(seg.shape)
    shape[edit.axis : edit.axis + 1] = [m, sp]
    return before, seg.reshape(shape), after


def _join(before: np.ndarray, seg: np.ndarray, after: np.ndarray, axis: int) -> np.ndarray:
    shape = list(seg.shape)
    shape[axis : axis + 2] = [shape[axis] * shape[axis + 1]]
    return np.concatenate([before, seg.reshape(shape), after], axis=axis)


def _select(work: np.ndarray, edit: ParamEdit, m: int, keep: np.ndarray) -> np.ndarray:
    if work.ndim == 0:
        return work
    before, seg, after = _split(work, edit, m)
    return _join(before, np.take(seg, keep, axis=edit.axis), after, edit.axis)


def _map_segment(work: np.ndarray, edit: ParamEdit, m: int, matrix: np.ndarray) -> np.ndarray:
    """Replace the segment's channels j by Σ_j seg[j]·matrix[s, j] for every row s of matrix."""
    before, seg, after = _split(work, edit, m)
    mapped = np.moveaxis(np.tensordot(seg, matrix, axes=([edit.axis], [1])), -1, edit.axis)
    return _join(before, mapped, after, edit.axis)


def _weight_times(
    work: np.ndarray, edit: ParamEdit, m: int, node: gs.Node, c: np.ndarray
) -> np.ndarray:
    """W c for the consumer's output units: contract channels with c, sum taps and positions."""
    _, seg, _ = _split(work, edit, m)
    if is_recurrent(node):
        return input_shift(seg, c, edit.axis)
    out_axis = handler_for(node).out_axis(node)
    # contracting the channel axis leaves the output axis at its original index
    weighted = np.moveaxis(np.tensordot(seg, c, axes=([edit.axis], [0])), out_axis, 0)
    total = weighted.reshape(weighted.shape[0], -1).sum(axis=1)
    if node.op == "Gemm":
        total = total * node.attrs.get("alpha", 1.0)
    return total


def _padded_conv_shift(
    work: np.ndarray, edit: ParamEdit, m: int, node: gs.Node, c: np.ndarray
) -> np.ndarray | None:
    """The exact (C_out, H_out, W_out) output change of a zero-padded 2-D Conv whose input
    channels are replaced by constants c: a kernel tap that falls on padding reads 0, not c.

    None (use the per-unit sum) when the conv has no padding, uses auto_pad, or its input's
    spatial size is not static.
    """
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    shape = node.inputs[0].shape
    if (node.op != "Conv" or edit.spatial != 1 or work.ndim != 4 or not any(pads)
            or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET")
            or shape is None or len(shape) != 4
            or not all(isinstance(d, int) for d in shape[2:])):  # fmt: skip
        return None
    _, seg, _ = _split(work, edit, m)  # (O, m, 1, kh, kw)
    taps = np.tensordot(seg[:, :, 0], c, axes=([1], [0]))  # (O, kh, kw)
    strides = node.attrs.get("strides", [1, 1])
    dilations = node.attrs.get("dilations", [1, 1])
    inside = [
        _tap_inside(size, k, stride, dilation, before, after)
        for size, k, stride, dilation, before, after in zip(
            shape[2:], taps.shape[1:], strides, dilations, pads[:2], pads[2:], strict=True
        )
    ]
    return np.einsum("okl,kh,lw->ohw", taps, inside[0], inside[1])


def _tap_inside(size: int, k: int, stride: int, dilation: int, before: int, after: int):
    """(k, out) mask: kernel tap t at output index o reads an input inside [0, size)."""
    out = (size + before + after - dilation * (k - 1) - 1) // stride + 1
    index = np.arange(out)[None, :] * stride - before + np.arange(k)[:, None] * dilation
    return ((index >= 0) & (index < size)).astype(np.float64)


def _conv_transpose_shift(
    work: np.ndarray, edit: ParamEdit, m: int, node: gs.Node, c: np.ndarray
) -> np.ndarray:
    """The exact (C_out, *out_spatial) output change of a ConvTranspose whose input channels are
    replaced by constants c.

    A ConvTranspose scatters every input position through the whole kernel, so an output
    position receives as many kernel taps as input positions land on it: with stride 2 and
    kernel 3 that is 1, 2 or 4, and Σ W c in the bias would over-apply the constant. The map is
    uniform (and goes into the bias) only where every position gets every tap.
    """
    shape = node.inputs[0].shape
    spatial = None if shape is None else list(shape[2:])
    rank = work.ndim - 2
    explicit = node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")
    if (spatial is None or len(spatial) != rank or not all(isinstance(d, int) for d in spatial)
            or not explicit or "output_shape" in node.attrs):  # fmt: skip
        raise OnnxPruneError(
            f"ConvTranspose '{node.name}' has dynamic spatial dims, auto_pad or output_shape: "
            "a correction's constant cannot be folded into it exactly",
            hint="use a method or --compensate mode without a constant (c = 0)",
        )
    _, seg, _ = _split(work, edit, m)  # (m, 1, C_out, k...)
    response = np.tensordot(c, seg[:, 0], axes=([0], [0]))  # (C_out, k...)
    ones, pads = [1] * rank, list(node.attrs.get("pads", [0] * 2 * rank))
    for d, (size, k) in enumerate(zip(spatial, work.shape[2:], strict=True)):
        hits = _transpose_hits(
            size, k, node.attrs.get("strides", ones)[d], node.attrs.get("dilations", ones)[d],
            pads[d], pads[d + rank], node.attrs.get("output_padding", [0] * rank)[d],
        )  # fmt: skip
        response = np.tensordot(response, hits, axes=([1], [0]))  # kernel axis → output axis
    return response


def _transpose_hits(
    size: int, k: int, stride: int, dilation: int, before: int, after: int, extra: int
) -> np.ndarray:
    """(k, out) counts: how often kernel tap t lands on output index o, over inputs [0, size)."""
    out = (size - 1) * stride + extra + (k - 1) * dilation + 1 - before - after
    index = np.arange(size)[None, :] * stride - before + np.arange(k)[:, None] * dilation
    hits = np.zeros((k, out))
    t, i = np.nonzero((index >= 0) & (index < out))
    np.add.at(hits, (t, index[t, i]), 1.0)
    return hits


def add_bias(graph: gs.Graph, node: gs.Node, delta: np.ndarray) -> None:
    """Add `delta` to a consumer's output bias, creating the bias (or an Add) if needed."""
    dtype = node.inputs[1].values.dtype
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    if delta.ndim > 1 and np.ptp(delta.reshape(len(delta), -1), axis=1).max() > 0:
        add_after(graph, node, delta.astype(dtype))  # differs per position (borders, strides)
        return
    delta = delta.reshape(len(delta), -1)[:, 0] if delta.ndim > 1 else delta
    if node.op in ("Conv", "ConvTranspose"):
        bias = node.inputs[2].values.astype(np.float64) if has_bias else 0.0
        _set_bias(node, bias + delta, dtype)
    elif node.op == "Gemm":
        beta = node.attrs.get("beta", 1.0)
        bias = beta * np.broadcast_to(node.inputs[2].values, delta.shape) if has_bias else 0.0
        node.attrs["beta"] = 1.0
        _set_bias(node, bias + delta, dtype)
    else:  # MatMul: add the shift after it
        add_after(graph, node, delta.astype(dtype))


def add_after(graph: gs.Graph, node: gs.Node, shift: np.ndarray, tag: str = "shift") -> None:
    """Insert `output + shift` after `node` (the consumers keep reading the old name); `tag`
    names what it adds: the tensor `<output>__pre_<tag>`, the constant `<node>__<tag>` and the
    Add `<node>__<tag>_add`."""
    out = node.outputs[0]
    inner = gs.Variable(f"{out.name}__pre_{tag}", dtype=out.dtype)
    node.outputs[0] = inner
    constant = gs.Constant(f"{node.name}__{tag}", shift)
    graph.nodes.append(
        gs.Node("Add", f"{node.name}__{tag}_add", inputs=[inner, constant], outputs=[out])
    )


def shift_output(graph: gs.Graph, node: gs.Node, shift: np.ndarray, tag: str) -> None:
    """Add the per-channel `shift` to a MatMul's output: into the constant of the bias Add that
    alone reads it when that constant has the shift's shape, else by a new Add (`add_after`)."""
    bias_add = single_user(node, "Add")
    inputs = [] if bias_add is None else bias_add.inputs
    found = [i for i, t in enumerate(inputs) if isinstance(t, gs.Constant)]
    if len(found) == 1 and bias_add.inputs[found[0]].values.shape == shift.shape:
        tensor = bias_add.inputs[found[0]]
        value = (tensor.values.astype(np.float64) + shift).astype(tensor.values.dtype)
        bias_add.inputs[found[0]] = gs.Constant(f"{tensor.name}__{bias_add.name}", value)
        return
    add_after(graph, node, shift.astype(node.inputs[1].values.dtype), tag)


def _set_bias(node: gs.Node, bias: np.ndarray, dtype: np.dtype) -> None:
    """`bias` (flattened, as `dtype`) as the node's bias input."""
    values = np.asarray(bias).astype(dtype).reshape(-1)
    set_bias_input(node, gs.Constant(f"{node.name}__bias", values))


def affine_outputs(graph: gs.Graph, name: str, scale: np.ndarray, shift: np.ndarray) -> None:
    """Make node `name` (Conv/ConvTranspose/Gemm/MatMul with a 2-D weight) output y·scale + shift
    per output channel.

    W is scaled along its output axis and the bias becomes b·scale + shift (created if missing);
    a MatMul has no bias input, so its shift goes into the Add after it (`shift_node`, created if
    missing), whose constant broadcasts along the last axis as the MatMul's channels do.
    """
    node = next(n for n in graph.nodes if n.name == name)
    weight = np.asarray(node.inputs[1].values)
    axis = handler_for(node).out_axis(node)
    shape = [1] * weight.ndim
    shape[axis] = -1
    scaled = weight.astype(np.float64) * scale.reshape(shape)
    node.inputs[1] = gs.Constant(f"{node.inputs[1].name}__recal", scaled.astype(weight.dtype))
    if node.op == "MatMul":
        _affine_shift_after(graph, node, scale, shift, weight.dtype)
        return
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    bias = 0.0
    if has_bias:
        bias = np.broadcast_to(node.inputs[2].values, scale.shape).astype(np.float64)
        bias = bias * node.attrs.get("beta", 1.0) if node.op == "Gemm" else bias
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    _set_bias(node, bias * scale + shift, weight.dtype)
    after = shift_node(graph, node)
    if after is not None:  # (y + map)·scale + shift: the border map scales too
        const = after.inputs[1]
        values = const.values.astype(np.float64)
        values = values * scale.reshape(-1, *[1] * (values.ndim - 1))
        after.inputs[1] = gs.Constant(f"{const.name}__recal", values.astype(const.values.dtype))


def _affine_shift_after(
    graph: gs.Graph, node: gs.Node, scale: np.ndarray, shift: np.ndarray, dtype: np.dtype
) -> None:
    """(y + c)·scale + shift for a MatMul's output y and the constant c its shift Add holds."""
    after = shift_node(graph, node)
    if after is None:
        add_after(graph, node, shift.astype(dtype))
        return
    const = after.inputs[1]
    values = const.values.astype(np.float64) * scale + shift
    after.inputs[1] = gs.Constant(f"{const.name}__recal", values.astype(const.values.dtype))


def shift_node(graph: gs.Graph, node: gs.Node) -> gs.Node | None:
    """The Add that `add_bias` put after `node` for a position-dependent shift, if any; its
    output carries the name the node's output had."""
    name = f"{node.name}__shift_add"
    return next((n for n in graph.nodes if n.name == name), None)
