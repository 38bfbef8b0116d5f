"""Find the channel groups of a normalized graph (DESIGN.md §2).

From every producer (Conv, ConvTranspose, Gemm, MatMul with a constant weight) the
channels are followed forward through the ops that act channel by channel (each op's handler
in onnxprune/ops/ says how) until consumers read them through weights. Elementwise ops joining two
activations tie their producers into one group (residual Add, SE gate Mul). Where a Split, Slice
or grouped Conv separates a producer's channels, each part becomes a group of its own
(`node[lo:hi]`). Whatever the walk does not understand blocks the group with a reason and the
blocking node; a blocked group is reported, never pruned.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import onnx_graphsurgeon as gs

from onnxprune.graph.attention import attention_step, head_width
from onnxprune.graph.groups import ChannelGroup, ParamEdit, Tap
from onnxprune.graph.shared import join_shared
from onnxprune.ops.conv import is_grouped_conv
from onnxprune.ops.flow import State, Step, block, const
from onnxprune.ops.group_norm import norm_width
from onnxprune.ops.recurrent import ROTATION_BLOCK, hidden_units, is_recurrent
from onnxprune.ops.registry import Handler, handler_for, unknown


def analyze(graph: gs.Graph) -> tuple[ChannelGroup, ...]:
    """Channel groups of `graph` in topological order of their first producer."""
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    walks = _aligned([w for p in _producers(graph) for w in _walk_parts(graph, p)], graph)
    members = _couple(walks)
    groups = join_shared(graph, [_merge([walks[i] for i in idx]) for idx in members])
    return tuple(sorted(groups, key=lambda g: order.get(g.producers[0], 0)))


@dataclass
class _Producer:
    """A producer's output channels [lo, lo + channels) (all of them unless they were cut).

    `blocks` > 1 for a grouped Conv: its conv groups write their outputs independently."""

    node: gs.Node
    channels: int
    edits: list[ParamEdit]
    start: State
    reason: str | None = None
    lo: int = 0
    whole: bool = True
    blocks: int = 1
    also: tuple[State, ...] = ()  # further starts (an RNN's final states)
    taps: tuple[Tap, ...] = ()  # taps read by the producer itself (an RNN's recurrence)
    ties: tuple[str, ...] = ()
    rotation: str | None = None
    norm_group: bool = False  # a channel is one group of a GroupNorm (ops/group_norm.py)

    @property
    def label(self) -> str:
        """The group name: the node's, with the channel range when only a part is the group."""
        name = self.node.name
        return name if self.whole else f"{name}[{self.lo}:{self.lo + self.channels}]"


@dataclass
class _Walk:
    producer: _Producer
    edits: dict[tuple, ParamEdit] = field(default_factory=dict)
    passthrough: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    taps: list[Tap] = field(default_factory=list)
    arrivals: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    sigma: tuple[Tap, Tap] | None = None
    reason: str | None = None
    blocker: str | None = None
    rotation: str | None = None
    invariants: list[tuple[str, str]] = field(default_factory=list)
    normed: dict[str, Tap] = field(default_factory=dict)  # tensor → output of the RMSNorm above
    normalized: list[tuple[str, Tap]] = field(default_factory=list)  # (tap key, that output)
    cuts: set[int] = field(default_factory=set)
    ties: set[str] = field(default_factory=set)
    joins: dict[str, str] = field(default_factory=dict)  # node → op where producers meet

    def block(self, reason: str, node: str | None) -> None:
        if self.reason is None:
            self.reason, self.blocker = reason, node


def _producers(graph: gs.Graph) -> list[_Producer]:
    found = []
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if is_recurrent(node):
            found.extend(_recurrent(node, outputs))
            continue
        producer = _as_producer(node)
        if producer is not None:
            found.append(_in_units(producer))
    return found


def _in_units(producer: _Producer) -> _Producer:
    """A MatMul producer whose output is split into attention heads has one channel per head,
    of D features each (graph/attention.py); one whose channels reach a GroupNorm one per norm
    group, of d channels each (ops/group_norm.py)."""
    norm = producer.node.op != "MatMul"
    width = norm_width(producer.node) if norm else head_width(producer.node)
    if width is None or producer.channels % width or (norm and producer.start.axis != 1):
        return producer
    return replace(
        producer,
        channels=producer.channels // width,
        edits=[replace(e, spatial=width) for e in producer.edits],
        start=replace(producer.start, spatial=width),
        norm_group=norm,
    )


