"""Pruning methods, one module per family, built by name (the names: `options.METHODS`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxprune.methods.base import Method


def build_method(
    name: str,
    *,
    norm: int = 1,
    criterion: str = "folded",
    compensate: str = "none",
    id_solver: str = "gram",
    ippro_lambda: float | None = None,
    threshold: tuple[str, float] | None = None,
    rms_correction: bool = False,
    joint: bool = False,
) -> Method:
    """The method registered as `name`, configured with its options.

    The method modules are imported here, not at the top, so that importing this package costs
    nothing until a method is built.
    """
    from onnxprune.methods.activation import Activation
    from onnxprune.methods.biascomp import BiasCompensation
    from onnxprune.methods.cob import ChangeOfBasis
    from onnxprune.methods.fpgm import FPGM
    from onnxprune.methods.id import InterpolativeDecomposition
    from onnxprune.methods.ippro import IPPRO
    from onnxprune.methods.magnitude import Magnitude, Random
    from onnxprune.methods.subspaces import SubspaceGuard
    from onnxprune.methods.taylor import Taylor

    factories = {
        "magnitude": lambda: Magnitude(norm=norm, criterion=criterion),
        "random": Random,
        "id": lambda: InterpolativeDecomposition(compensate != "none", id_solver),
        "taylor": Taylor,
        "fpgm": FPGM,
        "activation": Activation,
        "ippro": lambda: IPPRO(lam=ippro_lambda),
        "cob": lambda: ChangeOfBasis(threshold, rms_correction),
        "biascomp": lambda: BiasCompensation(joint=joint),
    }
    return SubspaceGuard(factories[name]())  # any method keeps ≥ 1 channel per TSRA subspace
