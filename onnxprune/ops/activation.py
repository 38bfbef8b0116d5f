"""Unary elementwise ops: activations, math functions, casts. Each acts on every channel alike
(PRelu with a per-channel slope, sliced with the channels), so the channels pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from onnxprune.ops.flow import State, Step, parameter_input, through, with_param
from onnxprune.ops.registry import Handler, register
from onnxprune.ops.torch_support import opt, torch_dtype, unary

if TYPE_CHECKING:
    from onnxprune.ops.torch_support import OpNode, Result, TorchOp


class _Unary(Handler):
    """One data input, acted on elementwise: the channels pass."""

    strided = True

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        return parameter_input(node, index) or through(node, state)


@register(
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Gelu", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu",
)  # fmt: skip
class Activation(_Unary):
    """An elementwise nonlinearity (the first one a group passes is IPPRO's sigma)."""

    nonlinear = True

    def scales_along(self, node: gs.Node, index: int) -> bool:
        """ReLU and LeakyReLU are positively homogeneous: f(s·x) = s·f(x) for s > 0."""
        return node.op in ("Relu", "LeakyRelu")

    def torch(self, op_type: str) -> TorchOp | None:
        import torch
        import torch.nn.functional as F

        return {
            "Relu": unary(torch.relu),
            "LeakyRelu": _leaky_relu,
            "Elu": _elu,
            "Sigmoid": unary(torch.sigmoid),
            "Tanh": unary(torch.tanh),
            "Clip": _clip,
            "HardSigmoid": _hard_sigmoid,
            "HardSwish": unary(F.hardswish),
            "Gelu": _gelu,
            "Softplus": unary(F.softplus),
        }.get(op_type)


@register("PRelu")
class PRelu(Handler):
    """PRelu: its slope is sliced with the channels where it has them."""

    nonlinear = True

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        return parameter_input(node, index) or with_param(node, 1, state, channels)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return f"PRelu '{node.name}' has per-channel slopes"

    def scales_along(self, node: gs.Node, index: int) -> bool:
        return True

    def torch(self, op_type: str) -> TorchOp | None:
        return _prelu


@register(
    "Erf", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "Sin", "Cos",
)  # fmt: skip
class MathFunction(_Unary):
    """An elementwise function that is not an activation (nor linear)."""

    def torch(self, op_type: str) -> TorchOp | None:
        """torch's function of the same name, lower-cased (Sin and Cos are not interpreted)."""
        import torch

        if op_type in ("Sin", "Cos"):
            return None
        return unary(getattr(torch, op_type.lower()))


@register("Cast", "Identity", "Dropout", "Neg")
class Linear(_Unary):
    """Identity, Dropout (at inference), Cast and Neg: linear and alike on every channel, so
    they commute with a rotation."""

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return None

    def scales_along(self, node: gs.Node, index: int) -> bool:
        """Identity and Dropout hand the scaled channels on unchanged."""
        return node.op in ("Identity", "Dropout")

    def torch(self, op_type: str) -> TorchOp | None:
        import torch

        equivalents = {
            "Cast": _cast,
            "Identity": _identity,
            "Dropout": _dropout,
            "Neg": unary(torch.neg),
        }
        return equivalents[op_type]

    def max_outputs(self, op_type: str) -> int | None:
        """Dropout's mask output is provided (all true at inference)."""
        return 2 if op_type == "Dropout" else 1


# ------------------------------------------------------------ torch equivalents


def _clip(n: OpNode, xs: list) -> Result:
    """Clip with min/max as inputs (opset >= 11) or attributes (older)."""
    import torch

    x = xs[0]
    lo, hi = opt(xs, 1), opt(xs, 2)
    lo = lo if lo is not None or n.get("min") is None else x.new_tensor(n.get("min"))
    hi = hi if hi is not None or n.get("max") is None else x.new_tensor(n.get("max"))
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


def _leaky_relu(n: OpNode, xs: list) -> Result:
    """LeakyRelu with attribute alpha (default 0.01)."""
    import torch.nn.functional as F

    return F.leaky_relu(xs[0], n.get("alpha", 0.01))


def _prelu(n: OpNode, xs: list) -> Result:
    """PRelu with a slope that broadcasts to X."""
    import torch

    x, slope = xs
    return torch.where(x < 0, x * slope, x)


def _elu(n: OpNode, xs: list) -> Result:
    """Elu with attribute alpha."""
    import torch.nn.functional as F

    return F.elu(xs[0], n.get("alpha", 1.0))


def _hard_sigmoid(n: OpNode, xs: list) -> Result:
    """max(0, min(1, alpha * x + beta))."""
    import torch

    return torch.clamp(xs[0] * n.get("alpha", 0.2) + n.get("beta", 0.5), 0.0, 1.0)


def _gelu(n: OpNode, xs: list) -> Result:
    """Gelu (opset 20) with approximate none/tanh."""
    import torch.nn.functional as F

    return F.gelu(xs[0], approximate=n.get("approximate", "none"))


def _cast(n: OpNode, xs: list) -> Result:
    """Cast to float32 / int64 / bool according to the target element type."""
    return xs[0].to(torch_dtype(n.get("to")))


def _dropout(n: OpNode, xs: list) -> Result:
    """Inference Dropout: identity, plus an all-true mask when the second output is used."""
    import torch

    x = xs[0]
    return (x, torch.ones_like(x, dtype=torch.bool)) if n.n_outputs > 1 else x


def _identity(n: OpNode, xs: list) -> Result:
    """Pass the input through."""
    return xs[0]
