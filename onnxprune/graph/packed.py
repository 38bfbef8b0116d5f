"""Packed q/k/v in-projections (nn.MultiheadAttention, Swin, MaxViT) taken apart into three.

nn.MultiheadAttention computes q, k and v with ONE Linear of 3·E outputs and separates them after
an unflatten; both torch exporters write

    p = x W + b                                           (…, 3E)
    Reshape → (…, 3, E), Unsqueeze, Transpose (the 3-axis to the front), Squeeze → (3, …, E)
    Gather(axis 0, t) for t = 0, 1, 2                     → q, k, v, each (…, E)

torchvision's Swin splits the heads in the same Reshape and moves them with the parts:

    Reshape → (B, N, 3, H, D), Transpose(2, 0, 3, 1, 4) → (3, B, H, N, D), Gather(axis 0, t)

timm's attention (MobileViT, ViT) writes the same with `unbind(0)`: a Split of axis 0 into three
parts of one, each Squeezed on that axis, instead of the Gathers.

torchvision's MaxViT chunks the projection instead, `q, k, v = torch.chunk(p, 3, dim=-1)`: three
Slices of the last axis, [tE, (t+1)E) for t = 0, 1, 2, each then split into heads like a plain
projection. HF GPT-2's `c_attn` (a Conv1D) is a Gemm on the tokens as rows, reshaped back to
(B, S, 3E) and `split(E, dim=2)`: one Split into three equal parts; each part then gets its own
rows-to-tokens Reshape (the target's last entry 3E written E). Slices (or a Split) that cut the
last axis into any consecutive parts are taken apart alike: Phi-3's `qkv_proj` (q, k, v of
unequal widths under grouped-query attention) and its `gate_up_proj` chunked in two.

Part t is x W[:, tE:(t+1)E] + b[tE:(t+1)E] exactly (the same dot products), so
`unpack_projections` writes each Gather's output with that MatMul (and Add) instead, followed
for Swin by the plain head split Reshape (…, E) → (…, H, D) (target 0, …, 0, H, D) and the
Transpose that puts the axes where the Gather had them: the head rule (graph/attention.py) then
sees three projections, and head h of the packed layer is the same D columns of each third of W
and b. The data-movement chain is not trusted from its op list: it is run on an index array
(symbolic dims given sizes) and each Gather must return exactly part t, with its axes as the
projection (and the head split) wrote them or permuted by one Transpose.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.concat_split import split_sizes
from onnxprune.ops.flow import axes_of, const, rank_of, shape_of

_MOVES = frozenset({"Unsqueeze", "Transpose", "Squeeze"})


def unpack_projections(graph: gs.Graph) -> int:
    """Replace every packed q/k/v projection of `graph` by one projection per part (in place;
    the packed nodes fall away at the next cleanup). Returns how many were taken apart."""
    count = 0
    for node in list(graph.nodes):
        found = _packed(node)
        if found is not None:
            _unpack(graph, node, found)
            count += 1
    return count


@dataclass(frozen=True)
class _Parts:
    """How a packed projection's parts are read: the bias Add (or None), the Gathers (or the
    Slices of a chunk) in part order, the per-part head split (H, D) (None: the parts stay
    (…, E)) and the axis order each Gather gives part t in (None: as the projection wrote it)."""

    add: gs.Node | None
    gathers: list[gs.Node]
    heads: tuple[int, int] | None
    perm: tuple[int, ...] | None
    rows: gs.Node | None = None  # the Reshape of the rows back to tokens (GPT-2's Conv1D)
    widths: tuple[int, ...] = ()  # the parts' widths, in order (empty: three equal parts)

    def outputs(self) -> list[gs.Tensor]:
        """The part tensors, in part order (one Split writes all three)."""
        if len(self.gathers) == 1:
            return list(self.gathers[0].outputs)
        return [node.outputs[0] for node in self.gathers]


def _packed(matmul: gs.Node) -> _Parts | None:
    """How `matmul`'s parts are read when it is a packed projection taken apart as the module
    docstring says, else None."""
    weight = _weight(matmul)
    if weight is None:
        return None
    add, tail = _bias_add(matmul)
    rows = _rows_to_tokens(tail) if matmul.op == "Gemm" else None
    tail = tail if rows is None else rows.outputs[0]
    found = _sliced(tail, weight.shape[1]) or _split(tail, weight.shape[1])
    if found is not None:
        return _Parts(add, found[0], None, None, rows, found[1])
    if matmul.op != "MatMul" or weight.shape[1] % 3:
        return None
    reshape = _only_user(tail, "Reshape", ignore="Shape")
    if reshape is None or reshape.inputs[0] is not tail:
        return None
    width = weight.shape[1] // 3
    found = _leading_axes(shape_of(tail), shape_of(reshape.outputs[0]), width)
    if found is None:
        return None
    lead, heads = found
    chain, tensor = [], reshape.outputs[0]
    while (user := _only_user(tensor)) is not None and user.op in _MOVES:
        chain.append(user)
        tensor = user.outputs[0]
    part = [width] if heads is None else list(heads)
    readers = _readers(tensor)
    ordered = None if readers is None else _parts(chain, readers, [*lead, 3, *part], len(lead))
    if ordered is None:
        return None
    gathers, perm = ordered
    return _Parts(add, gathers, heads, perm)


def _weight(node: gs.Node) -> np.ndarray | None:
    """The (inputs, outputs) weight of a MatMul with a 2-D constant, or of a Gemm on rows
    (transA 0, alpha 1, a constant bias C with beta 1 or none)."""
    weight = const(node, 1)
    if weight is None or weight.ndim != 2 or node.op not in ("MatMul", "Gemm"):
        return None
    if node.op == "MatMul":
        return weight
    if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0:
        return None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = const(node, 2)
        if bias is None or bias.ndim != 1 or node.attrs.get("beta", 1.0) != 1.0:
            return None
    return weight.T if node.attrs.get("transB", 0) else weight


def _rows_to_tokens(tail: gs.Tensor) -> gs.Node | None:
    """The Reshape of the (rows, 3E) `tail` back to (…, 3E), its one reader besides Shape
    reads, with a target whose last entry is the constant 3E; else None."""
    reshape = _only_user(tail, "Reshape", ignore="Shape")
    shape = shape_of(tail)
    if reshape is None or reshape.inputs[0] is not tail or shape is None or len(shape) != 2:
        return None
    return reshape if _last_entry(reshape.inputs[1]) == shape[1] else None


def _last_entry(target: gs.Tensor) -> int | None:
    """The last entry of a Reshape target: a constant, or a Concat ending in a constant."""
    value = target.values if isinstance(target, gs.Constant) else None
    if value is None and target.inputs and target.inputs[0].op == "Concat":
        last = target.inputs[0].inputs[-1]
        value = last.values if isinstance(last, gs.Constant) else None
    return None if value is None or value.size == 0 else int(np.asarray(value).reshape(-1)[-1])


def _split(tail: gs.Tensor, total: int) -> tuple[list[gs.Node], tuple[int, ...]] | None:
    """([the Split], its part widths) when `tail`'s one reader besides Shape reads splits its
    last axis (of `total` entries) into two or more parts (`p.split(E, dim=-1)`), else
    None."""
    split = _only_user(tail, "Split", ignore="Shape")
    rank = rank_of(tail)
    if split is None or rank is None or split.attrs.get("axis", 0) % rank != rank - 1:
        return None
    sizes = split_sizes(split, total)
    if sizes is None or len(sizes) < 2 or sum(sizes) != total or min(sizes) < 1:
        return None
    return [split], tuple(int(size) for size in sizes)


def _sliced(tail: gs.Tensor, total: int) -> tuple[list[gs.Node], tuple[int, ...]] | None:
    """(the Slices in part order, their widths) when two or more Slices take consecutive
    parts covering the last axis of `tail` (of `total` entries) once, and are its only readers
    besides Shape reads: `torch.chunk(p, 3, dim=-1)`, or Phi-3's q, k, v of unequal widths,
    the bounds folded to constants at load; else None."""
    users = [u for u in tail.outputs if u.op != "Shape"]
    rank = rank_of(tail)
    if len(users) < 2 or rank is None or any(u.op != "Slice" for u in users):
        return None
    found: dict[int, tuple[int, gs.Node]] = {}
    for node in users:
        bounds = _last_axis_bounds(node, rank, total)
        if node.inputs[0] is not tail or bounds is None or bounds[1] <= bounds[0]:
            return None
        found[bounds[0]] = (bounds[1], node)
    start, ordered, widths = 0, [], []
    while start in found:
        end, node = found.pop(start)
        ordered.append(node)
        widths.append(end - start)
        start = end
    return (ordered, tuple(widths)) if start == total and not found else None


def _last_axis_bounds(node: gs.Node, rank: int, size: int) -> tuple[int, int] | None:
    """(start, end) of Slice `node` when it takes consecutive entries of the last axis (of
    length `size`) alone, with constant bounds; else None."""
    values = [const(node, i) for i in range(1, 5)]
    starts, ends, axes, steps = values + [None] * (4 - len(values))
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    last = (axes is None and rank == 1) or (axes is not None and axes.size == 1)
    if not last or (axes is not None and int(axes.reshape(-1)[0]) % rank != rank - 1):
        return None
    if len(node.inputs) > 4 and (steps is None or steps.reshape(-1).tolist() != [1]):
        return None
    start, end, _ = slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])).indices(size)
    return start, end


def _bias_add(matmul: gs.Node) -> tuple[gs.Node | None, gs.Tensor]:
    """The Add of a constant bias (as long as the outputs) right after `matmul`, and the tensor
    the projection ends in (the Add's output, or the MatMul's without one)."""
    out = matmul.outputs[0]
    add = _only_user(out, "Add")
    if add is None:
        return None, out
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    width = matmul.inputs[1].values.shape[1]
    if not isinstance(other, gs.Constant) or other.values.shape != (width,):
        return None, out
    return add, add.outputs[0]


def _only_user(tensor: gs.Tensor, op: str | None = None, ignore: str = "") -> gs.Node | None:
    """The one node reading `tensor` (other than `ignore` ops: shape reads), of type `op` if
    given, else None."""
    users = [u for u in tensor.outputs if u.op != ignore]
    if len(users) != 1 or (op is not None and users[0].op != op):
        return None
    return users[0]


def _leading_axes(
    shape_in: list | None, shape_out: list | None, width: int
) -> tuple[list, tuple[int, int] | None] | None:
    """Sizes for the leading axes (symbolic ones given 2) and the head split (H, D) when the
    Reshape turns (…, 3E) into (…, 3, E) or (…, 3, H, D) with the same leading axes, else None.
    Inference may name a leading dim anew (a -1 in the target): with every other leading dim
    the same, the element count makes it the input's."""
    if shape_in is None or shape_out is None or shape_in[-1] != 3 * width:
        return None
    heads = None
    if len(shape_out) == len(shape_in) + 2 and shape_out[-3] == 3:
        heads = tuple(shape_out[-2:])
        if not all(isinstance(d, int) and d > 0 for d in heads) or heads[0] * heads[1] != width:
            return None
    elif len(shape_out) != len(shape_in) + 1 or shape_out[-2:] != [3, width]:
        return None
    lead_in, lead_out = shape_in[:-1], shape_out[: len(shape_in) - 1]
    if sum(a != b for a, b in zip(lead_in, lead_out, strict=True)) > 1:
        return None
    if any(
        isinstance(a, int) != isinstance(b, int) for a, b in zip(lead_in, lead_out, strict=True)
    ):
        return None
    return [d if isinstance(d, int) else 2 for d in lead_in], heads


