"""Cut a model into consecutive sub-models that end at chosen tensors.

A pass that must stop after each of several tensors — recalibration measures a layer's output,
adjusts the layer, and only then may go on — would otherwise run the whole model once per stop.
Run segment after segment instead, each fed the tensors the earlier ones produced, and every node
runs once. Segment k holds the nodes (in the model's topological order) after segment k−1's last
node up to the producer of its end tensor; it reads the graph inputs and earlier tensors it needs
and outputs its end and every tensor a later segment reads. Nodes after the last end never run.

Sub-models are built one at a time (`segment_model`), copying only their own weights.

`segment_to` cuts by need instead of by position: the nodes an end depends on that have not run
yet. A pass whose model changes between stops (the sequential fit refolds downstream layers after
each one) identifies the nodes that ran by name, so its segments stay valid in the new model.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx


@dataclass(frozen=True)
class Segment:
    """Nodes (indices into the model's node list) from the previous end to `end`, the tensors
    they read from earlier segments or the graph inputs, and those they hand on (`end` first)."""

    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    end: str


def split_at(model: onnx.ModelProto, ends: Iterable[str]) -> list[Segment]:
    """The segments of `model` that end at each tensor of `ends`, in topological order (the
    node order of a valid model). Each end must be a node output."""
    nodes = model.graph.node
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    stops = sorted((producer[end], end) for end in set(ends))
    if not stops:
        return []
    constants = {t.name for t in model.graph.initializer}
    last = stops[-1][0]
    reads = [node_reads(node) - constants for node in nodes[: last + 1]]
    last_read = {name: i for i, names in enumerate(reads) for name in names}
    segments, first = [], 0
    for stop, end in stops:
        span = range(first, stop + 1)
        made = {name for i in span for name in nodes[i].output if name}
        inputs = sorted({name for i in span for name in reads[i]} - made)
        later = sorted(name for name in made if last_read.get(name, -1) > stop and name != end)
        segments.append(Segment(tuple(span), tuple(inputs), (end, *later), end))
        first = stop + 1
    return segments


def segment_to(
    model: onnx.ModelProto, end: str, done: set[str], keep: Iterable[str] = ()
) -> Segment | None:
    """The nodes of `model` that computing `end` needs and whose names are not in `done`, as a
    Segment (None when `end`'s producer ran already). Its outputs are `end` and every tensor it
    makes that a node not yet run reads, or that `keep` names."""
    nodes = model.graph.node
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    if nodes[producer[end]].name in done:
        return None
    constants = {t.name for t in model.graph.initializer}
    reads = [node_reads(node) - constants for node in nodes]
    picked, stack = set(), [producer[end]]
    while stack:
        i = stack.pop()
        if i not in picked and nodes[i].name not in done:
            picked.add(i)
            stack.extend(producer[name] for name in reads[i] if name in producer)
    span = sorted(picked)
    made = {name for i in span for name in nodes[i].output if name}
    inputs = sorted({name for i in span for name in reads[i]} - made)
    later = still_read(model, done | {nodes[i].name for i in span}) | set(keep)
    return Segment(tuple(span), tuple(inputs), (end, *sorted(made & later - {end})), end)


def still_read(model: onnx.ModelProto, done: set[str]) -> set[str]:
    """The tensors that the nodes of `model` whose names are not in `done` read."""
    return {name for node in model.graph.node if node.name not in done for name in node_reads(node)}


def segment_model(
    model: onnx.ModelProto, segment: Segment, types: Mapping[str, int]
) -> onnx.ModelProto:
    """`segment` of `model` as a model of its own: its inputs typed as `types` (name → ONNX
    element type), its outputs `segment.outputs`, the initializers its nodes read copied."""
    graph = model.graph
    picked = [graph.node[i] for i in segment.nodes]
    read = set().union(*(node_reads(node) for node in picked))
    inputs = [onnx.helper.make_tensor_value_info(n, types[n], None) for n in segment.inputs]
    part = onnx.helper.make_graph(
        picked,
        f"{graph.name}:{segment.end}",
        inputs,
        [onnx.ValueInfoProto(name=name) for name in segment.outputs],
        initializer=[t for t in graph.initializer if t.name in read],
    )
    part = onnx.helper.make_model(
        part, opset_imports=model.opset_import, ir_version=model.ir_version
    )
    part.functions.extend(model.functions)
    return part


def order_together(model: onnx.ModelProto, sets: Iterable[Sequence[str]]) -> bool:
    """Reorder the nodes of `model` in place (still topologically) so that no node reading a
    tensor of one of `sets` comes before the last producer of that set: a pass cut at the set's
    tensors (`split_at`) then has them all before anything reads one. The order otherwise stays
    as close to the given one as it can. False, with `model` unchanged, when a tensor of a set
    is computed from another of the same set."""
    nodes = list(model.graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    member_of = {name: s for s, names in enumerate(sets) for name in names}
    left = Counter(member_of.values())
    needs = [{producer[n] for n in node_reads(node) if n in producer} for node in nodes]
    waits = [{member_of[n] for n in node_reads(node) if n in member_of} for node in nodes]
    readers: dict[int, list[int]] = defaultdict(list)
    for i, deps in enumerate(needs):
        for d in deps:
            readers[d].append(i)
    waiting: dict[int, list[int]] = defaultdict(list)
    for i, sets_read in enumerate(waits):
        for s in sets_read:
            waiting[s].append(i)
    blocked = [len(needs[i]) + len(waits[i]) for i in range(len(nodes))]
    ready = [i for i, count in enumerate(blocked) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        done = [member_of[n] for n in nodes[i].output if n in member_of]
        freed = list(readers[i])
        for s in done:
            left[s] -= 1
            freed += waiting[s] if left[s] == 0 else []
        for j in freed:
            blocked[j] -= 1
            if blocked[j] == 0:
                heapq.heappush(ready, j)
    if len(order) < len(nodes):
        return False
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)
    return True


def node_reads(node: onnx.NodeProto) -> set[str]:
    """The tensors `node` reads: its inputs and the outer-scope names its subgraphs read."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for graph in (*([attr.g] if attr.HasField("g") else ()), *attr.graphs):
            inner = set().union(set(), *(node_reads(n) for n in graph.node))
            local = {t.name for t in graph.initializer} | {i.name for i in graph.input}
            local |= {name for n in graph.node for name in n.output}
            names |= inner - local
    return names
