"""What flows between the stages around a method: a group's statistics in, its Plan out.

Neutral ground (DESIGN.md §1b): calib/ fills GroupStats, methods/ return Plans, graph/rewrite.py
and recalibrate.py apply them. Plain frozen dataclasses of arrays, so none of those packages needs
another's modules to read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only the type: the loader imports onnxruntime
    from onnxprune.graph.load import FoldedBatchNorm


@dataclass(frozen=True)
class Correction:
    """a ≈ Mᵀ a_S + c at one tap: M is (k, m), c is (m,) or None."""

    M: np.ndarray
    c: np.ndarray | None = None


@dataclass(frozen=True)
class Plan:
    """Which channels of a group stay, and the correction folded into its consumers.

    `corrections` maps tap keys (`Tap.key`: the tensor name, '@offset' for a segment not at
    channel 0) to their Correction; a tap without one gets plain
    selection. `shifts` adds a bias shift per output unit of named consumer nodes (for
    corrections that differ per output unit, such as the Jacobian-weighted bias compensation).
    `rotation` (m, m, orthogonal) is applied to the producers before slicing.
    `info` carries per-group numbers for the report (e.g. relative reconstruction error).
    """

    keep: np.ndarray
    corrections: Mapping[str, Correction] = field(default_factory=dict)
    shifts: Mapping[str, np.ndarray] = field(default_factory=dict)
    rotation: np.ndarray | None = None
    info: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TapStats:
    """Streamed first and second moments of one tap over n rows (samples × positions).

    `r_factor` is the triangular factor of the stacked rows when the QR solver asked for it.
    `folds`: the same statistics of disjoint sets of samples that add up to these (the even
    and the odd samples), where a method cross-validates a fit (attention heads' maps).
    """

    n: int
    sum: np.ndarray
    gram: np.ndarray
    abs_sum: np.ndarray
    r_factor: np.ndarray | None = None
    folds: tuple[TapStats, ...] = ()

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)


@dataclass(frozen=True)
class GroupStats:
    """Everything a method may read about one group.

    `weights`: each producer's filters as rows (m, fan_in), BatchNorm already folded, in the
    weight's dtype (often a view of the weight: read-only).
    `batchnorms`: per producer, the BatchNorm folded into it at load time (γ, σ, raw filter
    norms), or None; filled with `weights`.
    `taps`: statistics per tap key (`Tap.key`; empty for data-free methods).
    `grads`: per-channel gradient sums (e.g. "taylor": Σ_samples (Σ_positions a·g)²), when needed.
    `consumers`: per consumer node, its Jacobian-weighted input statistics and its weight on the
    group as (outputs, channels, features) — for elimination–compensation.
    `norms`: per tap key behind an RMSNorm (`ChannelGroup.normalized`), the statistics of that
    norm's output, whose energies give the divisor correction.
    `features`: for attention heads, the statistics of each tap with every feature of every
    head as a channel (methods/heads.py), by the head tap's key.
    """

    weights: tuple[np.ndarray, ...] = ()
    batchnorms: tuple[FoldedBatchNorm | None, ...] = ()
    taps: Mapping[str, TapStats] = field(default_factory=dict)
    grads: Mapping[str, object] = field(default_factory=dict)
    consumers: Mapping[str, tuple[object, np.ndarray]] = field(default_factory=dict)
    norms: Mapping[str, TapStats] = field(default_factory=dict)
    features: Mapping[str, TapStats] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ValueDims:
    """Within heads (methods/headdims.py): per head the map of the values (D × k: kept
    columns or directions) and the correction x ≈ (x B) M + c of the head outputs x, B the
    block-diagonal of the maps."""

    maps: np.ndarray
    M: np.ndarray
    c: np.ndarray | None
    error: float


@dataclass(frozen=True, eq=False)
class QueryKeyBasis:
    """Within heads (methods/headdims.py): per head the maps q_h ← q_h A[h], k_h ← k_h B[h]
    (D × k each) and the relative score error √(Σ_{i>k} s_i² / Σ s_i²) its error model
    predicts (mean over heads)."""

    A: np.ndarray
    B: np.ndarray
    error: float