def _readers(tensor: gs.Tensor) -> list[tuple[gs.Node, int, int]] | None:
    """(node, index, axis) for each of the three nodes that take one entry `index` of `axis`
    of `tensor` (removing the axis): its three Gathers of a constant scalar, or the Squeezes
    after its one Split into three parts of one (`unbind`); else None."""
    users = list(tensor.outputs)
    if len(users) == 3 and all(u.op == "Gather" for u in users):
        found = []
        for gather in users:
            picked = const(gather, 1)
            if picked is None or picked.ndim != 0 or users.count(gather) != 1:
                return None
            found.append((gather, int(picked), gather.attrs.get("axis", 0)))
        return found
    shape = shape_of(tensor)
    split = users[0] if len(users) == 1 and users[0].op == "Split" else None
    if split is None or shape is None or len(split.outputs) != 3:
        return None
    rank = len(shape)
    axis = split.attrs.get("axis", 0) % rank
    total = shape[axis] if isinstance(shape[axis], int) else None
    if split_sizes(split, total) != [1, 1, 1]:
        return None
    found = []
    for t, out in enumerate(split.outputs):
        squeeze = _only_user(out, "Squeeze")
        axes = None if squeeze is None else axes_of(squeeze)
        if axes is None or [a % rank for a in axes] != [axis]:
            return None
        found.append((squeeze, t, axis))
    return found


