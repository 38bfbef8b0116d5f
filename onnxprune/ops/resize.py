"""Resize / Upsample and Pad: ops that change the positions, alike on every channel.

Resize with scales passes the channels when the channel scale is 1; with constant sizes, when
the channel entry states the channel count (it shrinks with the group). Pad passes them when
the channel axis gets no padding; it commutes with a rotation when it pads with zeros.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.flow import (
    State,
    Step,
    block,
    channel_count,
    const,
    count_edit,
    parameter_input,
    rank_of,
    through,
)
from onnxprune.ops.registry import Handler, register


@register("Resize", "Upsample")
class Resize(Handler):
    """Resize / Upsample over the positions of an NCHW tensor."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        if len(node.inputs) > 3 and node.inputs[3].name:
            return _sizes(node, state)
        scales = const(node, 2) if len(node.inputs) > 2 and node.inputs[2].name else None
        if scales is not None and scales.size and scales.reshape(-1)[state.axis] != 1:
            return block(f"Resize '{node.name}' scales the channel axis")
        if state.axis != 1:
            return block(f"Resize '{node.name}' on a non-NCHW tensor")
        return through(node, state)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return None

    def scales_along(self, node: gs.Node, index: int) -> bool:
        return True


@register("Pad")
class Pad(Handler):
    """Pad with constant pads that leave the channel axis alone."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        pads = node.attrs.get("pads")
        if pads is None:
            pads = const(node, 1)
        rank = rank_of(node.inputs[0])
        if pads is None or rank is None:
            return block(f"Pad '{node.name}' has non-constant pads")
        pads = list(np.asarray(pads).reshape(-1))
        axes = const(node, 3) if len(node.inputs) > 3 and node.inputs[3].name else None
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
        if state.axis in axes:
            where = axes.index(state.axis)
            if pads[where] != 0 or pads[where + len(axes)] != 0:
                return block(f"Pad '{node.name}' pads the channel axis")
        return through(node, state)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        """Padding with zeros (or by reflection, edge or wrap) commutes; a nonzero constant
        is not rotated along."""
        mode = node.attrs.get("mode", "constant")
        value = const(node, 2) if len(node.inputs) > 2 and node.inputs[2].name else None
        zero = value is None or not np.any(value)
        if mode != "constant" or zero:
            return None
        return f"Pad '{node.name}' pads with a nonzero constant"


def _sizes(node: gs.Node, state: State) -> Step:
    """Explicit sizes: the channel entry must state C, and shrinks with the group."""
    sizes, rank = const(node, 3), rank_of(node.inputs[0])
    if sizes is None or rank is None:
        return block(f"Resize '{node.name}' has non-constant sizes")
    axes = [int(a) % rank for a in node.attrs.get("axes", range(rank))]
    if state.axis not in axes:
        return through(node, state)
    entry = axes.index(state.axis)
    if int(sizes.reshape(-1)[entry]) != channel_count(node, state.axis):
        return block(f"Resize '{node.name}' resizes the channel axis")
    return through(node, state, edits=[count_edit(node, 3, entry, state)])
