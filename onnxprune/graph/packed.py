"""Packed q/k/v in-projections (nn.MultiheadAttention) taken apart into three projections.

nn.MultiheadAttention computes q, k and v with ONE Linear of 3·E outputs and separates them after
an unflatten; both torch exporters write

    p = x W + b                                           (…, 3E)
    Reshape → (…, 3, E), Unsqueeze, Transpose (the 3-axis to the front), Squeeze → (3, …, E)
    Gather(axis 0, t) for t = 0, 1, 2                     → q, k, v, each (…, E)

Part t is x W[:, tE:(t+1)E] + b[tE:(t+1)E] exactly (the same dot products), so
`unpack_projections` writes each Gather's output with that MatMul (and Add) instead: the head
rule (graph/attention.py) then sees three projections, and head h of the packed layer is the
same D columns of each third of W and b. The data-movement chain is not trusted from its op
list: it is run on an index array (symbolic dims given sizes) and each Gather must return
exactly part t, with the leading axes as the projection wrote them.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.flow import axes_of, const, shape_of

_MOVES = frozenset({"Unsqueeze", "Transpose", "Squeeze"})


def unpack_projections(graph: gs.Graph) -> int:
    """Replace every packed q/k/v projection of `graph` by one projection per part (in place;
    the packed nodes fall away at the next cleanup). Returns how many were taken apart."""
    count = 0
    for node in list(graph.nodes):
        found = _packed(node)
        if found is not None:
            _unpack(graph, node, *found)
            count += 1
    return count


def _packed(matmul: gs.Node) -> tuple[gs.Node | None, list[gs.Node]] | None:
    """(bias Add or None, the Gathers in part order) when `matmul` is a packed projection whose
    parts are taken apart as the module docstring says, else None."""
    weight = const(matmul, 1)
    if matmul.op != "MatMul" or weight is None or weight.ndim != 2 or weight.shape[1] % 3:
        return None
    add, tail = _bias_add(matmul)
    reshape = _only_user(tail, "Reshape", ignore="Shape")
    if reshape is None or reshape.inputs[0] is not tail:
        return None
    width = weight.shape[1] // 3
    lead = _leading_axes(shape_of(tail), shape_of(reshape.outputs[0]), width)
    if lead is None:
        return None
    chain, tensor = [], reshape.outputs[0]
    while (user := _only_user(tensor)) is not None and user.op in _MOVES:
        chain.append(user)
        tensor = user.outputs[0]
    gathers = list(tensor.outputs)
    parts = _parts(chain, gathers, [*lead, 3, width])
    if parts is None:
        return None
    return add, parts


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


def _leading_axes(shape_in: list | None, shape_out: list | None, width: int) -> list | None:
    """Sizes for the leading axes (symbolic ones given 2) when the Reshape turns (…, 3E) into
    (…, 3, E) with the same leading axes, else None. Inference may name a leading dim anew
    (a -1 in the target): with every other leading dim the same, the element count makes it
    the input's."""
    if shape_in is None or shape_out is None or len(shape_out) != len(shape_in) + 1:
        return None
    if shape_in[-1] != 3 * width or shape_out[-2:] != [3, width]:
        return None
    lead_in, lead_out = shape_in[:-1], shape_out[:-2]
    if sum(a != b for a, b in zip(lead_in, lead_out, strict=True)) > 1:
        return None
    if any(
        isinstance(a, int) != isinstance(b, int) for a, b in zip(lead_in, lead_out, strict=True)
    ):
        return None
    return [d if isinstance(d, int) else 2 for d in lead_in]


def _parts(chain: list[gs.Node], gathers: list[gs.Node], sizes: list[int]) -> list | None:
    """The Gathers ordered by part when running `chain` and each Gather on an index array of
    `sizes` (…, 3, E) gives part t of it, for the three parts, else None."""
    if len(gathers) != 3 or any(g.op != "Gather" for g in gathers):
        return None
    index = np.arange(int(np.prod(sizes))).reshape(sizes)
    moved = index
    for node in chain:
        moved = _move(node, moved)
        if moved is None:
            return None
    found: dict[int, gs.Node] = {}
    for gather in gathers:
        picked = const(gather, 1)
        if picked is None or picked.ndim != 0 or gather.inputs[0].outputs.count(gather) != 1:
            return None
        got = np.take(moved, int(picked), axis=gather.attrs.get("axis", 0))
        part = int(picked) % 3
        if got.shape != index[..., part, :].shape or not np.array_equal(got, index[..., part, :]):
            return None
        found[part] = gather
    return [found[t] for t in range(3)] if len(found) == 3 else None


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


def _unpack(graph: gs.Graph, matmul: gs.Node, add: gs.Node | None, gathers: list) -> None:
    """Write each Gather's output with its part's own MatMul (and bias Add)."""
    weight = np.asarray(matmul.inputs[1].values)
    width = weight.shape[1] // 3
    bias = None if add is None else next(t for t in add.inputs if isinstance(t, gs.Constant))
    for t, (gather, name) in enumerate(zip(gathers, "qkv", strict=True)):
        part = slice(t * width, (t + 1) * width)
        result = gather.outputs[0]
        gather.outputs.clear()
        columns = gs.Constant(f"{matmul.name}_{name}.weight", np.ascontiguousarray(weight[:, part]))
        projected = result
        if bias is not None:
            projected = gs.Variable(f"{matmul.outputs[0].name}_{name}", dtype=result.dtype)
            shift = gs.Constant(f"{add.name}_{name}.bias", np.asarray(bias.values)[part].copy())
            graph.nodes.append(
                gs.Node("Add", f"{add.name}_{name}", inputs=[projected, shift], outputs=[result])
            )
        graph.nodes.append(
            gs.Node(
                "MatMul",
                f"{matmul.name}_{name}",
                inputs=[matmul.inputs[0], columns],
                outputs=[projected],
            )  # fmt: skip
        )
