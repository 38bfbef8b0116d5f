"""Conv and ConvTranspose: the producers and consumers of channels in CNNs.

A plain Conv (group 1) or ConvTranspose reads the channels through its weight (a consumer). A
depthwise Conv (C in = C out = group) acts channel by channel: the channels pass, its filters
and bias are sliced with them and `group` follows their count. Any other grouped Conv reads each
conv group's input channels on their own: the group is cut at the conv-group boundaries, and
each part is read through that conv group's filters alone, so its correction stays inside the
conv group (the parts keep equal widths, `ChannelGroup.ties`, so `group` stays valid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.flow import Output, State, Step, block, const, cuts_at, shape_of, through
from onnxprune.ops.registry import Handler, ShapeOf, register
from onnxprune.ops.torch_support import geometry, opt, torch_pads

if TYPE_CHECKING:
    import onnx
    from torch import Tensor

    from onnxprune.ops.torch_support import OpNode, Result, TorchOp


def is_grouped_conv(node: gs.Node) -> bool:
    """A Conv with group > 1 that is not a plain depthwise conv (C in = C out = group, which
    passes the channels through)."""
    weight, group = const(node, 1), node.attrs.get("group", 1)
    if node.op != "Conv" or group == 1 or weight is None:
        return False
    return not (weight.shape[0] == group and weight.shape[1] == 1)  # depthwise: C in = group


@register("Conv")
class Conv(Handler):
    """Conv: consumer (plain or per conv group) or, depthwise, a channel-wise passthrough."""

    strided = True

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if is_grouped_conv(node):
            if index != 0:
                return block(f"channels enter Conv '{node.name}' as a parameter input")
            return _grouped(node, state, channels)
        weight = const(node, 1)
        if index != 0 or weight is None:
            return block(
                f"channels reach a weight input of Conv '{node.name}' or it is not constant"
            )
        if state.axis != 1:
            return block(f"Conv '{node.name}' reads channels on another axis")
        group = node.attrs.get("group", 1)
        stride, spatial = state.stride, state.spatial  # spatial: channels per unit (GroupNorm)
        if group == 1:
            edit = ParamEdit(
                node.name, 1, 1, state.offset, "in", spatial, tap=state.tensor, stride=stride
            )
            return Step("consume", edits=[edit])
        if group == weight.shape[0] and weight.shape[1] == 1 and _in_channels(node) == group:
            edits = [
                ParamEdit(node.name, i, 0, state.offset, "chan", spatial, stride=stride)
                for i in (1, 2)
                if i == 1 or const(node, 2) is not None
            ]
            return through(node, state, edits=edits)
        return block(f"grouped Conv '{node.name}' (group={group}) is not depthwise")

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return f"Conv '{node.name}' is a depthwise conv with per-channel kernels"

    def produce(self, node: gs.Node) -> Output | None:
        """A plain or grouped Conv (one group per conv group, equal widths); a depthwise one
        passes channels instead."""
        group = node.attrs.get("group", 1)
        if group != 1 and not is_grouped_conv(node):
            return None
        channels = const(node, 1).shape[0]
        return _with_bias(node, channels, ParamEdit(node.name, 1, 0, 0, "out"), blocks=group)

    def out_axis(self, node: gs.Node) -> int | None:
        return 0

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        return conv_macs(node, shape_of, 1)

    def torch(self, op_type: str) -> TorchOp | None:
        return _conv

    def finish(self, node: gs.Node, index: int, edits: list[ParamEdit], opset: int) -> None:
        """A depthwise Conv whose filters were sliced as channels keeps group = its channels.

        Only such a Conv changes `group`: any other grouped Conv (outside every pruned group,
        or pruned with its group structure kept) keeps its attribute."""
        if index == 1 and any(e.role == "chan" for e in edits):
            node.attrs["group"] = int(node.inputs[1].shape[0])


@register("ConvInteger", "QLinearConv")
class QuantizedConv(Handler):
    """Quantized Conv: counted, never pruned. QLinearConv's weight is input 3 (after the input's
    scale and zero point)."""

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        return conv_macs(node, shape_of, 3 if node.op_type == "QLinearConv" else 1)


@register("ConvTranspose")
class ConvTranspose(Handler):
    """ConvTranspose (group 1): a consumer through its weight's first axis."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if index != 0 or const(node, 1) is None or node.attrs.get("group", 1) != 1:
            return block(f"ConvTranspose '{node.name}' is grouped or has a non-constant weight")
        if state.axis != 1 or state.spatial != 1:
            return block(f"ConvTranspose '{node.name}' reads channels on another axis")
        edit = ParamEdit(node.name, 1, 0, state.offset, "in", tap=state.tensor)
        return Step("consume", edits=[edit])

    def produce(self, node: gs.Node) -> Output | None:
        if node.attrs.get("group", 1) != 1:
            return None
        channels = const(node, 1).shape[1]
        return _with_bias(node, channels, ParamEdit(node.name, 1, 1, 0, "out"))

    def out_axis(self, node: gs.Node) -> int | None:
        """Weight (C_in, C_out / group, kernel...)."""
        return 1

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        """Every input element is multiplied by a (C_out/group)·kernel slice: |X| · prod(W[1:])."""
        return math.prod(shape_of(node.input[0])) * math.prod(shape_of(node.input[1])[1:])

    def torch(self, op_type: str) -> TorchOp | None:
        return _conv_transpose