def _parts(
    chain: list[gs.Node], readers: list[tuple[gs.Node, int, int]], sizes: list[int], at: int
) -> tuple[list[gs.Node], tuple[int, ...] | None] | None:
    """The readers (`_readers`) ordered by part, and the axis order they give each part in
    (None: as it is), when running `chain` and each reader on an index array of `sizes`
    (…, 3, E) or (…, 3, H, D), the 3 at axis `at`, gives part t of it, the same way for the
    three parts; else None."""
    index = np.arange(int(np.prod(sizes))).reshape(sizes)
    moved = index
    for node in chain:
        moved = _move(node, moved)
        if moved is None:
            return None
    found: dict[int, gs.Node] = {}
    perms = set()
    for gather, picked, axis in readers:
        got = np.take(moved, picked, axis=axis)
        part = picked % 3
        perm = _order(got, np.take(index, part, axis=at))
        if perm is None:
            return None
        found[part] = gather
        perms.add(perm)
    if len(found) != 3 or len(perms) != 1:
        return None
    perm = perms.pop()
    return [found[t] for t in range(3)], None if perm == tuple(range(len(perm))) else perm


def _order(got: np.ndarray, part: np.ndarray) -> tuple[int, ...] | None:
    """The axis order with `np.transpose(part, order)` equal to `got`, else None."""
    if got.ndim != part.ndim or got.size != part.size:
        return None
    for perm in itertools.permutations(range(part.ndim)):
        if got.shape == tuple(part.shape[p] for p in perm) and np.array_equal(
            got, np.transpose(part, perm)
        ):
            return perm
    return None


