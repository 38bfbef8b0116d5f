"""Per-channel norms (BatchNormalization, InstanceNormalization) and LayerNormalization.

BatchNormalization and InstanceNormalization normalize each channel on its own: the channels
pass and their parameters are sliced with them. LayerNormalization over the channel axis is
refused: removing channels changes the mean and variance it divides by, for every remaining
channel. Over axes after the channel axis it acts per channel position.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.flow import State, Step, block, const, parameter_input, rank_of, through
from onnxprune.ops.registry import Handler, register


@register("BatchNormalization")
class BatchNormalization(Handler):
    """Inference BatchNorm: scale, bias, mean and variance sliced with the channels."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        if state.axis != 1 or state.spatial != 1:
            return block(f"BatchNormalization '{node.name}' does not normalize the channel axis")
        if any(const(node, i) is None for i in range(1, 5)):
            return block(f"BatchNormalization '{node.name}' has non-constant parameters")
        edits = [ParamEdit(node.name, i, 0, state.offset, "chan") for i in range(1, 5)]
        return through(node, state, edits=edits)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return f"BatchNormalization '{node.name}' has a per-channel affine"


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


@register("LayerNormalization")
class LayerNormalization(Handler):
    """LayerNorm: passes channels it does not normalize over, refuses those it does."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        rank = rank_of(node.inputs[0])
        if rank is None or state.axis >= node.attrs.get("axis", -1) % rank:
            return block(
                f"LayerNormalization '{node.name}' normalizes over the channel axis: removing "
                "channels changes the mean and variance of every channel left"
            )
        return through(node, state)  # per channel position; its scale and bias do not see channels
