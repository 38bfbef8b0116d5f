"""Grouped-query attention's repeated key/value heads, written as one Gather.

LLaMA, Qwen2 and Mistral give each key/value head to n_rep query heads. transformers' `repeat_kv`
writes the repetition as

    x (B, Hkv, S, D) → Unsqueeze(2) → Expand(B, Hkv, n_rep, S, D) → Reshape (B, Hkv·n_rep, S, D)

with targets read back from shapes (the legacy exporter) or partly constant (dynamo). The result
is `Gather(x, [0, …, 0, 1, …, 1, …], axis=1)`: head j of the output is head j // n_rep of x, the
same elements in the same order. `gather_repeats` writes that Gather instead, where every other
entry of both targets is proven to be x's own size (a constant, the same dim read back through
Shape, or a dim `dim_origin` proves equal), so nothing is broadcast but the repeated axis. The
Gather's channel rule (ops/concat_split.py) then carries a key/value head on to n_rep
consecutive query heads. Anything not proven stays as it was (its heads are refused).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.flow import axes_of, shape_of, single_user
from onnxprune.ops.shape_values import dim_origin, entry_value, vector_entry, vector_source

__all__ = ["gather_repeats"]


def gather_repeats(graph: gs.Graph) -> bool:
    """Replace every proven `Unsqueeze → Expand → Reshape` head repetition by a Gather (in
    place); True when one was replaced."""
    outputs = {t.name for t in graph.outputs}
    replaced = False
    for node in list(graph.nodes):
        found = _repetition(node, outputs) if node.op == "Unsqueeze" else None
        if found is None:
            continue
        reshape, axis, size, repeats = found
        indices = np.repeat(np.arange(size, dtype=np.int64), repeats)
        gather = gs.Node(
            "Gather",
            f"{reshape.name}__repeat",
            {"axis": axis},
            inputs=[node.inputs[0], gs.Constant(f"{reshape.name}__repeat_indices", indices)],
            outputs=list(reshape.outputs),
        )
        reshape.outputs.clear()
        graph.nodes.append(gather)
        replaced = True
    return replaced


def _repetition(unsqueeze: gs.Node, outputs: set[str]) -> tuple[gs.Node, int, int, int] | None:
    """(the Reshape, axis, Hkv, n_rep) when `unsqueeze` starts a proven head repetition."""
    x, axes = unsqueeze.inputs[0], axes_of(unsqueeze)
    shape = shape_of(x)
    if shape is None or axes is None or len(axes) != 1:
        return None
    rank = len(shape)
    new = axes[0] % (rank + 1)
    axis = new - 1
    expand = single_user(unsqueeze, "Expand")
    reshape = single_user(expand, "Reshape") if expand else None
    if axis < 0 or reshape is None or expand.inputs[0] is not unsqueeze.outputs[0]:
        return None
    if {unsqueeze.outputs[0].name, expand.outputs[0].name} & outputs:
        return None
    size, repeats = dim_origin(x, axis), entry_value(expand.inputs[1], new)
    if not isinstance(size, int) or repeats is None or repeats < 1:
        return None
    if shape_of(expand.inputs[1]) != [rank + 1] or shape_of(reshape.inputs[1]) != [rank]:
        return None
    for k in range(rank + 1):  # the Expand keeps every axis but the new one
        if k != new and not _keeps(
            expand.inputs[1], k, x, k - (k > new), unsqueeze, broadcast=True
        ):
            return None
    for k in range(rank):  # the Reshape merges (Hkv, n_rep) and keeps the rest
        if k != axis and not _keeps(reshape.inputs[1], k, x, k, unsqueeze, broadcast=False):
            return None
    return reshape, axis, size, repeats


def _keeps(
    target: gs.Tensor, entry: int, x: gs.Tensor, axis: int, unsqueeze: gs.Node, *, broadcast: bool
) -> bool:
    """Entry `entry` of a shape target states x's size on `axis`: 1 in an Expand (kept), that
    size as a constant, or a dim read back from x (or the Unsqueeze's output) or proven equal
    to it."""
    stated = entry_value(target, entry)
    size = dim_origin(x, axis)
    if stated is not None:
        return (broadcast and stated == 1) or (isinstance(size, int) and stated == size)
    vector = _unmasked(target)
    read = vector_source(vector, entry)
    if read in ((x, axis), (unsqueeze.outputs[0], entry)):
        return True
    return size is not None and vector_entry(vector, entry) == size


def _unmasked(target: gs.Tensor) -> gs.Tensor:
    """The legacy exporter's Expand target `Where(Equal(t, -1), 1, t)` (t a Reshape of a Concat
    to one axis) read as t's Concat: a size read from a shape is never -1."""
    node = target.inputs[0] if target.inputs else None
    if node is not None and node.op == "Where" and len(node.inputs) == 3:
        condition = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if condition is not None and condition.op == "Equal" and node.inputs[2] in condition.inputs:
            target = node.inputs[2]
            node = target.inputs[0] if target.inputs else None
    if node is not None and node.op == "Reshape" and len(shape_of(node.inputs[0]) or []) == 1:
        return node.inputs[0]
    return target
