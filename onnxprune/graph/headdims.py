"""Where a head group's head dimensions live in the graph, and the edit that shrinks them.

For a head group (graph/attention.py) `head_sites` finds the query, key and value projections
(MatMul with a constant weight, optionally a constant bias Add), the scores MatMul (q kᵀ, whose
output reaches the Softmax through constant scales and additive masks only: the softmax is then
blind to a constant added along a query's row, which methods/headdims.py relies on), the
attention·values MatMul, the Reshape target entries that state D (the q, k, v splits) and H·D
(the merge), and the out projection. Anything else is answered with the reason it is refused.
`shrink_heads` applies the maps methods/headdims.py computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.attention import head_split, target_entry
from onnxprune.graph.groups import ChannelGroup
from onnxprune.graph.rewrite import shift_output
from onnxprune.ops.flow import Step, const, shape_of
from onnxprune.plan import QueryKeyBasis, ValueDims

_ROW_OPS = frozenset({"Mul", "Div", "Add", "Sub"})  # per-row constants/masks before the Softmax


@dataclass(frozen=True)
class Entry:
    """Entry `index` of constant input `input` of node `node` (a Reshape target or a piece of
    the Concat that builds one)."""

    node: str
    input: int
    index: int


@dataclass(frozen=True)
class Projection:
    """A q, k or v projection: its MatMul, its bias Add (or None), the tensor after the bias
    (the statistics' tap) and the entry of its head-split target that states D (None: -1)."""

    matmul: str
    bias: str | None
    tensor: str
    dim_entry: Entry | None


@dataclass(frozen=True)
class HeadSites:
    """Everything `shrink_heads` edits for one head group (`merge` None: the merge target says
    -1 there)."""

    heads: int
    dim: int
    query: Projection
    key: Projection
    value: Projection
    out: str
    merged: str
    merge: Entry | None


class Refused(Exception):
    """A head group whose head dimensions cannot be pruned, with the reason."""


def head_sites(graph: gs.Graph, group: ChannelGroup) -> HeadSites:
    """The sites of `group`'s head dimensions; raises Refused naming what does not fit."""
    nodes = {node.name: node for node in graph.nodes}
    if len({e.spatial for e in group.edits if e.role == "out"}) > 1:
        raise Refused("grouped-query heads: each key/value head serves several query heads")
    matmuls = [nodes[n] for n in group.passthrough if nodes[n].op == "MatMul"]
    scores = [m for m in matmuls if _reaches_softmax(m)]
    mixes = [m for m in matmuls if m not in scores and _from_softmax(m)]
    if len(scores) != 1 or len(mixes) != 1:
        raise Refused("no single q·kᵀ → Softmax → ·v pattern among the group's MatMuls")
    score, mix = scores[0], mixes[0]
    heads, dim = group.channels, group.head_dim
    query, key = (_projection(t, group, dim) for t in score.inputs)
    value = _projection(mix.inputs[1], group, dim)
    if _last(score.inputs[0]) != dim or _last(mix.inputs[1]) != dim:
        raise Refused(f"MatMul '{score.name}' does not contract the head dimension")
    merged, merge = _merge(mix, heads, dim)
    out = group.consumers[0] if len(group.consumers) == 1 else None
    if (
        out is None
        or nodes[out].op != "MatMul"
        or nodes[out].inputs[0].name != merged
        or const(nodes[out], 1) is None
    ):
        raise Refused(f"the heads are not read by one MatMul out projection: {group.consumers}")
    return HeadSites(heads, dim, query, key, value, out, merged, merge)


def shrink_heads(graph: gs.Graph, sites: HeadSites, qk: QueryKeyBasis, v: ValueDims) -> None:
    """Fold the maps into the projections and the out projection and set every head target to
    the new width (in place; the caller re-infers shapes)."""
    nodes = {node.name: node for node in graph.nodes}
    keep_qk, keep_v = qk.A.shape[2], v.maps.shape[2]  # the widths may differ
    for projection, maps in ((sites.query, qk.A), (sites.key, qk.B)):
        _map_columns(nodes, projection, lambda W, m=maps: _per_head(W, m))
    _map_columns(nodes, sites.value, lambda W: _per_head(W, v.maps))
    out = nodes[sites.out]
    weight = out.inputs[1].values
    folded = v.M @ weight.astype(np.float64)
    out.inputs[1] = gs.Constant(f"{out.inputs[1].name}__{out.name}", folded.astype(weight.dtype))
    if v.c is not None:
        shift_output(graph, out, v.c @ weight.astype(np.float64), "heads")
    for projection, keep in ((sites.query, keep_qk), (sites.key, keep_qk), (sites.value, keep_v)):
        if projection.dim_entry is not None:
            _set_entry(nodes, projection.dim_entry, keep)
    if sites.merge is not None:
        _set_entry(nodes, sites.merge, sites.heads * keep_v)


def _per_head(W: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """W's last axis (H·D, head-major) mapped head by head: (…, H·D) → (…, H·k)."""
    heads, dim, keep = maps.shape
    split = W.reshape(*W.shape[:-1], heads, dim)
    return np.einsum("...hd,hdk->...hk", split, maps).reshape(*W.shape[:-1], heads * keep)


def _map_columns(nodes: dict[str, gs.Node], projection: Projection, fn) -> None:
    """Apply `fn` to the output columns of the projection's weight and bias (in float64)."""
    targets = [(nodes[projection.matmul], 1)]
    if projection.bias is not None:
        bias = nodes[projection.bias]
        targets.append(
            (bias, next(i for i, t in enumerate(bias.inputs) if isinstance(t, gs.Constant)))
        )
    for node, index in targets:
        value = node.inputs[index].values
        mapped = fn(value.astype(np.float64)).astype(value.dtype)
        node.inputs[index] = gs.Constant(f"{node.inputs[index].name}__{node.name}", mapped)


def _set_entry(nodes: dict[str, gs.Node], entry: Entry, value: int) -> None:
    node = nodes[entry.node]
    array = np.array(node.inputs[entry.input].values, copy=True)
    array.reshape(-1)[entry.index] = value
    name = f"{node.inputs[entry.input].name}__{node.name}"  # one target may serve several
    node.inputs[entry.input] = gs.Constant(name, array)


def _last(tensor: gs.Tensor) -> int | str | None:
    """The size of the tensor's last axis, None where its shape is unknown."""
    shape = shape_of(tensor)
    return shape[-1] if shape else None


def _reaches_softmax(node: gs.Node) -> bool:
    """True when `node`'s output reaches a Softmax over its last axis only through
    single-use constant scales and additive terms (masks)."""
    while True:
        users = node.outputs[0].outputs
        if len(users) != 1:
            return False
        node = users[0]
        if node.op == "Softmax":
            return node.attrs.get("axis") in (-1, len(shape_of(node.inputs[0]) or ()) - 1)
        if node.op not in _ROW_OPS:
            return False
        if node.op in ("Mul", "Div") and not any(isinstance(t, gs.Constant) for t in node.inputs):
            return False


def _from_softmax(node: gs.Node) -> bool:
    source = node.inputs[0].inputs
    return bool(source) and source[0].op == "Softmax"


def _projection(tensor: gs.Tensor, group: ChannelGroup, dim: int) -> Projection:
    """Walk back from an attention MatMul operand through Transposes, the head split and a bias
    Add to the group's producer."""
    split = bias = None
    while tensor.inputs:
        node = tensor.inputs[0]
        if node.name in group.producers:
            break
        if node.op == "Transpose":
            tensor = node.inputs[0]
        elif _scaled(node) is not None:  # a scale of q or k leaves Π = A Bᵀ as it is
            tensor = _scaled(node)
        elif node.op == "Reshape" and split is None:
            split, tensor = node, node.inputs[0]
        elif node.op == "Add" and split is not None and bias is None:
            constants = [t for t in node.inputs if isinstance(t, gs.Constant)]
            if len(constants) != 1 or constants[0].values.shape[-1:] != (_last(tensor),):
                raise Refused(f"Add '{node.name}' before the heads is not a bias")
            bias, tensor = node, next(t for t in node.inputs if t is not constants[0])
        else:
            raise Refused(f"'{node.name}' ({node.op}) lies between a projection and the heads")
    else:
        raise Refused(f"tensor '{tensor.name}' is not computed from the group's projections")
    matmul = tensor.inputs[0]
    weight = const(matmul, 1)
    if matmul.op != "MatMul" or weight is None or weight.ndim != 2:
        raise Refused(f"projection '{matmul.name}' is not a MatMul with a constant weight")
    if split is None or weight.shape[1] != group.channels * dim:
        raise Refused(f"projection '{matmul.name}' feeds more than the group's heads")
    return Projection(matmul.name, bias and bias.name, split.inputs[0].name, _dim_entry(split))


def _scaled(node: gs.Node) -> gs.Tensor | None:
    """The tensor a Mul (or Div) scales by one constant number, else None."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    for i in (1, 0) if node.op == "Mul" else (1,):
        scale = const(node, i)
        if scale is not None and scale.size == 1:
            return node.inputs[1 - i]
    return None


def _dim_entry(split: gs.Node) -> Entry | None:
    """The entry of the split Reshape's target that states D (None: it says -1)."""
    found = head_split(split, len(shape_of(split.inputs[0])) - 1)
    if found is None:
        raise Refused(f"Reshape '{split.name}' does not split the last axis into heads")
    axis, _, dim = found
    entry = _target_entry(split, axis + 1)
    value = _value(entry, split)
    if value not in (-1, dim):
        raise Refused(f"Reshape '{split.name}' states {value} where the head width is {dim}")
    return None if value == -1 else entry


def _merge(mix: gs.Node, heads: int, dim: int) -> tuple[str, Entry | None]:
    """The merged tensor and the entry of the merge Reshape's target that states H·D (None when
    it says -1)."""
    tensor = mix.outputs[0]
    while len(tensor.outputs) == 1 and tensor.outputs[0].op == "Transpose":
        tensor = tensor.outputs[0].outputs[0]
    if len(tensor.outputs) != 1 or tensor.outputs[0].op != "Reshape":
        raise Refused(f"the heads of MatMul '{mix.name}' are not merged by one Reshape")
    merge = tensor.outputs[0]
    shape = shape_of(merge.inputs[0])
    if shape is None or shape[-1] != dim:
        raise Refused(f"Reshape '{merge.name}' does not merge (…, H, D)")
    entry = _target_entry(merge, len(shape) - 2)
    value = _value(entry, merge)
    if value not in (-1, heads * dim):
        raise Refused(f"Reshape '{merge.name}' states {value} where the heads need {heads * dim}")
    return merge.outputs[0].name, None if value == -1 else entry


def _target_entry(reshape: gs.Node, index: int) -> Entry:
    """Where entry `index` of `reshape`'s target is stated (attention.target_entry), which must
    be a constant: the width edit writes it."""
    stated = target_entry(reshape, index)
    if isinstance(stated, Step):
        raise Refused(stated.reason or f"Reshape '{reshape.name}' has no target entry {index}")
    if not isinstance(stated.tensor, gs.Constant):
        raise Refused(f"the head width of Reshape '{reshape.name}' is computed")
    return Entry(stated.node.name, stated.input, stated.at)


def _value(entry: Entry, reshape: gs.Node) -> int:
    node = reshape if entry.node == reshape.name else reshape.inputs[1].inputs[0]
    return int(node.inputs[entry.input].values.reshape(-1)[entry.index])
