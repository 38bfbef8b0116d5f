"""Compare and choose: sweep methods × widths, and measure per-group sensitivity.

`sweep` prunes a model with several method specs (`magnitude`, `magnitude+lsq`, `id+bias` …) at
several ratios or MAC targets and evaluates each result on held-out data; `measure_sensitivity`
prunes one group at a time, and `allocate` turns those measurements into a per-group recipe that
meets a MAC target with the least estimated loss.
"""

from __future__ import annotations

from onnxprune.compare.sensitivity import (
    Allocation,
    Sensitivity,
    allocate,
    measure_sensitivity,
    plot_sensitivity,
)
from onnxprune.compare.sweep import (
    Evaluation,
    Evaluator,
    MethodSpec,
    SweepCell,
    SweepResult,
    overlap_warning,
    parse_grid,
    parse_method,
    plot_sweep,
    sweep,
)

__all__ = [
    "Allocation",
    "Evaluation",
    "Evaluator",
    "MethodSpec",
    "Sensitivity",
    "SweepCell",
    "SweepResult",
    "allocate",
    "measure_sensitivity",
    "overlap_warning",
    "parse_grid",
    "parse_method",
    "plot_sensitivity",
    "plot_sweep",
    "sweep",
]
