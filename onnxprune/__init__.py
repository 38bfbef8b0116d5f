"""onnxprune: structured pruning of ONNX models with corrections folded into the weights.

import onnxprune
result = onnxprune.prune("model.onnx", method="id", ratio=0.5, data="calib.npz")
result.save("model.pruned.onnx")
print(result.report.format())

The public names load on first use (PEP 562), so `onnxprune --help` starts without onnx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxprune.errors import OnnxPruneError

if TYPE_CHECKING:
    from onnxprune.api import Analysis, Result, analyze, prune
    from onnxprune.config import PruneConfig

__all__ = ["Analysis", "OnnxPruneError", "PruneConfig", "Result", "analyze", "prune"]
__version__ = "0.1.0"

_LAZY = {
    "Analysis": "onnxprune.api",
    "Result": "onnxprune.api",
    "analyze": "onnxprune.api",
    "prune": "onnxprune.api",
    "PruneConfig": "onnxprune.config",
}


def __getattr__(name: str) -> object:
    """Import a public name's module when the name is first read."""
    if name not in _LAZY:
        raise AttributeError(f"module 'onnxprune' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
