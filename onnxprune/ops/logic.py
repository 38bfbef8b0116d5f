"""Comparisons, boolean logic and Where: interpreted, never on a channel path the analyzer
passes (channels reaching them block)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxprune.ops.registry import Handler, register
from onnxprune.ops.torch_support import binary, unary

if TYPE_CHECKING:
    from onnxprune.ops.torch_support import OpNode, Result, TorchOp


@register("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Where")
class Logic(Handler):
    """Elementwise comparisons and boolean ops, and Where."""

    def torch(self, op_type: str) -> TorchOp | None:
        import torch

        return {
            "Equal": binary(torch.eq),
            "Less": binary(torch.lt),
            "Greater": binary(torch.gt),
            "LessOrEqual": binary(torch.le),
            "GreaterOrEqual": binary(torch.ge),
            "Not": unary(torch.logical_not),
            "And": binary(torch.logical_and),
            "Or": binary(torch.logical_or),
            "Where": _where,
        }[op_type]


def _where(n: OpNode, xs: list) -> Result:
    """Elementwise select with broadcasting."""
    import torch

    return torch.where(xs[0].bool(), xs[1], xs[2])
