"""Pruning methods, one module per family, registered by name in METHODS."""

from __future__ import annotations

from onnxprune.methods.base import Method
from onnxprune.methods.id import InterpolativeDecomposition
from onnxprune.methods.magnitude import Magnitude, Random


def build_method(name: str, *, norm: int = 1, compensate: str = "none") -> Method:
    """The method registered as `name`, configured with its options."""
    factories = {
        "magnitude": lambda: Magnitude(norm=norm),
        "random": Random,
        "id": lambda: InterpolativeDecomposition(intercept=compensate != "none"),
    }
    return factories[name]()


METHODS: tuple[str, ...] = ("id", "magnitude", "random")
