"""onnxprune: structured pruning of ONNX models with corrections folded into the weights.

import onnxprune
result = onnxprune.prune("model.onnx", method="id", ratio=0.5, data="calib.npz")
result.save("model.pruned.onnx")
print(result.report.format())
"""

from __future__ import annotations

from onnxprune import compare
from onnxprune.api import Analysis, Result, analyze, prune
from onnxprune.calib.data import Dataset
from onnxprune.config import PruneConfig
from onnxprune.errors import OnnxPruneError, RejectedError
from onnxprune.methods.width import WidthRule
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
