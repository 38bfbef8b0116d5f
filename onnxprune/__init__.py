"""onnxprune: structured pruning of ONNX models with corrections folded into the weights.

import onnxprune
result = onnxprune.prune("model.onnx", method="id", ratio=0.5, data="calib.npz")
result.save("model.pruned.onnx")
print(result.report.format())
"""

from __future__ import annotations

from onnxprune.api import Analysis, Result, analyze, prune
from onnxprune.config import PruneConfig
from onnxprune.errors import OnnxPruneError

__all__ = ["Analysis", "OnnxPruneError", "PruneConfig", "Result", "analyze", "prune"]
__version__ = "0.1.0"
