"""Gemm and MatMul (dense layers), their quantized forms, and Einsum: consumers and MAC counts.

A Gemm reads the channels as the features of A (after a Flatten, `spatial` features each);
a MatMul with a constant 2-D right operand reads them on the last axis of its left one.

Einsum passes channels on a batch label: one the output keeps and no operand repeats. Output
slice c along it is computed from slice c of every operand holding it and from nothing else
along that label (torchvision's MaxViT writes attention as `einsum("bghid,bghjd->bghij", q, k)`
and `einsum("bghij,bghjd->bghid", a, v)`, the heads on label h), so the channels go to the
output's axis of that label and every other operand holding it is tied to the group, as the
operands of a batched MatMul are. A summed or repeated label, an ellipsis or an operand holding
the label as a constant is refused. An implicit output (no "->") holds the labels used once, in
alphabetical order (the ONNX rule).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.flow import Output, State, Step, block, const, rank_of, through
from onnxprune.ops.registry import Handler, ShapeOf, node_attrs, register
from onnxprune.ops.torch_support import binary, opt

if TYPE_CHECKING:
    import onnx

    from onnxprune.ops.torch_support import OpNode, Result, TorchOp


@register("Gemm")
class Gemm(Handler):
    """Y = alpha·A'B' + beta·C, the channels being A's features (transA = 0)."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if index != 0 or const(node, 1) is None or node.attrs.get("transA", 0) or state.axis != 1:
            return block(f"Gemm '{node.name}' reads the channels other than as features of A")
        axis = 1 if node.attrs.get("transB", 0) else 0
        edit = ParamEdit(node.name, 1, axis, state.offset, "in", state.spatial, state.tensor)
        return Step("consume", edits=[edit])

    def produce(self, node: gs.Node) -> Output | None:
        """Gemm with a constant 2-D B: its output features; a bias that is not constant, or
        differs per row, blocks them."""
        weight = const(node, 1)
        if weight.ndim != 2:
            return None
        axis = self.out_axis(node)
        channels, reason = weight.shape[axis], None
        edits = [ParamEdit(node.name, 1, axis, 0, "out")]
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = const(node, 2)
            if bias is None:
                reason = f"'{node.name}' has a non-constant bias"
            elif bias.ndim and bias.shape[-1] == channels and channels > 1:
                if bias.ndim == 2 and bias.shape[0] != 1:
                    reason = f"'{node.name}' has a per-row bias"
                edits.append(ParamEdit(node.name, 2, bias.ndim - 1, 0, "out"))
        return Output(channels, 1, tuple(edits), reason)

    def out_axis(self, node: gs.Node) -> int | None:
        return 0 if node.attrs.get("transB", 0) else 1

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        attrs = node_attrs(node)
        a, b = shape_of(node.input[0]), shape_of(node.input[1])
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * n * k

    def torch(self, op_type: str) -> TorchOp | None:
        return _gemm


@register("MatMul")
class MatMul(Handler):
    """A @ W with a constant 2-D W: the channels are A's last axis."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        weight, rank = const(node, 1), rank_of(node.inputs[0])
        if (
            index != 0
            or weight is None
            or weight.ndim != 2
            or rank is None
            or state.axis != rank - 1
        ):
            return block(f"MatMul '{node.name}' reads the channels other than as its last axis")
        edit = ParamEdit(node.name, 1, 0, state.offset, "in", state.spatial, state.tensor)
        return Step("consume", edits=[edit])

    def produce(self, node: gs.Node) -> Output | None:
        """MatMul with a constant 2-D right operand: the columns, on the output's last axis."""
        weight, rank = const(node, 1), rank_of(node.outputs[0])
        if weight.ndim != 2 or rank is None:
            return None
        return Output(weight.shape[1], rank - 1, (ParamEdit(node.name, 1, 1, 0, "out"),))

    def out_axis(self, node: gs.Node) -> int | None:
        return 1

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        return matmul_macs(node, shape_of, 1)

    def torch(self, op_type: str) -> TorchOp | None:
        import torch

        return binary(torch.matmul)


