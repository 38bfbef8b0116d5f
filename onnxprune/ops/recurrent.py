"""RNN, GRU and LSTM: counted (W·x and R·h per step), never pruned."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from onnxprune.ops.registry import Handler, ShapeOf, node_attrs, register

if TYPE_CHECKING:
    import onnx


@register("RNN", "GRU", "LSTM")
class Recurrent(Handler):
    """A recurrent layer: no flow rule (channels entering it block), MACs per step."""

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        """Per step and batch row: W·x and R·h for every gate and direction."""
        x = shape_of(node.input[0])
        steps, batch = (x[1], x[0]) if node_attrs(node).get("layout", 0) else (x[0], x[1])
        weights = math.prod(shape_of(node.input[1])) + math.prod(shape_of(node.input[2]))
        return steps * batch * weights
