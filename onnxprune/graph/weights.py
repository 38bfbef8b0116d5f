"""Producer filters as plain arrays, so data-free methods never touch protos."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ChannelGroup


def producer_filters(graph: gs.Graph, group: ChannelGroup) -> tuple[np.ndarray, ...]:
    """Each producer's weight as (channels, fan_in) float64 rows, one row per output channel."""
    nodes = {node.name: node for node in graph.nodes}
    return tuple(_rows(nodes[name]) for name in group.producers)


def _rows(node: gs.Node) -> np.ndarray:
    weight = np.asarray(node.inputs[1].values, dtype=np.float64)
    if node.op == "ConvTranspose":
        weight = np.moveaxis(weight, 1, 0)
    elif node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
        weight = weight.T
    return weight.reshape(weight.shape[0], -1)


def consumer_input_sizes(graph: gs.Graph, groups: tuple[ChannelGroup, ...]) -> dict[str, int]:
    """Length of each consumer weight's input axis (channels × positions), by node name."""
    nodes = {node.name: node for node in graph.nodes}
    sizes = {}
    for group in groups:
        for edit in group.edits:
            if edit.role == "in":
                sizes[edit.node] = int(nodes[edit.node].inputs[edit.input].shape[edit.axis])
    return sizes
