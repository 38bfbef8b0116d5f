"""Rotation-invariant ops (TSRA, affine-free RMSNorm) and which ops commute with a change of basis.

Two questions the analyzer asks of every op between a producer and its taps:

* `invariant_step`: may channels pass through this op, which mixes channels (so `ops.step` would
  block it) but only through rotation-invariant norms? TSRA (the project's `onnxprune::TSRA`
  function: channels [0, split) = U, the rest = V), RMSNorm (the `onnxprune::RMSNorm` function,
  opset-23 `RMSNormalization`, and the primitive Pow/Mul → ReduceMean → Add ε → Sqrt → Div pattern,
  or ReduceSum → Div d in place of the ReduceMean: the form graph/layernorm.py writes).
* `rotation_block`: does the op commute with an orthogonal map Q of the group's channels
  (METHODS.md §1.2, issue 8 item 3)? Linear ops that act identically on every channel do
  (average pooling, flatten, concat, padding with zeros, scalar scaling, residual sums of
  channels rotated alike); RMSNorm does for any Q, TSRA for Q block-diagonal on U ⊕ V (the
  group's `subspaces`). Anything else — ReLU, BatchNorm's affine, MaxPool — blocks, with a reason.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.graph.ops import State, Step, _param_edit, _through, const, rank_of

DOMAIN = "onnxprune"


def is_tsra(node: gs.Node) -> bool:
    """A call of the model-local function `onnxprune::TSRA`."""
    return node.domain == DOMAIN and node.op == "TSRA"


def _is_rms_call(node: gs.Node) -> bool:
    return node.domain == DOMAIN and node.op == "RMSNorm"


def invariant_step(node: gs.Node, index: int, state: State, channels: int) -> Step | None:
    """The step for a TSRA / RMSNorm op reading the channels, or None for any other op."""
    if is_tsra(node) or _is_rms_call(node):
        return _function_step(node, index, state, channels)
    if node.op == "RMSNormalization" and node.domain in (None, "", "ai.onnx"):
        return _rmsnormalization(node, index, state, channels)
    if node.op in ("Pow", "Mul") and rms_square(node, state.tensor, state.axis):
        return Step("consume")  # the norm branch of an RMSNorm pattern: nothing to fold
    return None


def _function_step(node: gs.Node, index: int, state: State, channels: int) -> Step:
    rank = rank_of(node.inputs[0])
    what = f"{node.op} '{node.name}'"
    if index != 0 or rank is None:
        return Step("block", reason=f"{what} has an unknown input rank")
    if node.attrs.get("axis", 1) % rank != state.axis or state.spatial != 1:
        return Step("block", reason=f"{what} normalizes another axis than the channels")
    if not is_tsra(node):
        return _through(node, state)
    split = int(node.attrs["split"])
    edit = ParamEdit(node.name, 0, state.axis, state.offset, "split", split=split)
    return _through(node, state, edits=[edit])


def _rmsnormalization(node: gs.Node, index: int, state: State, channels: int) -> Step:
    """Opset-23 RMSNormalization normalizes over axes [axis, rank); its scale is sliced."""
    rank = rank_of(node.inputs[0])
    if index != 0 or rank is None or const(node, 1) is None:
        return Step("block", reason=f"RMSNormalization '{node.name}' has a non-constant scale")
    edit = _param_edit(node, 1, state, channels)
    if isinstance(edit, Step):
        return edit
    return _through(node, state, edits=[edit] if edit else [])


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
    mean = _only_user(node, "ReduceMean") or _only_user(node, "ReduceSum")
    rank = rank_of(node.inputs[0])
    if mean is None or rank is None or not mean.attrs.get("keepdims", 1):
        return None
    if _axes(mean, rank) != [axis]:
        return None
    if mean.op == "ReduceSum":  # Σx²/d with a fixed d (graph/layernorm.py)
        mean = _only_user(mean, "Div")
        if mean is None or const(mean, 1) is None or const(mean, 1).size != 1:
            return None
    add = _only_user(mean, "Add")
    if add is None or not any(
        const(add, i) is not None and const(add, i).size == 1 for i in (0, 1)
    ):
        return None
    root = _only_user(add, "Sqrt")
    if root is None:
        return None
    end = _only_user(root, "Div")
    if end is None:
        inverse = _only_user(root, "Reciprocal")
        end = _only_user(inverse, "Mul") if inverse is not None else None
    if end is None or x not in [t.name for t in end.inputs]:
        return None
    return end


def _only_user(node: gs.Node, op: str) -> gs.Node | None:
    users = node.outputs[0].outputs if node.outputs else []
    return users[0] if len(users) == 1 and users[0].op == op else None


def _axes(node: gs.Node, rank: int) -> list[int] | None:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        value = const(node, 1)
        axes = None if value is None else value.reshape(-1).tolist()
    return None if axes is None else sorted(int(a) % rank for a in axes)


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


_COMMUTING = frozenset(
    {"AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Squeeze", "Unsqueeze"}
    | {"Concat", "Identity", "Dropout", "Cast", "Neg", "Resize", "Upsample"}
    | {"ReduceMean", "ReduceSum"}  # over positions only: the channel axis rule blocks the rest
)
_WHY = {
    "BatchNormalization": "has a per-channel affine",
    "InstanceNormalization": "has a per-channel affine",
    "MaxPool": "takes a per-channel max",
    "GlobalMaxPool": "takes a per-channel max",
    "Conv": "is a depthwise conv with per-channel kernels",
    "PRelu": "has per-channel slopes",
}


def rotation_block(node: gs.Node, index: int, state: State, result: Step) -> str | None:
    """Why `node` (passing the channels on as `result`) does not commute with a rotation."""
    if result.kind != "through" or is_tsra(node) or _is_rms_call(node):
        return None
    what = f"{node.op} '{node.name}'"
    if node.op in _COMMUTING:
        return None
    if node.op == "RMSNormalization":
        return _rms_scale_block(node, state)
    if node.op == "Pad":
        mode = node.attrs.get("mode", "constant")
        value = const(node, 2) if len(node.inputs) > 2 and node.inputs[2].name else None
        zero = value is None or not np.any(value)
        return None if mode != "constant" or zero else f"{what} pads with a nonzero constant"
    if node.op in ("Add", "Sub", "Mul", "Div"):
        return _elementwise_block(node, index, state, result)
    return f"{what} {_WHY.get(node.op, 'is not rotation-equivariant')}"


def _rms_scale_block(node: gs.Node, state: State) -> str | None:
    rank, scale = rank_of(node.inputs[0]), const(node, 1)
    normalized = node.attrs.get("axis", -1) % rank if rank else None
    if normalized is None or state.axis < normalized:
        return f"RMSNormalization '{node.name}' normalizes each channel on its own"
    axis = state.axis - (rank - scale.ndim)
    if axis < 0 or scale.shape[axis] == 1 or np.all(scale == np.take(scale, [0], axis=axis)):
        return None
    return f"RMSNormalization '{node.name}' has a per-channel scale"


def _elementwise_block(node: gs.Node, index: int, state: State, result: Step) -> str | None:
    what = f"{node.op} '{node.name}'"
    other = node.inputs[1 - index]
    if node.op in ("Add", "Sub"):
        if isinstance(other, gs.Constant):  # a per-channel constant is rotated along
            uniform = not result.edits and np.any(other.values)
            return f"{what} adds the same constant to every channel" if uniform else None
        return None if result.couple else f"{what} adds a tensor that is not rotated alike"
    if node.op == "Div" and index != 0:
        return f"{what} divides by the channels"
    if result.couple:
        return f"{what} multiplies two channel tensors elementwise"
    if isinstance(other, gs.Constant) and result.edits:
        return f"{what} scales each channel differently"
    return None  # a scalar, or a per-position map (e.g. an RMS denominator)
