"""Constant, ConstantOfShape and Range: values computed from attributes or shapes, interpreted
only (the analyzer sees folded constants)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from onnxprune.ops.registry import Handler, register
from onnxprune.ops.torch_support import constant_value, ints, to_tensor

if TYPE_CHECKING:
    from onnxprune.ops.torch_support import OpNode, Result, TorchOp


@register("Constant", "ConstantOfShape", "Range")
class Constant(Handler):
    """Ops that make a tensor without a data input."""

    def torch(self, op_type: str) -> TorchOp | None:
        equivalents = {
            "Constant": _constant,
            "ConstantOfShape": _constant_of_shape,
            "Range": _range,
        }
        return equivalents[op_type]


def _constant(n: OpNode, xs: list) -> Result:
    """Constant as a tensor (the graph precomputes these once)."""
    return to_tensor(constant_value(n))


def _constant_of_shape(n: OpNode, xs: list) -> Result:
    """Tensor of the given shape filled with the one-element `value` (default float 0)."""
    import torch

    value = n.get("value")
    fill = to_tensor(np.zeros(1, np.float32) if value is None else value.reshape(-1)[:1])
    return torch.full(ints(xs[0]), fill.item(), dtype=fill.dtype, device=xs[0].device)


def _range(n: OpNode, xs: list) -> Result:
    """start, start+delta, ... < limit with the inputs' dtype."""
    import torch

    start, limit, delta = (t.item() for t in xs)
    return torch.arange(start, limit, delta, dtype=xs[0].dtype, device=xs[0].device)