def _move(node: gs.Node, array: np.ndarray) -> np.ndarray | None:
    """`array` through the Unsqueeze, Transpose or Squeeze `node` (None if its axes are not
    constant)."""
    if node.op == "Transpose":
        perm = node.attrs.get("perm", list(range(array.ndim - 1, -1, -1)))
        return np.transpose(array, perm)
    axes = axes_of(node)
    if axes is None:
        return None
    if node.op == "Unsqueeze":
        rank = array.ndim + len(axes)
        return np.expand_dims(array, tuple(a % rank for a in axes))
    return np.squeeze(array, tuple(a % array.ndim for a in axes))


def _unpack(graph: gs.Graph, matmul: gs.Node, parts: _Parts) -> None:
    """Write each Gather's (or Slice's, or Split part's) output with its part's own MatMul (and
    bias Add, rows-to-tokens Reshape, head split Reshape and Transpose)."""
    weight = _weight(matmul)
    widths = parts.widths or (weight.shape[1] // 3,) * 3
    tags = "qkv" if len(widths) == 3 else [f"part{t}" for t in range(len(widths))]
    add = parts.add
    bias = None if add is None else next(t for t in add.inputs if isinstance(t, gs.Constant))
    names = [None if add is None else f"{add.name}_{n}" for n in tags]
    if matmul.op == "Gemm" and len(matmul.inputs) > 2 and matmul.inputs[2].name:
        bias, names = matmul.inputs[2], [f"{matmul.name}_{n}_bias" for n in tags]
    lead = len(shape_of(matmul.outputs[0])) - 1
    results = parts.outputs()
    for node in parts.gathers:
        node.outputs.clear()
    starts = np.cumsum([0, *widths])
    for t, (result, name) in enumerate(zip(results, tags, strict=True)):
        width = widths[t]
        part, base = slice(starts[t], starts[t + 1]), f"{matmul.name}_{name}"
        columns = np.ascontiguousarray(weight[:, part])
        steps = [("MatMul", base, [gs.Constant(f"{base}.weight", columns)], {})]
        if bias is not None:
            shift = gs.Constant(f"{names[t]}.bias", np.asarray(bias.values)[part].copy())
            steps.append(("Add", names[t], [shift], {}))
        if parts.rows is not None:
            target = _part_target(graph, parts.rows.inputs[1], width, base)
            steps.append(("Reshape", f"{base}_tokens", [target], {}))
        if parts.heads is not None:
            target = np.array([0] * lead + list(parts.heads), np.int64)
            steps.append(("Reshape", f"{base}_heads", [gs.Constant(f"{base}.heads", target)], {}))
        if parts.perm is not None:
            steps.append(("Transpose", f"{base}_perm", [], {"perm": list(parts.perm)}))
        tensor = matmul.inputs[0]
        for i, (op, node_name, extra, attrs) in enumerate(steps):
            last = i == len(steps) - 1
            out = result if last else gs.Variable(f"{node_name}_output", dtype=result.dtype)
            graph.nodes.append(gs.Node(op, node_name, attrs, [tensor, *extra], [out]))
            tensor = out


def _part_target(graph: gs.Graph, target: gs.Tensor, width: int, base: str) -> gs.Tensor:
    """The rows-to-tokens Reshape target with its last entry (3E) written `width` (E): a new
    constant, or a new Concat of the same pieces ending in the constant."""
    last = np.array([width], np.int64)
    if isinstance(target, gs.Constant):
        values = np.asarray(target.values).reshape(-1).copy()
        values[-1] = width
        return gs.Constant(f"{base}.tokens", values.astype(np.int64))
    concat = target.inputs[0]
    out = gs.Variable(f"{base}_tokens_shape", dtype=np.int64, shape=list(target.shape or []))
    pieces = [*concat.inputs[:-1], gs.Constant(f"{base}.tokens_last", last)]
    graph.nodes.append(gs.Node("Concat", f"{base}_tokens_shape", {"axis": 0}, pieces, [out]))
    return out
