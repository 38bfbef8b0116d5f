"""Refold the corrections of a few taps into an already rewritten model, in place.

A pass that changes one tap's correction after the model was rewritten (the sequential fit, one
tap after another) would otherwise rewrite and export the whole graph for each change. Only the
layers that read the tap change: the map is folded into their weights and its constant into
their bias (graph/rewrite.py). So rewrite those layers alone — every edit of every group on
them, as the whole rewrite applies it — and copy their new constants over the model's, which
are found by node name and input position.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ChannelGroup, tap_key
from onnxprune.graph.rewrite import rewrite
from onnxprune.ops.recurrent import is_recurrent
from onnxprune.plan import Plan

PLAIN = frozenset({"out", "chan", "in"})  # roles whose edits touch only their node's constants


def refold(
    model: onnx.ModelProto,
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    plans: Mapping[str, Plan],
    keys: Iterable[str],
    *,
    exact_borders: bool = False,
) -> bool:
    """Write into `model` — `export(rewrite(graph, groups, plans'))` for plans' that differ from
    `plans` only in the corrections at the tap keys `keys` — the constants of the layers reading
    those taps, refolded with `plans`. Then `model` is `export(rewrite(graph, groups, plans))`.

    False, with `model` unchanged, where this cheap path does not apply and the caller must
    rewrite the whole graph: a correction folded elsewhere than into its readers' weights (a
    recurrence, a rebuilt LayerNorm), a reader with edits of other kinds, or a refolded constant
    that `model` does not hold in the same place with the same shape (a bias or an Add that the
    whole rewrite would create now)."""
    keys = set(keys)
    live = [g for g in groups if g.name in plans and g.prunable]
    edits = [e for g in live for e in g.edits if e.tap and tap_key(e.tap, e.offset) in keys]
    readers = {e.node for e in edits}
    if any(e.role != "in" for e in edits):
        return False
    nodes = [node for node in graph.nodes if node.name in readers]
    if len(nodes) != len(readers) or any(is_recurrent(node) for node in nodes):
        return False
    near = []
    for group in live:
        mine = tuple(e for e in group.edits if e.node in readers)
        if any(e.role not in PLAIN for e in mine):
            return False
        near += [replace(group, edits=mine)] if mine else []
    near_plans = {
        name: replace(plan, shifts={n: s for n, s in plan.shifts.items() if n in readers})
        for name, plan in plans.items()
    }
    part = rewrite(_subgraph(graph, nodes), tuple(near), near_plans, exact_borders=exact_borders)
    return _copy_constants(part, model)


def _subgraph(graph: gs.Graph, nodes: list[gs.Node]) -> gs.Graph:
    """`nodes` as a graph of their own: inputs the variables they read and do not make, outputs
    everything they make (so no node is cleaned up)."""
    made = {t.name for node in nodes for t in node.outputs}
    inputs = {
        t.name: t
        for node in nodes
        for t in node.inputs
        if isinstance(t, gs.Variable) and t.name and t.name not in made
    }
    outputs = [t for node in nodes for t in node.outputs]
    return gs.Graph(
        nodes=nodes, inputs=list(inputs.values()), outputs=outputs, opset=graph.opset,
        import_domains=graph.import_domains, functions=graph.functions,
    )  # fmt: skip


def _copy_constants(part: gs.Graph, model: onnx.ModelProto) -> bool:
    """Overwrite `model`'s initializers with the constants `part`'s nodes read, each matched by
    node name and input position (a bias may be named after its node in one and after its
    input in the other, as `rewrite` adds a zero shift or not), only where it has the same shape
    and type and no other node reads it; False (nothing written) where one does not match."""
    held = {t.name: t for t in model.graph.initializer}
    readers = Counter(name for node in model.graph.node for name in set(node.input))
    inputs = {node.name: list(node.input) for node in model.graph.node}
    writes = []
    for node in part.nodes:
        names = inputs.get(node.name, [])
        for index, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant):
                continue
            value = np.asarray(tensor.values)
            target = held.get(names[index]) if index < len(names) else None
            if (
                target is None
                or readers[target.name] != 1
                or tuple(target.dims) != value.shape
                or target.data_type != onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
            ):
                return False
            writes.append((target, value))
    for target, value in writes:
        target.CopyFrom(onnx.numpy_helper.from_array(value, target.name))
    return True
