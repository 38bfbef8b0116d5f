"""Per-channel norms (BatchNormalization, InstanceNormalization) and LayerNormalization.

BatchNormalization and InstanceNormalization normalize each channel on its own: the channels
pass and their parameters are sliced with them. LayerNormalization over axes after the channel
axis acts per channel position. Over the channel axis (the last, as channels-last blocks
write it) removing channels changes the mean and variance of every channel left: the norm
consumes the group, and graph/channel_norm.py rebuilds its statistics from the kept channels,
where every reader of its output reads it through a weight; anything else is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from onnxprune.graph import channel_norm  # a module: it reads handlers back (ops/flow)
from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.flow import State, Step, block, const, parameter_input, rank_of, through
from onnxprune.ops.registry import Handler, register
from onnxprune.ops.torch_support import opt

if TYPE_CHECKING:
    from torch import Tensor

    from onnxprune.ops.torch_support import OpNode, Result, TorchOp


@register("BatchNormalization")
class BatchNormalization(Handler):
    """Inference BatchNorm: scale, bias, mean and variance sliced with the channels (a block
    of `spatial` features per channel: an attention head before its split, LeViT)."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        if state.axis != 1:
            return block(f"BatchNormalization '{node.name}' does not normalize the channel axis")
        if any(const(node, i) is None for i in range(1, 5)):
            return block(f"BatchNormalization '{node.name}' has non-constant parameters")
        edits = [
            ParamEdit(node.name, i, 0, state.offset, "chan", state.spatial) for i in range(1, 5)
        ]
        return through(node, state, edits=edits)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return f"BatchNormalization '{node.name}' has a per-channel affine"

    def torch(self, op_type: str) -> TorchOp | None:
        return _batch_norm


@register("InstanceNormalization")
class InstanceNormalization(Handler):
    """InstanceNorm: per channel, its scale and bias sliced with the channels."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        if (
            state.axis != 1
            or state.spatial != 1
            or const(node, 1) is None
            or const(node, 2) is None
        ):
            return block(f"InstanceNormalization '{node.name}' is not per-channel here")
        edits = [ParamEdit(node.name, i, 0, state.offset, "chan") for i in (1, 2)]
        return through(node, state, edits=edits)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return f"InstanceNormalization '{node.name}' has a per-channel affine"

    def torch(self, op_type: str) -> TorchOp | None:
        return _instance_norm


@register("LayerNormalization")
class LayerNormalization(Handler):
    """LayerNorm: passes channels it does not normalize over; over the last axis alone, read
    only through layers' weights, it consumes them (graph/channel_norm.py rebuilds it)."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        rank = rank_of(node.inputs[0])
        what = f"LayerNormalization '{node.name}' normalizes over the channel axis"
        if rank is None:
            return block(f"{what} or not (its input rank is unknown)")
        normalized = node.attrs.get("axis", -1) % rank
        if state.axis < normalized:
            return through(node, state)  # per channel position; scale and bias see no channels
        if normalized != rank - 1 or state.spatial != 1:
            return block(f"{what} and other axes")
        gamma, beta = const(node, 1), const(node, 2) if len(node.inputs) > 2 else None
        if gamma is None or (beta is None and len(node.inputs) > 2 and node.inputs[2].name):
            return block(f"{what} with a non-constant scale or bias")
        if any(out.outputs for out in node.outputs[1:]):
            return block(f"{what} and its mean or inverse deviation is read")
        if state.offset or channels != gamma.size:
            return block(f"{what} of other groups' channels too")
        readers = channel_norm.norm_readers(node)
        if isinstance(readers, str):
            return block(f"{what}: {readers}")
        edit = ParamEdit(node.name, 0, state.axis, 0, "norm", tap=state.tensor)
        return Step("consume", edits=[edit])

    def torch(self, op_type: str) -> TorchOp | None:
        return _layer_norm


@register("Softmax", "LogSoftmax")
class Softmax(Handler):
    """Softmax / LogSoftmax normalize over an axis: interpreted, not analyzed (channels block)."""

    def torch(self, op_type: str) -> TorchOp | None:
        import torch

        return _softmax_family(torch.softmax if op_type == "Softmax" else torch.log_softmax)


# ------------------------------------------------------------ torch equivalents


def _batch_norm(n: OpNode, xs: list) -> Result:
    """Inference BatchNormalization written out so every input (stats included) gets a grad."""
    import torch

    if n.get("training_mode", 0):
        raise n.unsupported("training_mode=1")
    x, scale, bias, mean, var = xs[:5]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale * torch.rsqrt(var + n.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _layer_norm(n: OpNode, xs: list) -> Result:
    """LayerNormalization over dims axis..-1 with broadcastable scale and bias."""
    import torch.nn.functional as F

    x, scale, bias = xs[0], xs[1], opt(xs, 2)
    shape = tuple(x.shape[n.get("axis", -1) % x.dim() :])
    scale = scale if tuple(scale.shape) == shape else scale.expand(shape)
    bias = bias if bias is None or tuple(bias.shape) == shape else bias.expand(shape)
    return F.layer_norm(x, shape, scale, bias, n.get("epsilon", 1e-5))


def _instance_norm(n: OpNode, xs: list) -> Result:
    """InstanceNormalization with per-channel scale and bias."""
    import torch.nn.functional as F

    return F.instance_norm(xs[0], weight=xs[1], bias=xs[2], eps=n.get("epsilon", 1e-5))


def _softmax_family(fn: Callable[[Tensor, int], Tensor]) -> Callable[[OpNode, list], Result]:
    """Softmax/LogSoftmax: opset >= 13 acts on one axis, older opsets on the 2-D coercion."""

    def op(n: OpNode, xs: list) -> Result:
        x = xs[0]
        if n.opset >= 13:
            return fn(x, n.get("axis", -1))
        axis = n.get("axis", 1) % max(x.dim(), 1)
        return fn(x.reshape(math.prod(x.shape[:axis]), -1), -1).reshape(x.shape)

    return op
