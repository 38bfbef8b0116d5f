"""Attention heads as prunable channels.

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

nn.MultiheadAttention (its packed in-projection taken apart at load time, graph/packed.py) folds
the heads into the batch axis instead: `view(T, B·H, D)`, a transpose, `view(B, H, T, D)`. Head h
is then the minor index of the B·H axis between two Reshapes; the walk steps from the folding
Reshape to the unfolding one at once, editing B·H and H where the targets state them (a
constant, or the `Mul(Shape(x)[i], H)` the legacy exporter computes B·H with). Its merge
reshapes (T, B, H, D) to (T·B, H·D).

`attention_step` answers like `ops.step` for those Reshapes, batched MatMuls of two activations,
Softmax and Shape reads of the heads (the scale's D, a head count read back by the unfolding
Reshape), and None for anything else (the analyzer then asks the other rules).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.concat_split import repeats
from onnxprune.ops.flow import State, Step, const, rank_of, readers_ahead, shape_of, through
from onnxprune.ops.reshape import keeps_last_axis, restored_source
from onnxprune.ops.shape_values import (
    TargetEntry,
    dim_origin,
    shape_entry,
    shape_source,
    target_entry,
)

_SCALING = frozenset({"Add", "Sub", "Mul", "Div"})
_LOOKAHEAD = 64  # tensors searched from a head split for the attention MatMul (rotary ops)


def attention_step(node: gs.Node, index: int, state: State, channels: int) -> Step | None:
    """The step for a head split/merge Reshape, a batched MatMul of two activations or a
    Softmax reading the channels, or None for any other op (or another use of these ops)."""
    if node.domain not in (None, "", "ai.onnx") or (index != 0 and node.op != "MatMul"):
        return None
    if node.op == "Reshape":
        return (
            _split_heads(node, state)
            or _fold_heads(node, state, channels)
            or _merge_heads(node, state, channels)
        )
    if node.op == "MatMul":
        return _batched_matmul(node, index, state)
    if node.op == "Softmax":
        return _softmax(node, state)
    if node.op == "Shape":
        return _shape(node, state)
    return None


def head_width(node: gs.Node) -> int | None:
    """D when `node`'s output (through constant bias/scale ops, LeViT's BatchNorm1d over the
    tokens: Flatten onto the last axis, BatchNormalization, `reshape_as` back, and GPT-2's
    rows reshaped back to tokens) is split into heads of D features along its last axis, else
    None."""
    stack, seen = [node.outputs[0]], set()
    while stack:
        tensor = stack.pop()
        rank = rank_of(tensor)
        if tensor.name in seen or rank is None:
            continue
        seen.add(tensor.name)
        for user in tensor.outputs:
            if user.op == "Reshape" and user.inputs[0] is tensor:
                split = head_split(user, rank - 1) or _fold_split(user, rank - 1)
                if split is not None:
                    return split[2] * _queries_per_key(user.outputs[0])
                if restored_source(user) is not None or _regroups_rows(user):
                    stack.append(user.outputs[0])
            elif _scales(user) or keeps_last_axis(user.outputs[0]) is tensor:
                stack.append(user.outputs[0])
    return None


def _queries_per_key(heads: gs.Tensor) -> int:
    """n_rep when the heads in `heads` are queries that meet, in the first MatMul of two
    activations they reach, keys repeated n_rep times each (grouped-query attention: a
    repeating Gather, graph/repeat_kv.py, then Transposes); 1 otherwise. A channel is then one
    key/value head's n_rep query heads."""
    for tensor, user in readers_ahead(heads, _LOOKAHEAD, lambda user: user.outputs):
        if user.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in user.inputs):
            other = user.inputs[1] if user.inputs[0] is tensor else user.inputs[0]
            while other.inputs and other.inputs[0].op == "Transpose":
                other = other.inputs[0].inputs[0]
            source = other.inputs[0] if other.inputs else None
            copies = repeats(source) if source is not None and source.op == "Gather" else None
            return copies or 1
    return 1