@register("MatMulInteger", "QLinearMatMul")
class QuantizedMatMul(Handler):
    """Quantized MatMul: counted, never pruned. QLinearMatMul's B is input 3 (after A's scale and
    zero point)."""

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        return matmul_macs(node, shape_of, 3 if node.op_type == "QLinearMatMul" else 1)


@register("Einsum")
class Einsum(Handler):
    """Einsum: counted for two operands without an ellipsis; the channels pass on a batch label
    (module docstring)."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        parsed = parse_equation(str(node.attrs.get("equation", "")))
        if parsed is None:
            return block(f"Einsum '{node.name}' has an ellipsis")
        operands, output = parsed
        if len(operands) != len(node.inputs) or len(operands[index]) != rank_of(node.inputs[index]):
            return block(f"Einsum '{node.name}' has an equation that does not fit its inputs")
        if any(len(set(labels)) != len(labels) for labels in operands):
            return block(f"Einsum '{node.name}' repeats a label (a diagonal)")
        label = operands[index][state.axis]
        if label not in output:
            return block(f"Einsum '{node.name}' sums over the channels")
        holders = [i for i, labels in enumerate(operands) if label in labels]
        if any(isinstance(node.inputs[i], gs.Constant) for i in holders):
            return block(f"Einsum '{node.name}' meets the channels with a constant")
        return through(node, state, axis=output.index(label), couple=len(holders) > 1)

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        """Product of every label's size for two operands; 0 for any other equation."""
        parsed = parse_equation(str(node_attrs(node).get("equation", b""), "utf-8"))
        if parsed is None or len(parsed[0]) != 2 or len(node.input) != 2:
            return 0
        sizes: dict[str, int] = {}
        for labels, name in zip(parsed[0], node.input, strict=True):
            shape = shape_of(name)
            if len(shape) != len(labels):
                return 0
            sizes.update(zip(labels, shape, strict=True))
        return math.prod(sizes.values())

    def torch(self, op_type: str) -> TorchOp | None:
        return _einsum


def parse_equation(equation: str) -> tuple[list[str], str] | None:
    """(labels of each operand, labels of the output) of an Einsum equation without an ellipsis,
    else None. An implicit output (no "->") holds the labels used once, in alphabetical order."""
    equation = equation.replace(" ", "")
    if "." in equation:
        return None
    inputs, _, output = equation.partition("->")
    operands = inputs.split(",")
    if "->" not in equation:
        labels = "".join(operands)
        output = "".join(sorted(label for label in set(labels) if labels.count(label) == 1))
    return operands, output


def matmul_macs(node: onnx.NodeProto, shape_of: ShapeOf, b_index: int) -> int:
    """Batched, broadcast matmul: prod(broadcast batch) · M · N · K (1-D operands promoted)."""
    a, b = shape_of(node.input[0]), shape_of(node.input[b_index])
    a = (1, *a) if len(a) == 1 else a
    b = (*b, 1) if len(b) == 1 else b
    batch = np.broadcast_shapes(a[:-2], b[:-2])
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


# ------------------------------------------------------------ torch equivalents


def _gemm(n: OpNode, xs: list) -> Result:
    """alpha * A' @ B' + beta * C."""
    a, b, c = xs[0], xs[1], opt(xs, 2)
    a = a.t() if n.get("transA", 0) else a
    b = b.t() if n.get("transB", 0) else b
    y = a @ b
    alpha, beta = n.get("alpha", 1.0), n.get("beta", 1.0)
    y = y if alpha == 1.0 else y * alpha
    if c is None:
        return y
    return y + (c if beta == 1.0 else c * beta)


def _einsum(n: OpNode, xs: list) -> Result:
    """Einstein summation with the node's equation."""
    import torch

    return torch.einsum(n.get("equation"), *xs)
