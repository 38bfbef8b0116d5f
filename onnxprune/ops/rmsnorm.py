"""Rotation-invariant norms: TSRA, RMSNorm (function, opset-23 op, primitive pattern).

These mix channels (each output divides by a norm over all of them) but only through a norm
that an orthogonal change of basis keeps: the channels pass, and a CoB rotation may be folded
across them (METHODS.md §1.2) — for any Q through RMSNorm, for Q block-diagonal on U ⊕ V
through TSRA (the group's `subspaces`).

* TSRA: the project's `onnxprune::TSRA` function, channels [0, split) = U, the rest = V; its
  `split` attribute shrinks by the pruned channels of U (`ParamEdit` role "split").
* RMSNorm: the `onnxprune::RMSNorm` function, opset-23 `RMSNormalization` (over axes [axis,
  rank); its scale is sliced, and commutes only when uniform), and the primitive
  Pow/Mul → ReduceMean → Add ε → Sqrt → Div (or Reciprocal, or c / √ as torch's legacy exporter
  writes rsqrt, → Mul) pattern, or ReduceSum → Div d in place of the ReduceMean (the form
  graph/layernorm.py writes).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.flow import (
    State,
    Step,
    axes_of,
    block,
    const,
    rank_of,
    single_user,
    through,
    with_param,
)
from onnxprune.ops.registry import Handler, register

DOMAIN = "onnxprune"


def is_tsra(node: gs.Node) -> bool:
    """A call of the model-local function `onnxprune::TSRA`."""
    return node.domain == DOMAIN and node.op == "TSRA"


class _Function(Handler):
    """A call of a model-local norm function over the channel axis (attribute `axis`)."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        rank = rank_of(node.inputs[0])
        what = f"{node.op} '{node.name}'"
        if index != 0 or rank is None:
            return block(f"{what} has an unknown input rank")
        if node.attrs.get("axis", 1) % rank != state.axis or state.spatial != 1:
            return block(f"{what} normalizes another axis than the channels")
        return self.passing(node, state)

    def passing(self, node: gs.Node, state: State) -> Step:
        """The channels passing the norm."""
        return through(node, state)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return None


@register("TSRA", domain=DOMAIN)
class TSRA(_Function):
    """TSRA: normalizes U and V apart; the index where V starts follows the pruned channels."""

    nonlinear = True

    def passing(self, node: gs.Node, state: State) -> Step:
        split = int(node.attrs["split"])
        edit = ParamEdit(node.name, 0, state.axis, state.offset, "split", split=split)
        return through(node, state, edits=[edit])

    def invariant(self, node: gs.Node, state: State) -> str | None:
        return "tsra"


@register("RMSNorm", domain=DOMAIN)
class RMSNormFunction(_Function):
    """The `onnxprune::RMSNorm` function (affine-free)."""

    def invariant(self, node: gs.Node, state: State) -> str | None:
        return "rmsnorm"


@register("RMSNormalization")
class RMSNormalization(Handler):
    """Opset-23 RMSNormalization normalizes over axes [axis, rank); its scale is sliced."""

    scaled = True

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        rank = rank_of(node.inputs[0])
        if index != 0 or rank is None or const(node, 1) is None:
            return block(f"RMSNormalization '{node.name}' has a non-constant scale")
        return with_param(node, 1, state, channels)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        rank, scale = rank_of(node.inputs[0]), const(node, 1)
        normalized = node.attrs.get("axis", -1) % rank if rank else None
        if normalized is None or state.axis < normalized:
            return f"RMSNormalization '{node.name}' normalizes each channel on its own"
        axis = state.axis - (rank - scale.ndim)
        if axis < 0 or scale.shape[axis] == 1 or np.all(scale == np.take(scale, [0], axis=axis)):
            return None
        return f"RMSNormalization '{node.name}' has a per-channel scale"

    def invariant(self, node: gs.Node, state: State) -> str | None:
        return "rmsnorm"


def rms_square(node: gs.Node, x: str, axis: int) -> gs.Node | None:
    """If `node` squares `x` and starts x / sqrt(mean_axis(x²) + ε), the final Div/Mul node."""
    if node.op == "Pow":
        exponent = const(node, 1)
        if node.inputs[0].name != x or exponent is None or exponent.size != 1:
            return None
        if float(exponent.reshape(-1)[0]) != 2.0:
            return None
    elif node.op != "Mul" or any(t.name != x for t in node.inputs):
        return None
    mean = single_user(node, "ReduceMean") or single_user(node, "ReduceSum")
    rank = rank_of(node.inputs[0])
    if mean is None or rank is None or not mean.attrs.get("keepdims", 1):
        return None
    axes = axes_of(mean)
    if axes is None or sorted(a % rank for a in axes) != [axis]:
        return None
    if mean.op == "ReduceSum":  # Σx²/d with a fixed d (graph/layernorm.py)
        mean = single_user(mean, "Div")
        if mean is None or not _scalar(mean, 1):
            return None
    add = single_user(mean, "Add")
    if add is None or not any(_scalar(add, i) for i in (0, 1)):
        return None
    root = single_user(add, "Sqrt")
    if root is None:
        return None
    end = single_user(root, "Div")
    inverse = single_user(root, "Reciprocal")
    if end is not None and end.inputs[1] is root.outputs[0] and _scalar(end, 0):
        inverse, end = end, None  # c / √(…): torch's rsqrt through the legacy exporter
    if end is None and inverse is not None:
        end = single_user(inverse, "Mul")
    if end is None or x not in [t.name for t in end.inputs]:
        return None
    return end


def _scalar(node: gs.Node, index: int) -> bool:
    """True when input `index` of `node` is a constant with one element."""
    value = const(node, index)
    return value is not None and value.size == 1


_DENOMINATOR = frozenset({"Reciprocal", "Sqrt", "Add", "ReduceMean", "ReduceSum", "Div"})


def is_rms_end(node: gs.Node, x: str, axis: int) -> bool:
    """True for the Div/Mul that completes an RMSNorm pattern of `x` over `axis`."""
    producer = next((t.inputs[0] for t in node.inputs if t.name != x and t.inputs), None)
    while producer is not None and producer.op in _DENOMINATOR:
        producer = next((t.inputs[0] for t in producer.inputs if t.inputs), None)
    return producer is not None and rms_square(producer, x, axis) is node


def rms_kind(node: gs.Node, x: str) -> str:
    """ "rmssum" for the x / √(Σx²/d + ε) that graph/layernorm.py writes (d stays the original
    width after slicing), "rmsnorm" for a mean over the channels present."""
    producer = next((t.inputs[0] for t in node.inputs if t.name != x and t.inputs), None)
    while producer is not None and producer.op in _DENOMINATOR:
        if producer.op == "ReduceSum":
            return "rmssum"
        producer = next((t.inputs[0] for t in producer.inputs if t.inputs), None)
    return "rmsnorm"