def conv_macs(node: onnx.NodeProto, shape_of: ShapeOf, weight_index: int) -> int:
    """N·C_out·spatial_out · (C_in/group)·kernel = |Y| · prod(W.shape[1:]), any spatial rank."""
    weight = shape_of(node.input[weight_index])
    return math.prod(shape_of(node.output[0])) * math.prod(weight[1:])


def _with_bias(node: gs.Node, channels: int, rows: ParamEdit, *, blocks: int = 1) -> Output:
    """A conv producer's output: its weight rows and, when it has one, its bias (which must be a
    constant to be sliced)."""
    edits, reason = [rows], None
    if len(node.inputs) > 2 and node.inputs[2].name:
        if const(node, 2) is None:
            reason = f"'{node.name}' has a non-constant bias"
        else:
            edits.append(ParamEdit(node.name, 2, 0, 0, "out"))
    return Output(channels, 1, tuple(edits), reason, blocks)


def _grouped(node: gs.Node, state: State, channels: int) -> Step:
    """A grouped Conv consumes the channels of one conv group; others are cut at its bounds."""
    if state.axis != 1 or state.spatial != 1:
        return block(f"Conv '{node.name}' reads channels on another axis")
    if state.stride != 1:
        return block(f"grouped Conv '{node.name}' reads channels spread by a channel shuffle")
    per_group = int(const(node, 1).shape[1])
    bounds = list(range(per_group, per_group * node.attrs["group"], per_group))
    cuts = cuts_at(bounds, state, channels)
    if cuts:
        return block(f"grouped Conv '{node.name}' reads the channels in several conv groups", cuts)
    edit = ParamEdit(node.name, 1, 1, state.offset, "in", tap=state.tensor)
    return Step("consume", edits=[edit])


def _in_channels(node: gs.Node) -> int | None:
    shape = shape_of(node.inputs[0])
    return shape[1] if shape and isinstance(shape[1], int) else None


# ------------------------------------------------------------ torch equivalents


def _conv(n: OpNode, xs: list) -> Result:
    """Conv with groups, strides, dilations and (a)symmetric or auto pads."""
    import torch.nn.functional as F

    x, w, b = xs[0], xs[1], opt(xs, 2)
    kernel = list(w.shape[2:])
    k = len(kernel)
    if k not in (1, 2, 3):
        raise n.unsupported(f"{k}-d convolution")
    strides, dilations, pads = geometry(n, x, kernel)
    padding: list[int] | int = pads[:k]
    if pads[:k] != pads[k:]:
        x, padding = F.pad(x, torch_pads(pads)), 0
    return getattr(F, f"conv{k}d")(x, w, b, strides, padding, dilations, n.get("group", 1))


def _conv_transpose_pads(
    n: OpNode, x: Tensor, full: Sequence[int], out_pad: Sequence[int], strides: Sequence[int]
) -> list[int]:
    """Crop amounts [b..., e...] that turn the full transposed-conv output into the ONNX one."""
    k = len(full)
    auto = n.get("auto_pad", "NOTSET")
    target = n.get("output_shape")
    if target is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [size * s for size, s in zip(x.shape[2:], strides, strict=True)]
    if target is None:
        return [0] * (2 * k) if auto == "VALID" else list(n.get("pads", [0] * (2 * k)))
    target = list(target)[-k:]
    total = [f + o - t for f, o, t in zip(full, out_pad, target, strict=True)]
    if auto == "SAME_UPPER":
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    return [t - t // 2 for t in total] + [t // 2 for t in total]


def _conv_transpose(n: OpNode, xs: list) -> Result:
    """ConvTranspose: full transposed conv, then output_padding and pads applied as a crop."""
    import torch.nn.functional as F

    x, w, b = xs[0], xs[1], opt(xs, 2)
    k = w.dim() - 2
    if k not in (1, 2, 3):
        raise n.unsupported(f"{k}-d transposed convolution")
    strides = list(n.get("strides", [1] * k))
    dilations = list(n.get("dilations", [1] * k))
    out_pad = list(n.get("output_padding", [0] * k))
    y = getattr(F, f"conv_transpose{k}d")(x, w, None, strides, 0, 0, n.get("group", 1), dilations)
    pads = _conv_transpose_pads(n, x, list(y.shape[2:]), out_pad, strides)
    crop = [-p for p in pads[:k]] + [o - p for o, p in zip(out_pad, pads[k:], strict=True)]
    if any(crop):
        y = F.pad(y, torch_pads(crop))
    return y if b is None else y + b.reshape(1, -1, *[1] * k)
