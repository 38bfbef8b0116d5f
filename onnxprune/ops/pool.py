"""Pooling over positions and reductions over axes other than the channels: the channels pass.

Average pooling and sums/means over positions are linear and alike on every channel (they
commute with a rotation); max pooling takes a per-channel max (it does not).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.ops.flow import State, Step, axes_of, block, parameter_input, rank_of, through
from onnxprune.ops.registry import Handler, register


@register("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool")
class Pool(Handler):
    """A pool over the positions of an NCHW tensor."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        if state.axis != 1 or state.spatial != 1:
            return block(f"{node.op} '{node.name}' pools over the channel axis")
        return through(node, state)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        if node.op in ("AveragePool", "GlobalAveragePool"):
            return None
        if node.op in ("MaxPool", "GlobalMaxPool"):
            return f"{node.op} '{node.name}' takes a per-channel max"
        return super().rotation(node, index, state, result)

    def scales_along(self, node: gs.Node, index: int) -> bool:
        return node.op != "LpPool"


@register("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1")
class Reduce(Handler):
    """A reduction over given axes, none of them the channel axis."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        rank = rank_of(node.inputs[0])
        axes = axes_of(node)
        if rank is None or not axes:
            return block(f"{node.op} '{node.name}' reduces over all axes (or unknown axes)")
        axes = [a % rank for a in axes]
        if state.axis in axes or state.spatial != 1:
            return block(f"{node.op} '{node.name}' reduces over the channel axis")
        keep = node.attrs.get("keepdims", 1)
        axis = state.axis if keep else state.axis - sum(a < state.axis for a in axes)
        return through(node, state, axis=axis)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        """Sums and means over positions commute (the channel axis is never reduced here)."""
        if node.op in ("ReduceMean", "ReduceSum"):
            return None
        return super().rotation(node, index, state, result)

    def scales_along(self, node: gs.Node, index: int) -> bool:
        return node.op in ("ReduceMean", "ReduceSum", "ReduceMax")
