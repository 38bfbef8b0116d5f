"""GroupNorm: its groups of channels are pruned whole.

`nn.GroupNorm(G, C)` normalizes each of G groups of d = C/G consecutive channels by the mean
and variance of the group over its d channels and every position, then scales and shifts each
channel (γ, β). Both torch exporters write it as

    Reshape(x, [0, G, -1]) → InstanceNormalization(scale 1, bias 0) → Reshape(·, Shape(x))
    → Mul(γ) → Add(β)

and opset 21 has it as one op, GroupNormalization. Removing a whole group leaves the
statistics of every other group, so their outputs, unchanged: exact. Removing some channels of
a group would change the mean and variance its other channels are normalized by, which no fold
into a consumer can undo. So a producer whose channels reach such a norm through elementwise
ops (`norm_width`) prunes in units of d channels, as an attention head prunes in units of its
features (ChannelGroup.head_dim = d, `norm_group`): every method scores and selects whole
groups, and a correction maps the kept groups' channels to all channels, folded into the
consumer's input channels. The first Reshape then leaves the group axis with the kept groups
(its stated G shrinks), InstanceNormalization's per-group scale and bias are sliced, and the
Reshape back (to Shape(x), or to a constant shape whose channel count shrinks by d per group)
returns d channels per group; GroupNormalization's per-channel scale and bias are sliced and its
`num_groups` follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.flow import (
    State,
    Step,
    block,
    const,
    parameter_input,
    readers_ahead,
    shape_of,
    through,
)
from onnxprune.ops.registry import Handler, handler_for, register
from onnxprune.ops.shape_values import target_entry

if TYPE_CHECKING:
    from onnxprune.ops.torch_support import OpNode, Result, TorchOp

_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Identity"})
_LOOKAHEAD = 8  # tensors searched from a producer's output for the norm it reaches


@dataclass(frozen=True)
class GroupNorm:
    """The exporters' GroupNorm seen from its first Reshape (`split`): `groups` groups of
    `width` channels of `source` (the tensor normalized), merged back by `merge`."""

    split: gs.Node
    norm: gs.Node
    merge: gs.Node
    groups: int
    width: int

    @property
    def source(self) -> gs.Tensor:
        return self.split.inputs[0]


def group_norm_of(split: gs.Node) -> GroupNorm | None:
    """The GroupNorm that Reshape `split` begins (module docstring), else None: a target
    [0 or N, G, -1] of a (N, C, …) tensor, C a multiple of G, read only by an
    InstanceNormalization with constant per-group scale and bias, read only by a Reshape back
    to the source's shape (Shape of it, or the same constant shape)."""
    shape, target = shape_of(split.inputs[0]), const(split, 1)
    if shape is None or len(shape) < 3 or target is None or target.size != 3:
        return None
    channels, groups = shape[1], int(target.reshape(-1)[1])
    if not isinstance(channels, int) or groups < 1 or channels % groups or target[2] != -1:
        return None
    norm = _only_reader(split.outputs[0], "InstanceNormalization")
    if norm is None or any(const(norm, i) is None or const(norm, i).size != groups for i in (1, 2)):
        return None
    merge = _only_reader(norm.outputs[0], "Reshape")
    if merge is None or not _restores_shape(merge, split.inputs[0]):
        return None
    return GroupNorm(split, norm, merge, groups, channels // groups)


def norm_width(node: gs.Node) -> int | None:
    """d when the output of producer `node` reaches, through elementwise ops only, GroupNorms
    that all normalize groups of d > 1 of its channels (on axis 1); else None."""
    widths = set()
    for tensor, user in readers_ahead(node.outputs[0], _LOOKAHEAD, _elementwise_output):
        if user.op == "Reshape" and user.inputs[0] is tensor:
            found = group_norm_of(user)
            widths.add(found.width if found is not None else None)
        elif user.op == "GroupNormalization" and user.inputs[0] is tensor:
            widths.add(_native_width(user))
    widths.discard(None)
    return widths.pop() if len(widths) == 1 and min(widths) > 1 else None


def group_norm_step(node: gs.Node, state: State) -> Step | None:
    """The step for Reshape `node` when it splits or merges a GroupNorm's groups, else None.

    The split needs the channels in units of the norm's groups (`state.spatial` = d): each unit
    then becomes one entry of the group axis, and the stated G shrinks. The merge turns each
    group back into d channels; a constant target's channel count shrinks by d per group."""
    if state.axis != 1 or state.stride != 1:
        return None
    found = group_norm_of(node)
    if found is not None:
        if state.spatial != found.width:
            return block(
                f"GroupNorm at Reshape '{node.name}' normalizes groups of {found.width} channels "
                "together: only a producer whose channels reach it whole is pruned by groups"
            )
        return through(node, state, spatial=1, edits=[target_entry(node, 1).edit(state.offset)])
    split = _split_of(node)
    if split is None or state.spatial != 1:
        return None
    target = const(node, 1)
    edits = (
        [] if target is None else [ParamEdit(node.name, 1, 1, state.offset, "count", split.width)]
    )
    return through(node, state, spatial=split.width, edits=edits)


def merges_group_norm(reshape: gs.Node, source: gs.Tensor) -> bool:
    """True when `reshape` merges back the groups of a GroupNorm of `source` (a Shape of
    `source` it reads then shrinks with the channels at run time)."""
    split = _split_of(reshape) if reshape.op == "Reshape" else None
    return split is not None and split.source is source


@register("GroupNormalization")
class GroupNormalization(Handler):
    """GroupNormalization (opset 21): the channels pass in units of the norm's groups, their
    per-channel scale and bias sliced, `num_groups` follows."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        width = _native_width(node)
        if state.axis != 1 or state.stride != 1 or width is None or state.spatial != width:
            return block(
                f"GroupNormalization '{node.name}' normalizes groups of channels together: only "
                "a producer whose channels reach it whole is pruned by groups"
            )
        scale, bias = const(node, 1), const(node, 2)
        if scale is None or bias is None or scale.size != width * node.attrs["num_groups"]:
            return block(
                f"GroupNormalization '{node.name}' has no constant per-channel scale and bias "
                "(opset 18's per-group ones are deprecated and not followed)"
            )
        edits = [ParamEdit(node.name, i, 0, state.offset, "chan", width) for i in (1, 2)]
        return through(node, state, edits=edits)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return f"GroupNormalization '{node.name}' normalizes and scales per group and channel"

    def finish(self, node: gs.Node, index: int, edits: list[ParamEdit], opset: int) -> None:
        """`num_groups` = the groups whose channels remain."""
        if index == 1 and edits:
            node.attrs["num_groups"] = int(node.inputs[1].shape[0]) // edits[0].spatial

    def torch(self, op_type: str) -> TorchOp | None:
        return _group_norm


def _native_width(node: gs.Node) -> int | None:
    """d of a GroupNormalization (C / num_groups) when the channel count is static."""
    shape, groups = shape_of(node.inputs[0]), node.attrs.get("num_groups")
    if shape is None or len(shape) < 3 or not isinstance(shape[1], int) or not groups:
        return None
    return shape[1] // groups if shape[1] % groups == 0 else None


def _elementwise_output(node: gs.Node) -> list[gs.Tensor]:
    """The output of an elementwise op (where the look-ahead for a norm goes on), else none."""
    elementwise = node.op in _ELEMENTWISE or getattr(handler_for(node), "nonlinear", False)
    return node.outputs[:1] if elementwise else []


def _only_reader(tensor: gs.Tensor, op: str) -> gs.Node | None:
    users = tensor.outputs
    return users[0] if len(users) == 1 and users[0].op == op else None


def _restores_shape(merge: gs.Node, source: gs.Tensor) -> bool:
    """True when Reshape `merge`'s target is Shape(source), whole, or a constant equal to
    source's static shape."""
    target = merge.inputs[1]
    if isinstance(target, gs.Constant):
        return [int(v) for v in np.asarray(target.values).reshape(-1)] == shape_of(source)
    shape = target.inputs[0] if target.inputs else None
    return (
        shape is not None
        and shape.op == "Shape"
        and shape.inputs[0] is source
        and shape.attrs.get("start", 0) == 0
        and shape.attrs.get("end") is None
    )


def _split_of(merge: gs.Node) -> GroupNorm | None:
    """The GroupNorm that Reshape `merge` ends, else None."""
    norm = merge.inputs[0].inputs[0] if merge.inputs[0].inputs else None
    if norm is None or norm.op != "InstanceNormalization" or not norm.inputs[0].inputs:
        return None
    split = norm.inputs[0].inputs[0]
    found = group_norm_of(split) if split.op == "Reshape" else None
    return found if found is not None and found.merge is merge else None


def _group_norm(n: OpNode, xs: list) -> Result:
    """GroupNormalization (opset 21: per-channel scale and bias)."""
    import torch.nn.functional as F

    x, scale, bias = xs[:3]
    return F.group_norm(x, n.get("num_groups"), scale, bias, n.get("epsilon", 1e-5))
