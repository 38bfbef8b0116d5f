"""Attention heads as prunable channels (issue 14 item 1).

Both torch exporters write multi-head attention as

    q, k, v = x Wq + bq, x Wk + bk, x Wv + bv              (batch, tokens, H·D)
    Reshape → (batch, tokens, H, D), Transpose → (batch, H, tokens, D)   (k: (batch, H, D, tokens))
    Softmax(q kᵀ · s) v → Transpose → Reshape → (batch, tokens, H·D) → out projection

Head h only ever meets head h: the two MatMuls batch over the head axis, Softmax normalizes
over keys. So a head is a channel of width D: a producer whose output is split into heads
(`head_width`) makes a group of H channels with `spatial` = D, the walk follows the head axis
through the split, the transposes, both MatMuls (which tie the q, k and v producers into one
group, like a residual Add ties its operands) and the merge, and the out projection consumes
the heads as D features each. Removing head h removes columns h·D … h·D+D−1 of Wq, Wk, Wv (and
their biases) and the same rows of the out projection; the head count in the split and merge
Reshapes shrinks (a constant target, or the constant entry of the Concat of shape pieces the
legacy exporter builds).

`attention_step` answers like `ops.step` for those Reshapes, batched MatMuls of two activations
and Softmax, and None for anything else (the analyzer then asks the other rules).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.flow import State, Step, const, rank_of, shape_of, through

_SCALING = frozenset({"Add", "Sub", "Mul", "Div"})


def attention_step(node: gs.Node, index: int, state: State, channels: int) -> Step | None:
    """The step for a head split/merge Reshape, a batched MatMul of two activations or a
    Softmax reading the channels, or None for any other op (or another use of these ops)."""
    if node.domain not in (None, "", "ai.onnx") or (index != 0 and node.op != "MatMul"):
        return None
    if node.op == "Reshape":
        return _split_heads(node, state) or _merge_heads(node, state, channels)
    if node.op == "MatMul":
        return _batched_matmul(node, index, state)
    if node.op == "Softmax":
        return _softmax(node, state)
    return None


def head_width(node: gs.Node) -> int | None:
    """D when `node`'s output (through constant bias/scale ops) is split into heads of D
    features along its last axis, else None."""
    rank = rank_of(node.outputs[0])
    if rank is None:
        return None
    stack, seen = [node.outputs[0]], set()
    while stack:
        tensor = stack.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        for user in tensor.outputs:
            if user.op == "Reshape" and user.inputs[0] is tensor:
                split = head_split(user, rank - 1)
                if split is not None:
                    return split[2]
            elif user.op in _SCALING and any(isinstance(t, gs.Constant) for t in user.inputs):
                stack.append(user.outputs[0])
    return None


def head_split(node: gs.Node, axis: int) -> tuple[int, int, int] | None:
    """(axis, H, D) when Reshape `node` splits input `axis` of static size H·D into (H, D) at
    output axes (axis, axis + 1) and keeps every axis after it; else None. H may be symbolic
    (transformers' `view(*shape[:-1], -1, D)`): with the axes before `axis` the same as the
    input's and D static, the element count makes it H·D / D."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if shape_in is None or shape_out is None or len(shape_out) != len(shape_in) + 1:
        return None
    if shape_in[axis + 1 :] != shape_out[axis + 2 :]:
        return None
    width, heads, dim = shape_in[axis], shape_out[axis], shape_out[axis + 1]
    if not isinstance(width, int) or not isinstance(dim, int) or dim <= 0 or width % dim:
        return None
    if not isinstance(heads, int) and shape_in[:axis] == shape_out[:axis]:
        heads = width // dim
    if not isinstance(heads, int) or heads * dim != width:
        return None
    return axis, heads, dim


def _split_heads(node: gs.Node, state: State) -> Step | None:
    """(…, H·D, …) → (…, H, D, …) where the group's channels are the heads (D features each)."""
    split = head_split(node, state.axis)
    if split is None:
        return None
    axis, heads, dim = split
    if state.spatial != dim:  # not a channel per head: ops/reshape.py refuses the split
        return None
    edits = _target_edits(node, axis, heads, ParamEdit(node.name, 1, axis, state.offset, "count"))
    if isinstance(edits, Step):
        return edits
    return through(node, state, axis=axis, spatial=1, edits=edits)


def _merge_heads(node: gs.Node, state: State, channels: int) -> Step | None:
    """(…, H, D, …) → (…, H·D, …) where the channels are the heads: each becomes D features.
    H and H·D may be symbolic (after a broadcast with the attention mask shape inference loses
    them): H is then the group's `channels`, and the target must state H·D or -1 there. With
    -1 the merged axis is H·D wherever the out projection (H·D weight rows) runs at all; its
    other entries (the token dims, from shapes the heads do not change) stay as they are."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if shape_in is None or shape_out is None or len(shape_out) != len(shape_in) - 1:
        return None
    axis = state.axis
    if axis + 1 >= len(shape_in) or shape_in[axis + 2 :] != shape_out[axis + 1 :]:
        return None
    heads, dim, width = shape_in[axis], shape_in[axis + 1], shape_out[axis]
    heads = heads if isinstance(heads, int) else channels
    if not isinstance(dim, int) or (isinstance(width, int) and heads * dim != width):
        return None
    if state.spatial != 1:
        return _block(f"Reshape '{node.name}' merges heads of channels that are not single")
    edit = ParamEdit(node.name, 1, axis, state.offset, "count", dim)
    edits = _target_edits(node, axis, heads * dim, edit)
    if isinstance(edits, Step):
        return edits
    return through(node, state, axis=axis, spatial=dim, edits=edits)


def _target_edits(node: gs.Node, entry: int, expected: int, edit: ParamEdit) -> list | Step:
    """How Reshape `node`'s target entry `entry` (which must state `expected` or -1) follows the
    pruned heads: `edit` on a constant target, the same on the constant piece of a Concat that
    builds the target from shape pieces, nothing for -1."""
    target = const(node, 1)
    if target is not None:
        return _entry_edit(node, int(target.reshape(-1)[entry]), expected, edit)
    source = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
    if source is None or source.op != "Concat":
        return _block(f"Reshape '{node.name}' gets its target from a computed shape")
    start = 0
    for i, piece in enumerate(source.inputs):
        size = shape_of(piece)
        if size is None or len(size) != 1 or not isinstance(size[0], int):
            return _block(f"Concat '{source.name}' builds a shape from pieces of unknown size")
        if start <= entry < start + size[0]:
            value = const(source, i)
            if value is None:
                return _block(
                    f"the head count of Reshape '{node.name}' comes from a computed shape"
                )
            moved = ParamEdit(source.name, i, entry - start, edit.offset, "count", edit.spatial)
            return _entry_edit(node, int(value.reshape(-1)[entry - start]), expected, moved)
        start += size[0]
    return _block(f"Concat '{source.name}' is shorter than the target of Reshape '{node.name}'")


def _entry_edit(node: gs.Node, value: int, expected: int, edit: ParamEdit) -> list | Step:
    if value == -1:
        return []
    if value != expected:
        return _block(f"Reshape '{node.name}' states {value} where the heads need {expected}")
    return [edit]


def _batched_matmul(node: gs.Node, index: int, state: State) -> Step | None:
    """q kᵀ and (attention) v: the channels on a batch axis of a MatMul of two activations pass
    to the same axis of the output; the operand carrying them too is tied to the group."""
    if any(isinstance(t, gs.Constant) for t in node.inputs):
        return None
    rank, out_rank = rank_of(node.inputs[index]), rank_of(node.outputs[0])
    other = shape_of(node.inputs[1 - index])
    if rank is None or out_rank is None or other is None or state.axis >= rank - 2:
        return None
    axis = state.axis + out_rank - rank
    other_axis = axis - (out_rank - len(other))
    if other_axis < 0 or other[other_axis] == 1:
        return through(node, state, axis=axis)  # broadcast against one head (shared k/v)
    return through(node, state, axis=axis, couple=True)


def _softmax(node: gs.Node, state: State) -> Step:
    rank = rank_of(node.inputs[0])
    if rank is None or "axis" not in node.attrs:
        return _block(f"Softmax '{node.name}' has an unknown rank or an implicit axis")
    if state.axis >= node.attrs["axis"] % rank:  # before opset 13 it flattens axis … rank − 1
        return _block(f"Softmax '{node.name}' normalizes over the channels")
    return through(node, state)


def _block(reason: str) -> Step:
    return Step("block", reason=reason)