def _as_producer(node: gs.Node) -> _Producer | None:
    """The node as a producer, when its handler says it creates channels through a constant
    weight."""
    handler = handler_for(node)
    if handler is None or const(node, 1) is None or not node.outputs:
        return None
    output = handler.produce(node)
    if output is None:
        return None
    start = State(node.outputs[0].name, output.axis, 0)
    edits = list(output.edits)
    return _Producer(node, output.channels, edits, start, output.reason, blocks=output.blocks)


def _recurrent(node: gs.Node, outputs: set[str]) -> list[_Producer]:
    """One producer per direction of an LSTM/GRU/RNN (ops/recurrent.py)."""
    return [
        _Producer(
            node,
            h.channels,
            list(h.edits),
            h.starts[0],
            h.reason,
            h.lo,
            h.whole,
            also=h.starts[1:],
            taps=(h.tap,) if h.tap else (),
            ties=(h.tie,),
            rotation=ROTATION_BLOCK,
        )  # fmt: skip
        for h in hidden_units(node, outputs)
    ]


def _walk_parts(graph: gs.Graph, producer: _Producer) -> list[_Walk]:
    """Walk `producer`; where a Split, a Slice or a grouped Conv cuts its channels, walk each
    part on its own (a grouped Conv producer is cut into its conv groups from the start).

    The parts are independent groups: every op on the way acts channel by channel, so the
    channels of one part never meet those of another except where a consumer reads both."""
    if producer.blocks > 1 and producer.whole:  # a grouped Conv: one part per conv group
        width = producer.channels // producer.blocks
        walk = _Walk(producer, cuts=set(range(width, producer.channels, width)))
    else:
        walk = _walk(graph, producer)
    if not walk.cuts or is_recurrent(producer.node):  # hidden units are not cut: stay blocked
        if producer.blocks > 1:
            walk.ties.add(f"{producer.node.name}:out")
        return [walk]
    return _cut(graph, producer, walk.cuts)


def _part(producer: _Producer, lo: int, hi: int) -> _Producer:
    """Channels [lo, hi) of `producer` (indices relative to its own range) as a producer."""
    edits = [replace(e, offset=e.offset + lo) for e in producer.edits]
    start = replace(producer.start, offset=producer.start.offset + lo)
    return replace(
        producer, channels=hi - lo, edits=edits, start=start, lo=producer.lo + lo, whole=False
    )


def _aligned(walks: list[_Walk], graph: gs.Graph) -> list[_Walk]:
    """Cut walks that meet elementwise where the channels they meet are cut (an SE gate's
    channels meeting a grouped Conv's conv groups), until all meetings line up."""
    while True:
        cuts = _meeting_cuts(walks)
        for i in [i for i in cuts if is_recurrent(walks[i].producer.node)]:
            walks[i].block("hidden units meet channels cut elsewhere", None)
            del cuts[i]
        if not cuts:
            return walks
        walks = [
            part
            for i, walk in enumerate(walks)
            for part in (_cut(graph, walk.producer, cuts[i]) if i in cuts else [walk])
        ]


def _meeting_cuts(walks: list[_Walk]) -> dict[int, set[int]]:
    """Per walk, the channel indices where another walk's segment starts or ends at a node
    they both reach elementwise."""
    bounds: dict[str, set[int]] = defaultdict(set)
    for walk in walks:
        for node, hits in walk.arrivals.items():
            for _, offset in hits:
                bounds[node].update((offset, offset + walk.producer.channels))
    cuts: dict[int, set[int]] = defaultdict(set)
    for w, walk in enumerate(walks):
        for node, hits in walk.arrivals.items():
            for _, offset in hits:
                inside = {b - offset for b in bounds[node]}
                cuts[w].update(c for c in inside if 0 < c < walk.producer.channels)
    return {w: found for w, found in cuts.items() if found}


