"""Groups that edit one shared weight alike, joined into one group so its copies stay one.

A detector's head applies the same convs to every pyramid level (RetinaNet's and FCOS's heads,
and the FPN outputs that all feed the head's first conv): each level's conv is a node of its own
and each level's channels a group of their own, but the weight is one initializer. Pruned apart,
the levels keep other channels or fold other corrections, and the weight leaves as one copy per
level: more parameters than the input had. Joined, the levels are one group with one selection,
and the statistics of the taps that a shared weight reads are summed over the levels
(`ChannelGroup.pooled`), so a method plans one correction for all of them; the rewritten copies
come out equal and graph/reshare.py makes them one initializer again. Taps of one group that a
shared weight reads alike (a level and its max-pooled copy, both read by the head) are pooled too.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ChannelGroup, ParamEdit, Tap

_WEIGHT_LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

# a weight's name and how an edit cuts it: equal slots in two groups are the same cut
Slot = tuple[str, int, int, int, str, int, int]


def join_shared(graph: gs.Graph, groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """`groups` with every family of groups that cut one shared weight the same way joined
    into one group (named after its first member). A family stays as it was, pruned one reader
    at a time, when a member is not prunable or the members differ in shape (`_joined`)."""
    shared = _shared_names(graph)
    if not shared:
        return groups
    nodes = {node.name: node for node in graph.nodes}
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    groups = sorted(groups, key=lambda g: order.get(g.producers[0], 0))
    slots = {g.name: _slots(g, nodes, shared) for g in groups}
    family = _families(groups, slots)
    families: dict[int, list[ChannelGroup]] = {}
    for group in groups:
        families.setdefault(family[group.name], []).append(group)
    joined = {root: _joined(m, slots) if len(m) > 1 else None for root, m in families.items()}
    out = []
    for group in groups:
        root = family[group.name]
        if joined[root] is None:
            out.append(_with_pooled(group, slots[group.name]))
        elif joined[root].name == group.name:
            out.append(joined[root])
    return out


def _shared_names(graph: gs.Graph) -> set[str]:
    """Names of the constant weights (not biases) that several Conv/ConvTranspose/Gemm/MatMul
    nodes read."""
    readers: Counter[str] = Counter()
    for node in (n for n in graph.nodes if n.op in _WEIGHT_LAYERS):
        for tensor in node.inputs[:2]:
            if isinstance(tensor, gs.Constant):
                readers[tensor.name] += 1
    return {name for name, count in readers.items() if count > 1}


def _slots(group: ChannelGroup, nodes: dict[str, gs.Node], shared: set[str]) -> dict:
    """Per edit of a shared weight (producer rows, consumer columns): its slot."""
    found = {}
    for edit in group.edits:
        if edit.role in ("out", "in") and edit.input < 2:
            tensor = nodes[edit.node].inputs[edit.input]
            if isinstance(tensor, gs.Constant) and tensor.name in shared:
                found[edit] = _slot(tensor.name, edit)
    return found


def _slot(name: str, edit: ParamEdit) -> Slot:
    return (name, edit.input, edit.axis, edit.offset, edit.role, edit.spatial, edit.stride)


def _families(groups: list[ChannelGroup], slots: dict[str, dict]) -> dict[str, int]:
    """Each group's family: groups with a slot in common, transitively (the connected
    components of the groups linked to the first group with each slot)."""
    # lazy: scipy.sparse loads scipy.linalg, which the API does not load at import
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    first: dict[Slot, int] = {}
    links = [
        (i, first.setdefault(slot, i))
        for i, g in enumerate(groups)
        for slot in slots[g.name].values()
    ]
    rows, cols = zip(*links, strict=True) if links else ((), ())
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(groups),) * 2)
    _, label = connected_components(graph, directed=False)
    return {group.name: int(label[i]) for i, group in enumerate(groups)}


def _joined(members: list[ChannelGroup], slots: dict[str, dict]) -> ChannelGroup | None:
    """The members as one group, or None when they cannot be: one is not prunable, or they
    differ in width, unit, producers, subspaces, the shared slots they cut or the ways shared
    weights read their taps."""
    first = members[0]
    shape = _shape(first)
    cut = set(slots[first.name].values())
    if any(not m.prunable or _shape(m) != shape for m in members):
        return None
    if any(set(slots[m.name].values()) != cut for m in members):
        return None
    read = [_copied_taps(m, slots[m.name]) for m in members]
    if any(r.keys() != read[0].keys() for r in read):
        return None
    return ChannelGroup(
        name=first.name,
        channels=first.channels,
        producers=tuple(p for m in members for p in m.producers),
        passthrough=_union(m.passthrough for m in members),
        consumers=_union(m.consumers for m in members),
        taps=_union(m.taps for m in members),
        edits=_union(m.edits for m in members),
        sigma=first.sigma,
        subspaces=first.subspaces,
        rotation_block=next((m.rotation_block for m in members if m.rotation_block), None),
        invariants=_union(m.invariants for m in members),
        normalized=_union(m.normalized for m in members),
        ties=tuple(sorted({t for m in members for t in m.ties})),
        head_dim=first.head_dim,
        feature_dim=first.feature_dim,
        norm_group=first.norm_group,
        gated=all(m.gated for m in members),
        copies=len(members),
        pooled=tuple(_union(r[way] for r in read) for way in read[0]),
    )


def _with_pooled(group: ChannelGroup, slots: dict[ParamEdit, Slot]) -> ChannelGroup:
    """`group` with its taps that one shared weight reads alike pooled (a level and its
    pooled copy, each read by the same shared conv)."""
    pooled = tuple(tuple(k) for k in _copied_taps(group, slots).values() if len(k) > 1)
    return replace(group, pooled=pooled) if pooled and group.prunable else group


def _shape(group: ChannelGroup) -> tuple:
    return (group.channels, group.head_dim, group.feature_dim, group.norm_group,
            group.subspaces, len(group.producers))  # fmt: skip


def _copied_taps(group: ChannelGroup, slots: dict[ParamEdit, Slot]) -> dict[tuple, list[str]]:
    """The keys of the group's taps that shared weights read, by way of reading (the tap's
    layout and the slots of the shared consumers reading it): the taps of one way are copies
    of one tap, whose statistics are pooled."""
    found: dict[tuple, list[str]] = defaultdict(list)
    for tap in group.taps:
        read = frozenset(
            slot
            for edit, slot in slots.items()
            if edit.role == "in" and edit.tap == tap.tensor and edit.offset == tap.offset
        )
        if read:
            found[(_layout(tap), read)].append(tap.key)
    return found


def _layout(tap: Tap) -> tuple:
    return (tap.axis, tap.offset, tap.spatial, tap.stride, tap.select)


def _union(parts) -> tuple:
    return tuple(dict.fromkeys(item for part in parts for item in part))
