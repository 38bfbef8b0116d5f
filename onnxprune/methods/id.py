"""Interpolative-decomposition pruning (Chee et al., NeurIPS 2022), from the streamed Gram.

Greedy column pivoting on the consumed activations Z picks the kept channels; the interpolation
matrix T (Z ≈ Z_S T) is folded into every consumer. Pivoted Cholesky of G = ZᵀZ gives the same
selection and T as the paper's pivoted QR of Z without ever holding Z (methods/linalg.py).
With `intercept`, the centred Gram is used and c = μ − Tᵀμ_S goes into the consumer biases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.heads import channel_map, feature_corrections, fit_map, select_heads
from onnxprune.methods.linalg import (
    interpolative_from_blocks,
    interpolative_from_gram,
    least_squares_map,
)
from onnxprune.plan import Correction, GroupStats, Plan, TapStats


@dataclass(frozen=True)
class InterpolativeDecomposition:
    """ID selection plus the interpolation matrix as the correction at every tap."""

    intercept: bool = False
    solver: str = "gram"
    name: str = "id"
    needs: frozenset[str] = frozenset({"gram"})

    def plan(self, group: ChannelGroup, stats: GroupStats, keep: int, *, seed: int = 0) -> Plan:
        if group.head_dim > 1 and stats.features:  # heads: a map from every kept feature
            options = {"intercept": self.intercept}
            dim = group.feature_dim
            chosen, choice = select_heads(stats.features.values(), keep, dim, **options)
            corrections = feature_corrections(stats, chosen, dim, choice, **options)
            info = choice.info() if len(chosen) < group.channels else {}
            return Plan(keep=chosen, corrections=corrections, info=info)
        taps = list(stats.taps.items())
        if len(taps) == 1:
            tensor, tap = taps[0]
            if self.solver == "qr" and tap.r_factor is not None:
                result = interpolative_from_blocks([tap.r_factor], keep)
            else:
                result = interpolative_from_gram(
                    tap.gram, keep, intercept=self.intercept, mean=tap.mean, n=tap.n
                )
            if tap.folds and len(result.keep) < group.channels:  # --cv-maps: ridge by 2-fold CV
                return _cross_validated(tensor, tap, result.keep, self.intercept)
            c = result.c if self.intercept else None
            return Plan(keep=result.keep, corrections={tensor: Correction(result.T, c)})
        # several taps (a coupled group): one selection from the pooled, normalised Grams,
        # then each tap's own least-squares map for that selection
        chosen = interpolative_from_gram(pooled_gram(stats.taps.values()), keep).keep
        return Plan(keep=chosen, corrections=lsq_corrections(stats, chosen, self.intercept))


def _cross_validated(tensor: str, tap: TapStats, keep: np.ndarray, intercept: bool) -> Plan:
    """ID's selection with the map (ridge, or means only) of least held-out error on the tap's
    two folds, refitted on all samples; the report names it (`map_full=ρ  cv_err=…`)."""
    choice = channel_map(tap, keep, intercept=intercept)
    chosen = np.sort(keep)
    M, c = fit_map(tap, chosen, 1, choice.family, choice.ridge, intercept=intercept)
    correction = Correction(M, c if intercept else None)
    return Plan(keep=chosen, corrections={tensor: correction}, info=choice.info())


def pooled_gram(taps) -> np.ndarray:
    """Sum of the taps' Grams, each scaled to unit trace so no tap dominates by scale."""
    return sum(t.gram / max(np.trace(t.gram), 1e-300) for t in taps)


def lsq_corrections(stats: GroupStats, keep: np.ndarray, intercept: bool) -> dict[str, Correction]:
    """The least-squares map (affine with `intercept`) from the kept channels at every tap."""
    out = {}
    for tensor, tap in stats.taps.items():
        M, c = least_squares_map(tap.gram, tap.mean, tap.n, keep, intercept=intercept)
        out[tensor] = Correction(M, c if intercept else None)
    return out


def mean_shift_corrections(stats: GroupStats, keep: np.ndarray) -> dict[str, Correction]:
    """Selection plus c = the means of the removed channels (bias compensation)."""
    out = {}
    for tensor, tap in stats.taps.items():
        out[tensor] = Correction(_selection(tap, keep), _removed_means(tap, keep))
    return out


def _selection(tap: TapStats, keep: np.ndarray) -> np.ndarray:
    M = np.zeros((len(keep), len(tap.sum)))
    M[np.arange(len(keep)), keep] = 1.0
    return M


def _removed_means(tap: TapStats, keep: np.ndarray) -> np.ndarray:
    c = tap.mean.copy()
    c[keep] = 0.0
    return c
