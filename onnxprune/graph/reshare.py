"""Initializers that several nodes share, shared again after pruning where the copies are equal.

The rewriter edits each node's constants on its own, so a weight that several nodes read
(RetinaNet's and FCOS's heads apply one conv per pyramid level, with the same weights) leaves
as one copy per reader, and the model's parameters grow. Where the copies came out equal —
nothing removed (ratio 0), or the same channels kept with no correction (a weight-only method
on identical weights) — the readers read one again.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import onnx
from onnx import numpy_helper

from onnxprune.graph.segments import node_reads


def reshared(original: onnx.ModelProto, pruned: onnx.ModelProto) -> onnx.ModelProto:
    """`pruned`, edited in place: every initializer that several nodes of `original` read is
    read as one initializer again by the readers whose copies in `pruned` are equal (the same
    type, shape and bytes); the copies no longer read are dropped."""
    initial = {t.name for t in original.graph.initializer}
    readers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for node in original.graph.node:
        for index, name in enumerate(node.input):
            if name in initial:
                readers[name].append((node.name, index))
    nodes = {node.name: node for node in pruned.graph.node}
    tensors = {t.name: t for t in pruned.graph.initializer}
    redirected = set()
    for read in (r for r in readers.values() if len(r) > 1):
        copies: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for name, index in read:
            node = nodes.get(name)
            if node is not None and index < len(node.input) and node.input[index] in tensors:
                copies[node.input[index]].append((node, index))
        equal: dict[tuple, list[str]] = defaultdict(list)
        for name in copies:
            equal[_content(tensors[name])].append(name)
        for first, *others in equal.values():
            for other in others:
                for node, index in copies[other]:
                    node.input[index] = first
                redirected.add(other)
    graph = pruned.graph
    unread = redirected - {o.name for o in graph.output}.union(*map(node_reads, graph.node))
    kept = [t for t in pruned.graph.initializer if t.name not in unread]
    del pruned.graph.initializer[:]
    pruned.graph.initializer.extend(kept)
    return pruned


def _content(tensor: onnx.TensorProto) -> tuple:
    """What makes two initializers interchangeable: type, shape and a digest of the values."""
    values = numpy_helper.to_array(tensor)
    digest = hashlib.sha256(values.tobytes()).hexdigest()
    return tensor.data_type, tuple(tensor.dims), digest
