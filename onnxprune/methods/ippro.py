"""IPPRO / PROscore (Jung et al., 2025): magnitude-indifferent importance in projective space.

For channel i with filter F_i (BatchNorm folded in), its loss gradient ∇F_i and the gradient of
the paper's injected offset D at the first nonlinearity σ, ∂L/∂D_i = Σ x_i·∂L/∂σ(x)_i (x = σ's
input; METHODS.md §3.1, no graph surgery needed):

    PROscore_i = ‖F_i − λ∇F_i‖ / |‖F_i‖ − λ ∂L/∂D_i|

The lowest scores are pruned. λ defaults, per producer, to 0.1·min_i ‖F_i‖/max(|∂L/∂D_i|, ‖∇F_i‖):
no denominator changes sign and both λ-terms stay below 10 % of ‖F_i‖, so the score is ≈ 1, in
its first-order regime (rank-stable under smaller λ) and scale-free, and groups can be ranked
together (`--global`). Coupled groups average their producers' scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import selection_plan
from onnxprune.plan import GroupStats, Plan

STABILITY_FACTORS = (1.0, 0.1, 0.01)


@dataclass(frozen=True)
class IPPRO:
    """Keep the channels with the highest PROscore."""

    lam: float | None = None
    name: str = "ippro"
    needs: frozenset[str] = frozenset({"weights", "ippro"})

    scale_free: bool = True  # --global compares raw PROscores across groups

    def plan(self, group: ChannelGroup, stats: GroupStats, keep: int, *, seed: int = 0) -> Plan:
        scores = self.scores(group, stats, seed=seed)
        return selection_plan(scores, keep, rank_stability=rank_stability(stats, self.lam))

    def scores(self, group: ChannelGroup, stats: GroupStats, *, seed: int = 0) -> np.ndarray:
        """PROscore of every channel (mean over the group's producers)."""
        return self.scores_at(stats)

    def scores_at(self, stats: GroupStats, factor: float = 1.0) -> np.ndarray:
        """PROscores with λ scaled by `factor` (for the rank-stability check)."""
        d = np.asarray(stats.grads["ippro_d"], dtype=np.float64)
        per_producer = [
            proscore(f, g, d, factor * (self.lam or default_lambda(f, g, d)))
            for f, g in zip(
                _float64(stats.weights), _float64(stats.grads["weight_grads"]), strict=True
            )
        ]
        return np.mean(per_producer, axis=0)


def _float64(arrays: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def proscore(filters: np.ndarray, grads: np.ndarray, d: np.ndarray, lam: float) -> np.ndarray:
    """‖F − λ∇F‖ / |‖F‖ − λ d| row by row."""
    numerator = np.linalg.norm(filters - lam * grads, axis=1)
    denominator = np.abs(np.linalg.norm(filters, axis=1) - lam * d)
    return numerator / np.maximum(denominator, 1e-30)


def default_lambda(filters: np.ndarray, grads: np.ndarray, d: np.ndarray) -> float:
    """0.1·min_i ‖F_i‖ / max(|d_i|, ‖∇F_i‖) over live filters: both λ-terms ≤ 10 % of ‖F_i‖."""
    norms = np.linalg.norm(filters, axis=1)
    scale = np.maximum(np.abs(d), np.linalg.norm(grads, axis=1))
    live = (norms > 0) & (scale > 0)
    if not live.any():
        return 0.0
    return 0.1 * float(np.min(norms[live] / scale[live]))


def rank_stability(stats: GroupStats, lam: float | None) -> float:
    """Smallest Spearman correlation between the scores at λ·{1, 0.1, 0.01} and at λ."""
    from scipy.stats import spearmanr  # lazy: scipy.stats adds ~0.5 s to every CLI start

    method = IPPRO(lam=lam)
    reference = method.scores_at(stats)
    if np.ptp(reference) == 0:
        return 1.0
    rhos = [
        spearmanr(reference, method.scores_at(stats, f)).statistic for f in STABILITY_FACTORS[1:]
    ]
    return float(np.nanmin(rhos))
