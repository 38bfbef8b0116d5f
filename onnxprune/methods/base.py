"""What a method returns, and the interface every method implements.

A Plan keeps channels `keep` of a group and replaces each tap activation by a ≈ Mᵀ a_S + c
(DESIGN.md §3); a CoB plan also rotates the producers first. Methods never touch ONNX protos:
they read a ChannelGroup and its GroupStats and return a Plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from onnxprune.graph.groups import ChannelGroup

if TYPE_CHECKING:  # the loader imports onnxruntime; methods only read its record
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
    """

    n: int
    sum: np.ndarray
    gram: np.ndarray
    abs_sum: np.ndarray
    r_factor: np.ndarray | None = None

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)


@dataclass(frozen=True)
class GroupStats:
    """Everything a method may read about one group.

    `weights`: each producer's filters as rows (m, fan_in), BatchNorm already folded.
    `batchnorms`: per producer, the BatchNorm folded into it at load time (γ, σ, raw filter
    norms), or None; filled with `weights`.
    `taps`: statistics per tap key (`Tap.key`; empty for data-free methods).
    `grads`: per-channel gradient sums (e.g. "taylor": Σ_samples (Σ_positions a·g)²), when needed.
    `consumers`: per consumer node, its Jacobian-weighted input statistics and its weight on the
    group as (outputs, channels, features) — for elimination–compensation.
    `norms`: per tap key behind an RMSNorm (`ChannelGroup.normalized`), the statistics of that
    norm's output, whose energies give the divisor correction.
    """

    weights: tuple[np.ndarray, ...] = ()
    batchnorms: tuple[FoldedBatchNorm | None, ...] = ()
    taps: Mapping[str, TapStats] = field(default_factory=dict)
    grads: Mapping[str, object] = field(default_factory=dict)
    consumers: Mapping[str, tuple[object, np.ndarray]] = field(default_factory=dict)
    norms: Mapping[str, TapStats] = field(default_factory=dict)


class Method(Protocol):
    """A pruning method: its name, what it needs collected, and how it plans a group."""

    name: str
    needs: frozenset[str]

    def plan(self, group: ChannelGroup, stats: GroupStats, keep: int, *, seed: int = 0) -> Plan:
        """Choose `keep` channels of `group` and the correction for its taps."""
        ...


def top_k(scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the `keep` highest scores, ascending; ties go to the lower index."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(order[:keep])


def selection_plan(scores: np.ndarray, keep: int, **info: float) -> Plan:
    """A plan that keeps the `keep` best-scoring channels with no correction."""
    return Plan(keep=top_k(scores, keep), info=info)
