"""Unary elementwise ops: activations, math functions, casts. Each acts on every channel alike
(PRelu with a per-channel slope, sliced with the channels), so the channels pass."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.ops.flow import State, Step, parameter_input, through, with_param
from onnxprune.ops.registry import Handler, register


class _Unary(Handler):
    """One data input, acted on elementwise: the channels pass."""

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


@register(
    "Erf", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "Sin", "Cos",
)  # fmt: skip
class MathFunction(_Unary):
    """An elementwise function that is not an activation (nor linear)."""


@register("Cast", "Identity", "Dropout", "Neg")
class Linear(_Unary):
    """Identity, Dropout (at inference), Cast and Neg: linear and alike on every channel, so
    they commute with a rotation."""

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        return None

    def scales_along(self, node: gs.Node, index: int) -> bool:
        """Identity and Dropout hand the scaled channels on unchanged."""
        return node.op in ("Identity", "Dropout")
