"""Producer filters as plain arrays, so data-free methods never touch protos."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ChannelGroup, ParamEdit
from onnxprune.graph.load import FoldedBatchNorm, folded_batchnorms
from onnxprune.ops.conv import is_grouped_conv
from onnxprune.ops.recurrent import GATES, is_recurrent, unit_rows
from onnxprune.ops.registry import handler_for


def producer_filters(graph: gs.Graph, group: ChannelGroup) -> tuple[np.ndarray, ...]:
    """Each producer's weight as (channels, fan_in) rows, one row per output channel, in the
    weight's own dtype and a view of it where the layout allows: a float64 copy of every
    producer would be twice the model's largest layers (3.8 GB for a 76800-wide Gemm)."""
    nodes = {node.name: node for node in graph.nodes}
    return tuple(
        group_rows(group, nodes[name], nodes[name].inputs[1].values) for name in group.producers
    )


def producer_batchnorms(graph: gs.Graph, group: ChannelGroup) -> tuple[FoldedBatchNorm | None, ...]:
    """Each producer's BatchNorm folded at load time, cut to the group's channels (None for a
    producer that had none), in the order of `producer_filters`."""
    folds = folded_batchnorms(graph)
    found = []
    for name in group.producers:
        fold = folds.get(name)  # only Conv/Gemm producers had a BatchNorm to fold
        if fold is None:
            found.append(None)
            continue
        lo, rows = group.row_span(name)
        found.append(fold.rows(lo, lo + group.channels * rows))
    return tuple(found)


def group_rows(group: ChannelGroup, node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """The rows of `filter_rows` that are `group`'s channels of producer `node` (an RNN's:
    each unit's rows of every gate block of W; an attention head's D rows as one channel)."""
    if is_recurrent(node):
        edit = next(e for e in group.edits if e.node == node.name and e.role == "hidden")
        return unit_rows(weight, GATES[node.op], edit.axis, group.channels)
    lo, rows = group.row_span(node.name)
    filters = filter_rows(node, weight)[lo : lo + group.channels * rows]
    return filters.reshape(group.channels, -1)


def producer_weight_names(graph: gs.Graph, group: ChannelGroup) -> tuple[str, ...]:
    """Initializer names of the producers' weights (e.g. to ask for their gradients)."""
    nodes = {node.name: node for node in graph.nodes}
    return tuple(nodes[name].inputs[1].name for name in group.producers)


def filter_rows(node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """`weight` (or its gradient) laid out as one row per output channel of producer `node`,
    in its own dtype (a memory map stays one: `external.drop_pages`)."""
    weight = np.moveaxis(np.asanyarray(weight), handler_for(node).out_axis(node), 0)
    return weight.reshape(weight.shape[0], -1)


def consumer_input_sizes(graph: gs.Graph, groups: tuple[ChannelGroup, ...]) -> dict[str, int]:
    """Length of each consumer weight's input axis (channels × positions), by node name; for a
    recurrent node, In + H (W's and R's columns: its hidden units are inputs too)."""
    nodes = {node.name: node for node in graph.nodes}
    sizes = {}
    for group in groups:
        for edit in group.edits:
            node = nodes[edit.node]
            if is_recurrent(node) and edit.role in ("in", "hidden"):  # W's and R's columns
                sizes[edit.node] = int(node.inputs[1].shape[2] + node.inputs[2].shape[2])
            elif edit.role == "in":
                blocks = node.attrs.get("group", 1) if is_grouped_conv(node) else 1
                sizes[edit.node] = int(node.inputs[edit.input].shape[edit.axis]) * blocks
    return sizes


def consumer_matrix(graph: gs.Graph, edit: ParamEdit, channels: int) -> np.ndarray:
    """The consumer weight acting on a group, as (outputs, channels, features per channel).

    Conv kernels are summed over their taps (what a constant input channel contributes);
    Flatten→Gemm keeps each channel's `spatial` features apart.
    """
    node = next(n for n in graph.nodes if n.name == edit.node)
    weight = np.asarray(node.inputs[edit.input].values, dtype=np.float64)
    out_axis = handler_for(node).out_axis(node)
    if is_grouped_conv(node):  # only the filters of the conv group the channels fall in
        k, offset = divmod(edit.offset, weight.shape[1])
        rows = weight.shape[0] // node.attrs["group"]
        inside = np.zeros_like(weight[:, :channels])
        block = slice(k * rows, (k + 1) * rows)
        inside[block] = weight[block, offset : offset + channels]
        return inside.reshape(weight.shape[0], channels, 1, -1).sum(axis=-1)
    segment = np.take(weight, edit_rows(edit, channels), axis=edit.axis)
    segment = np.moveaxis(segment, [out_axis, edit.axis], [0, 1])
    segment = segment.reshape(segment.shape[0], channels, edit.spatial, -1).sum(axis=-1)
    return segment


def edit_rows(edit: ParamEdit, channels: int) -> np.ndarray:
    """The indices along `edit.axis` of the group's `channels` (each `spatial` entries wide,
    every `stride` channels apart behind a channel shuffle), channel by channel."""
    starts = (edit.offset + edit.stride * np.arange(channels)) * edit.spatial
    return (starts[:, None] + np.arange(edit.spatial)).reshape(-1)