def _cut(graph: gs.Graph, producer: _Producer, cuts: set[int]) -> list[_Walk]:
    """Walk each part of `producer` between `cuts` on its own."""
    edges = [0, *sorted(cuts), producer.channels]
    return [
        w
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        for w in _walk_parts(graph, _part(producer, lo, hi))
    ]


def _walk(graph: gs.Graph, producer: _Producer) -> _Walk:
    """Follow one producer's channels forward until every path ends at a consumer or a block."""
    walk = _Walk(
        producer, taps=list(producer.taps), ties=set(producer.ties), rotation=producer.rotation
    )
    if producer.reason:
        walk.block(producer.reason, producer.node.name)
    tensors = graph.tensors()
    outputs = {t.name for t in graph.outputs}
    stack, seen = [producer.start, *producer.also], set()
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        if state.tensor in outputs:
            walk.block(f"channels reach graph output '{state.tensor}'", None)
            continue
        for node in list(tensors[state.tensor].outputs):
            for index, tensor in enumerate(node.inputs):
                if tensor.name == state.tensor:
                    _visit(walk, node, index, state, stack)
    return walk


def _visit(walk: _Walk, node: gs.Node, index: int, state: State, stack: list[State]) -> None:
    handler = handler_for(node)
    result = _shuffled(node, handler, state) or attention_step(
        node, index, state, walk.producer.channels
    )
    if result is None:
        if handler is None:
            result = block(unknown(node))
        else:
            result = handler.step(node, index, state, walk.producer.channels)
    if result.kind == "block":
        walk.block(result.reason or "blocked", node.name)
        walk.cuts.update(result.cuts)
        return
    if walk.rotation is None and result.kind == "through":
        walk.rotation = (
            unknown(node) if handler is None else handler.rotation(node, index, state, result)
        )
    invariant = None if handler is None else handler.invariant(node, state)
    if invariant is not None:
        _add_once(walk.invariants, (invariant, node.name))
    for edit in result.edits:
        walk.edits[(edit.node, edit.input, edit.axis, edit.offset, edit.role)] = edit
    if result.kind == "drop":
        return
    if result.kind == "consume":
        if is_grouped_conv(node):
            walk.ties.add(f"{node.name}:in")
        if result.edits:
            _add_once(walk.consumers, node.name)
            _add_once(walk.taps, _tap(state))
            if state.tensor in walk.normed:
                _add_once(walk.normalized, (_tap(state).key, walk.normed[state.tensor]))
        return
    _add_once(walk.passthrough, node.name)
    if handler.nonlinear and walk.sigma is None and result.next is not None:
        nxt = result.next
        walk.sigma = (_tap(state), _tap(nxt))
    if result.couple:
        walk.arrivals[node.name].append((index, state.offset))
        walk.joins[node.name] = node.op
    if invariant == "rmsnorm":  # energies are read after the norm, before a per-channel scale
        source = state if handler.scaled else result.next
        walk.normed[result.next.tensor] = _tap(source)
    elif state.tensor in walk.normed and handler.scales_along(node, index):
        for nxt in (result.next, *result.also):
            walk.normed[nxt.tensor] = walk.normed[state.tensor]
    stack.extend((result.next, *result.also))


def _shuffled(node: gs.Node, handler: Handler | None, state: State) -> Step | None:
    """A block where channels spread by a channel shuffle reach an op whose rule does not
    follow such a layout (`Handler.strided`); None where it does or the layout is plain."""
    if state.stride == 1 or (handler is not None and handler.strided):
        return None
    return block(
        f"channels reordered by a channel shuffle reach {node.op} '{node.name}', whose rule "
        "does not follow a shuffled layout"
    )


def _tap(state: State) -> Tap:
    return Tap(state.tensor, state.axis, state.offset, state.spatial, state.stride)


def _add_once(items: list, item: object) -> None:
    if item not in items:
        items.append(item)