def _regroups_rows(node: gs.Node) -> bool:
    """A Reshape that keeps the last axis, static and whole, and regroups the others (GPT-2's
    Conv1D projects the tokens as rows, then reshapes them back to (B, S, E))."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if not shape_in or not shape_out or not isinstance(shape_in[-1], int):
        return False
    return shape_in[-1] == shape_out[-1]


def _scales(node: gs.Node) -> bool:
    """A bias or scale by a constant."""
    return node.op in _SCALING and any(isinstance(t, gs.Constant) for t in node.inputs)


def head_split(node: gs.Node, axis: int) -> tuple[int, int, int] | None:
    """(axis, H, D) when Reshape `node` splits input `axis` of static size H·D into (H, D) at
    output axes (axis, axis + 1) and keeps every axis after it; else None. H may be symbolic
    (transformers' `view(*shape[:-1], -1, D)`): with the axes before `axis` the same as the
    input's (`_same_leading`) and D static, the element count makes it H·D / D. D may be
    symbolic alike (LeViT's `view(B, N, H, -1)`): it is then H·D / H."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if shape_in is None or shape_out is None or len(shape_out) != len(shape_in) + 1:
        return None
    if shape_in[axis + 1 :] != shape_out[axis + 2 :]:
        return None
    width, heads, dim = shape_in[axis], shape_out[axis], shape_out[axis + 1]
    if not isinstance(width, int) or not (isinstance(heads, int) or isinstance(dim, int)):
        return None
    if isinstance(dim, int) and dim > 0 and width % dim == 0 and not isinstance(heads, int):
        heads = width // dim if _same_leading(node, axis) else heads
    elif isinstance(heads, int) and heads > 0 and width % heads == 0 and not isinstance(dim, int):
        dim = width // heads if _same_leading(node, axis) else dim
    if not isinstance(heads, int) or not isinstance(dim, int) or heads * dim != width:
        return None
    return axis, heads, dim


def _same_leading(node: gs.Node, axis: int) -> bool:
    """Reshape `node`'s output axes before `axis` are its input's: the same per shape inference,
    or each target entry reads a dim (`Shape(x)[i]`) proven equal to the input's
    (ops/shape_values.py: the dynamo export reads the graph input's batch and sequence where
    inference lost their equality to the hidden states' dims). One entry may be -1 when H and
    D are both static (LeViT's `view(B, -1, H, D)`): the element count then makes it the
    input's dim."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    inferred = 0
    for k in range(axis):
        if shape_in[k] == shape_out[k]:
            continue
        stated = target_entry(node, k)
        if isinstance(stated, Step):
            return False
        if stated.value() == -1 and isinstance(shape_out[axis], int):
            inferred += 1  # the one unknown of the element count: the input's dim
            continue
        size = shape_entry(stated.tensor, stated.at)
        if size is None or size != dim_origin(node.inputs[0], k):
            return False
    return inferred == 0 or (inferred == 1 and isinstance(shape_out[axis + 1], int))


def _split_heads(node: gs.Node, state: State) -> Step | None:
    """(…, H·D, …) → (…, H, D, …) where the group's channels are the heads (D features each)."""
    split = head_split(node, state.axis)
    if split is None:
        return None
    axis, heads, dim = split
    per = state.spatial // dim  # heads per channel: n_rep query heads per key/value head
    if state.spatial % dim or heads % per:  # not whole heads: ops/reshape.py refuses the split
        return None
    edit = ParamEdit(node.name, 1, axis, state.offset, "count", per)
    edits = _target_edits(node, axis, heads, edit)
    if isinstance(edits, Step):
        return edits
    return through(node, state, axis=axis, spatial=per, edits=edits)


def _merge_heads(node: gs.Node, state: State, channels: int) -> Step | None:
    """(…, H, D, …) → (…, H·D, …) where the channels are the heads: each becomes D features.
    The axes before the heads may be merged too (nn.MultiheadAttention's (T, B, H, D) →
    (T·B, H·D)): the axes after D stay as they are, so by the element count the leading axes
    hold the same elements. H and H·D may be symbolic (after a broadcast with the attention
    mask shape inference loses them): H is then the group's `channels`, and the target must
    state H·D or -1 there. With -1 the merged axis is H·D wherever the out projection (H·D
    weight rows) runs at all; its other entries (token and batch dims, from shapes the heads do
    not change) stay as they are."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if shape_in is None or shape_out is None or state.axis + 1 >= len(shape_in):
        return None
    tail = shape_in[state.axis + 2 :]
    axis = len(shape_out) - len(tail) - 1
    if axis < 0 or shape_out[axis + 1 :] != tail:
        return None
    heads, dim, width = shape_in[state.axis], shape_in[state.axis + 1], shape_out[axis]
    heads = heads if isinstance(heads, int) else channels * state.spatial
    dim = dim if isinstance(dim, int) else dim_origin(node.inputs[0], state.axis + 1)
    if not isinstance(dim, int) or (isinstance(width, int) and heads * dim != width):
        return None
    features = state.spatial * dim  # a channel's heads (n_rep of them in grouped queries)
    edit = ParamEdit(node.name, 1, axis, state.offset, "count", features)
    edits = _target_edits(node, axis, heads * dim, edit)
    if isinstance(edits, Step):
        return edits
    return through(node, state, axis=axis, spatial=features, edits=edits)


def _fold_split(node: gs.Node, axis: int) -> tuple[int, int, int] | None:
    """(axis, H, D) when Reshape `node` turns (…, B, H·D, …) with H·D at input `axis` into
    (…, B·H, D, …): the heads folded into the axis before them (nn.MultiheadAttention's
    `view(T, B·H, D)`), every other axis kept; else None."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if shape_in is None or shape_out is None or len(shape_in) != len(shape_out) or axis < 1:
        return None
    width, dim = shape_in[axis], shape_out[axis]
    if not isinstance(width, int) or not isinstance(dim, int) or dim <= 0 or width % dim:
        return None
    kept = (
        shape_in[: axis - 1] == shape_out[: axis - 1]
        and shape_in[axis + 1 :] == shape_out[axis + 1 :]
    )
    if not kept or width == dim or shape_in[axis - 1] == shape_out[axis - 1]:
        return None
    return axis, width // dim, dim


def _fold_heads(node: gs.Node, state: State, channels: int) -> Step | None:
    """Heads folded into the batch axis for the attention MatMuls and unfolded right after:
    Reshape (…, B, H·D) → (…, B·H, D) or (…, B, H, …) → (…, B·H, …), then only Transposes,
    then Reshape (…, B·H, …) → (…, B, H, …). Head h is the minor index of B·H, so once
    unfolded the heads are an axis of their own again; the walk goes from the first Reshape
    to the last in one step (nothing in between reads the folded tensor). The folding
    Reshape's B·H and the unfolding one's H are edited where the targets state them."""
    if state.spatial > 1:
        found = _fold_split(node, state.axis)
        if found is None or found[2] != state.spatial:
            return None
        folded, own = state.axis - 1, None
    else:
        folded, own = _fold_merge(node, state.axis), state.axis
        if folded is None:
            return None
    batch = shape_of(node.inputs[0])[folded]
    edits = _folded_count(node, folded, batch, channels, state)
    if isinstance(edits, Step):
        return edits
    unfolded = _unfold(node, folded, channels, own, state)
    if isinstance(unfolded, Step):
        return unfolded
    after, more = unfolded
    return Step("through", next=after, edits=[*edits, *more])


def _fold_merge(node: gs.Node, axis: int) -> int | None:
    """The output axis of B·H when Reshape `node` merges axis `axis` (the heads) into the axis
    before it, keeping every other axis; else None."""
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if shape_in is None or shape_out is None or len(shape_out) != len(shape_in) - 1 or axis < 1:
        return None
    if shape_in[: axis - 1] != shape_out[: axis - 1] or shape_in[axis + 1 :] != shape_out[axis:]:
        return None
    return axis - 1


def _folded_count(
    node: gs.Node, entry: int, batch: object, channels: int, state: State
) -> list | Step:
    """How the folding Reshape's target entry `entry` (B·H) follows the heads: nothing for -1,
    a count edit of B per head on a constant (B static), the head count of the
    `Mul(Shape(x)[i], H)` the legacy exporter computes it with (x's axis i symbolic: a dim
    no channel count is; the product read only by Reshape targets), else a block."""
    stated = target_entry(node, entry)
    if isinstance(stated, Step):
        return stated
    value = stated.value()
    if value == -1:
        return []
    if value is not None:
        if isinstance(batch, int) and value == batch * channels:
            return [stated.edit(state.offset, batch)]
        return _block(f"Reshape '{node.name}' states {value} where B·H is folded")
    mul = _scalar_source(stated.tensor)
    if mul is not None and mul.op == "Mul" and _read_as_targets(mul.outputs[0]):
        for i, factor in enumerate(mul.inputs):
            value = np.asarray(factor.values).reshape(-1) if isinstance(factor, gs.Constant) else ()
            if len(value) == 1 and value[0] == channels and _symbolic_dim(mul.inputs[1 - i]):
                return [TargetEntry(mul, i, 0).edit(state.offset)]
    return _block(f"the folded batch·heads of Reshape '{node.name}' comes from a computed shape")


def _unfold(
    fold: gs.Node, axis: int, channels: int, own: int | None, state: State
) -> tuple[State, list] | Step:
    """Follow the folded tensor through Transposes to the Reshape that unfolds (…, B·H, …) into
    (…, B, H, …): the heads' state after it and its target's edits. Its B entry must not
    depend on the heads (a constant, -1 or a symbolic dim); its H entry is a constant (edited),
    -1, or the fold input's own head axis read back through Shape (the dynamo export)."""
    tensor = fold.outputs[0]
    while len(tensor.outputs) == 1 and tensor.outputs[0].op == "Transpose":
        user = tensor.outputs[0]
        perm = list(user.attrs.get("perm", range(rank_of(tensor) - 1, -1, -1)))
        axis, tensor = perm.index(axis), user.outputs[0]
    users = tensor.outputs
    if len(users) != 1 or users[0].op != "Reshape" or users[0].inputs[0] is not tensor:
        return _block(f"the heads folded by Reshape '{fold.name}' are not unfolded right after")
    node = users[0]
    shape_in, shape_out = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if (
        shape_in is None
        or shape_out is None
        or len(shape_out) != len(shape_in) + 1
        or shape_out[:axis] != shape_in[:axis]
        or shape_out[axis + 2 :] != shape_in[axis + 1 :]
        or shape_out[axis + 1] != channels
    ):
        return _block(f"Reshape '{node.name}' does not unfold the heads folded by '{fold.name}'")
    batch, heads = target_entry(node, axis), target_entry(node, axis + 1)
    for stated in (batch, heads):
        if isinstance(stated, Step):
            return stated
    if batch.value() is None and not _symbolic_dim(batch.tensor, batch.at):
        return _block(f"the batch entry of Reshape '{node.name}' comes from a computed shape")
    after = State(node.outputs[0].name, axis + 1, state.offset, 1)
    value = heads.value()
    if value == -1:
        return after, []
    if value is not None:
        if value != channels:
            return _block(f"Reshape '{node.name}' states {value} where the heads need {channels}")
        return after, [heads.edit(state.offset)]
    read = shape_source(heads.tensor, heads.at)
    if own is not None and read is not None and read == (fold.inputs[0], own):
        return after, []  # the fold's input's own head count, read back: it follows
    return _block(f"the head count of Reshape '{node.name}' comes from a computed shape")


def _read_as_targets(tensor: gs.Tensor) -> bool:
    """`tensor` (a computed size) is read only as pieces of Reshape targets (through
    Unsqueeze/Cast and Concat), so editing it touches nothing but those Reshapes."""
    for user in tensor.outputs:
        if user.op in ("Unsqueeze", "Cast", "Concat"):
            if not _read_as_targets(user.outputs[0]):
                return False
        elif user.op != "Reshape" or user.inputs[1] is not tensor:
            return False
    return bool(tensor.outputs)


def _scalar_source(piece: gs.Tensor) -> gs.Node | None:
    """The node computing the one entry of a 1-element shape piece, through Unsqueeze/Cast."""
    node = piece.inputs[0] if piece.inputs else None
    while node is not None and node.op in ("Unsqueeze", "Cast", "Reshape"):
        source = node.inputs[0]
        node = source.inputs[0] if source.inputs else None
    return node


def _symbolic_dim(tensor: gs.Tensor, at: int = 0) -> bool:
    """Entry `at` of `tensor` is `Shape(x)[i]` for an axis i of x that shape inference leaves
    symbolic: a batch or token dim, never a channel count (those are static)."""
    read = shape_source(tensor, at)
    if read is None:
        return False
    source, axis = read
    return not isinstance(shape_of(source)[axis], int)


def _target_edits(node: gs.Node, entry: int, expected: int, edit: ParamEdit) -> list | Step:
    """How Reshape `node`'s target entry `entry` (which must state `expected` or -1) follows the
    pruned heads: `edit` on a constant target, the same on the constant piece of a Concat that
    builds the target from shape pieces, nothing for -1."""
    stated = target_entry(node, entry)
    if isinstance(stated, Step):
        return stated
    value = stated.value()
    if value is None:
        return _block(f"the head count of Reshape '{node.name}' comes from a computed shape")
    moved = replace(edit, node=stated.node.name, input=stated.input, axis=stated.at)
    return _entry_edit(node, value, expected, moved)


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


def _shape(node: gs.Node, state: State) -> Step | None:
    """Shape of the channels read only by Slices and Gathers of other dims (the scale's D), or
    of the channel axis only into the target of a Reshape that unfolds heads this very tensor
    was folded from (which checks that entry: `_unfold`); None (the Shape rule decides) else."""
    rank = rank_of(node.inputs[0])
    if rank is None:
        return None
    for user in node.outputs[0].outputs:
        dims = _dims_read(user, node.outputs[0], rank, node.attrs.get("start", 0))
        if dims is None or (state.axis in dims and not _read_back(user, node.inputs[0])):
            return None
    return Step("consume")


def _dims_read(user: gs.Node, shape: gs.Tensor, rank: int, start: int) -> set[int] | None:
    """The dims of a rank-`rank` tensor that `user` reads from its shape vector `shape` (a
    Gather with constant indices, a Slice with constant bounds along axis 0, step 1), else
    None."""
    values = [const(user, i) for i in range(1, len(user.inputs))]
    if user.inputs[0] is not shape or any(v is None for v in values):
        return None
    if user.op == "Gather":
        return {int(i) % (rank - start) + start for i in values[0].reshape(-1)}
    if user.op != "Slice" or len(values) < 2 or any(v.size != 1 for v in values):
        return None
    if len(values) > 2 and int(values[2].reshape(-1)[0]) not in (0, -1):
        return None
    if len(values) > 3 and int(values[3].reshape(-1)[0]) != 1:
        return None
    lo, hi = (int(v.reshape(-1)[0]) for v in values[:2])
    lo, hi = slice(lo, hi).indices(rank - start)[:2]
    return {d + start for d in range(lo, hi)}


def _read_back(user: gs.Node, source: gs.Tensor) -> bool:
    """Every use of `user`'s output is a piece of the target of a Reshape whose data comes from
    a Reshape of `source` through Transposes only (the unfold after a fold of `source`)."""
    for concat in user.outputs[0].outputs:
        if concat.op != "Concat" or not concat.outputs[0].outputs:
            return False
        for reshape in concat.outputs[0].outputs:
            if reshape.op != "Reshape" or reshape.inputs[1] is not concat.outputs[0]:
                return False
            tensor = reshape.inputs[0]
            while tensor.inputs and tensor.inputs[0].op == "Transpose":
                tensor = tensor.inputs[0].inputs[0]
            fold = tensor.inputs[0] if tensor.inputs else None
            if fold is None or fold.op != "Reshape" or fold.inputs[0] is not source:
                return False
    return True


def _block(reason: str) -> Step:
    return Step("block", reason=reason)
