"""onnxprune: structured pruning of ONNX models with corrections folded into the weights.

import onnxprune
result = onnxprune.prune("model.onnx", method="id", ratio=0.5, data="calib.npz")
result.save("model.pruned.onnx")
print(result.report.format())

The public names load on first use (PEP 562), so `onnxprune --help` starts without onnx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxprune.errors import OnnxPruneError, RejectedError

if TYPE_CHECKING:
    from onnxprune import compare
    from onnxprune.api import Analysis, Result, analyze, prune
    from onnxprune.calib.data import Dataset
    from onnxprune.config import PruneConfig
    from onnxprune.options import WidthRule
    from onnxprune.report import Report

__all__ = [
    "Analysis",
    "Dataset",
    "OnnxPruneError",
    "PruneConfig",
    "RejectedError",
    "Report",
    "Result",
    "WidthRule",
    "analyze",
    "compare",
    "prune",
]
__version__ = "0.1.0"

_LAZY = {
    "Analysis": "onnxprune.api",
    "Result": "onnxprune.api",
    "analyze": "onnxprune.api",
    "prune": "onnxprune.api",
    "PruneConfig": "onnxprune.config",
    "Dataset": "onnxprune.calib.data",
    "WidthRule": "onnxprune.options",
    "Report": "onnxprune.report",
    "compare": "onnxprune.compare",
}


def __getattr__(name: str) -> object:
    """Import a public name's module when the name is first read."""
    if name not in _LAZY:
        raise AttributeError(f"module 'onnxprune' has no attribute '{name}'")
    import importlib

    module = importlib.import_module(_LAZY[name])
    value = module if _LAZY[name] == f"onnxprune.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