def _couple(walks: list[_Walk]) -> list[list[int]]:
    """Union producers whose channels meet elementwise; block mismatched meetings."""
    parent = list(range(len(walks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    meetings: dict[str, dict[int, dict[tuple[int, int], list[int]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for w, walk in enumerate(walks):
        for node, hits in walk.arrivals.items():
            for index, offset in hits:
                meetings[node][index][(offset, walk.producer.channels)].append(w)
    for node, by_input in meetings.items():
        layouts = [set(segments) for segments in by_input.values()]
        involved = [w for segments in by_input.values() for ws in segments.values() for w in ws]
        if len(by_input) < 2 or any(layout != layouts[0] for layout in layouts):
            for w in involved:
                walks[w].block(
                    f"tied elementwise at '{node}' to channels no prunable producer of the "
                    "same width creates",
                    node,
                )
            continue
        for ws in (w for segments in by_input.values() for w in segments.values()):
            for w in ws:
                parent[find(w)] = find(ws[0])
        _union_segments(by_input, parent, find)
    groups: dict[int, list[int]] = defaultdict(list)
    for w in range(len(walks)):
        groups[find(w)].append(w)
    return list(groups.values())


def _union_segments(by_input: dict, parent: list[int], find) -> None:
    """Producers at the same (offset, width) on different inputs of one node are one group."""
    inputs = list(by_input.values())
    for segment, ws in inputs[0].items():
        for other in inputs[1:]:
            for w in other[segment]:
                parent[find(w)] = find(ws[0])


def _merge(walks: list[_Walk]) -> ChannelGroup:
    first = walks[0]
    blocked = next((w for w in walks if w.reason), None)
    edits: dict[tuple, ParamEdit] = {}
    passthrough, consumers, taps, normalized = [], [], [], []
    for walk in walks:
        for edit in walk.producer.edits:
            edits[(edit.node, edit.input, edit.axis, edit.offset, edit.role)] = edit
        edits.update(walk.edits)
        for item in walk.passthrough:
            _add_once(passthrough, item)
        for item in walk.consumers:
            _add_once(consumers, item)
        for item in walk.taps:
            _add_once(taps, item)
        for item in walk.normalized:
            _add_once(normalized, item)
    reason = blocker = None
    if blocked is not None:
        reason, blocker = blocked.reason, blocked.blocker
        if blocked is not first:
            reason = f"coupled with '{blocked.producer.node.name}': {reason}"
    if reason is None and not consumers:
        reason = "no consumer reads these channels through weights"
    head_dim = first.producer.start.spatial
    if reason is None and head_dim > 1 and len({tap.spatial for tap in taps}) > 1:
        reason = "its consumers read heads of different widths"
    rotation = next((w.rotation for w in walks if w.rotation), None)
    return ChannelGroup(
        name=first.producer.label,
        channels=first.producer.channels,
        producers=tuple(w.producer.node.name for w in walks),
        passthrough=tuple(passthrough),
        consumers=tuple(consumers),
        taps=tuple(taps),
        edits=tuple(edits.values()),
        sigma=first.sigma or (_tap(first.producer.start),) * 2,
        reason=reason,
        blocker=blocker,
        subspaces=_subspaces(edits.values(), first.producer.channels),
        rotation_block=rotation,
        invariants=tuple(dict.fromkeys(n for w in walks for n in w.invariants)),
        normalized=tuple(normalized),
        ties=tuple(sorted({t for w in walks for t in w.ties})),
        head_dim=head_dim,
        feature_dim=_feature_dim(head_dim, taps),
        norm_group=first.producer.norm_group,
        gated=_gated(walks),
    )


def _gated(walks: list[_Walk]) -> bool:
    """The producers meet only at Muls (a gate), not counting where one producer's channels
    meet themselves (a tanh GELU written out: x + 0.044715·x³)."""
    reached = Counter(node for walk in walks for node in walk.joins)
    return all(
        op == "Mul" for walk in walks for node, op in walk.joins.items() if reached[node] > 1
    )


def _feature_dim(head_dim: int, taps: list[Tap]) -> int:
    """The features per head the taps read: their common `spatial` for heads, else
    `head_dim`."""
    widths = {tap.spatial for tap in taps}
    return widths.pop() if head_dim > 1 and len(widths) == 1 else head_dim


def _subspaces(edits, channels: int) -> tuple[int, ...]:
    """Channel indices of the group where a TSRA on the way starts its V subspace."""
    cuts = {e.split - e.offset for e in edits if e.role == "split" and e.split is not None}
    return tuple(sorted(c for c in cuts if 0 < c < channels))
