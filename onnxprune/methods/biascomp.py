"""Elimination–compensation (Ballini et al., 2026), per channel: importance after the optimal
shift of the adjacent bias (METHODS.md §2.4, our derivation; the paper is per weight).

Removing input channel j of a consumer and shifting its bias b_i by δ_i changes output unit i by
g_i(δ_i − W_ij a_j). With the Jacobian-weighted sums S0, S1, S2 of calib/jacobian.py:

    δ_i = Σ_j W_ij S1_ij / S0_i        I_j = Σ_i W_ij² (S2_ij − S1_ij² / S0_i)

summed over every consumer of the group and every feature of the channel (Flatten→Gemm), with
conv kernels summed over their taps (exact away from zero-padded borders). Units with S0_i = 0
fall back to the plain mean: δ_i = W_ij·mean(a_j), I = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import GroupStats, Plan, top_k


@dataclass(frozen=True)
class BiasCompensation:
    """Keep the channels whose removal costs most after the optimal bias shift."""

    name: str = "biascomp"
    needs: frozenset[str] = frozenset({"jacobian"})

    def plan(self, group: ChannelGroup, stats: GroupStats, keep: int, *, seed: int = 0) -> Plan:
        scores = sum(channel_importance(*pair) for pair in stats.consumers.values())
        kept = top_k(np.asarray(scores), keep)
        removed = np.setdiff1d(np.arange(group.channels), kept)
        shifts = {
            name: bias_shift(site, weight, removed)
            for name, (site, weight) in stats.consumers.items()
        }
        return Plan(keep=kept, shifts=shifts)


def channel_importance(site, weight: np.ndarray) -> np.ndarray:
    """I_j = Σ_i Σ_features W² (S2 − S1²/S0): the output change left after the best shift."""
    s0 = site.s0[:, None, None]
    live = s0 > 0
    residual = np.where(live, site.s2 - site.s1**2 / np.where(live, s0, 1.0), 0.0)
    return np.sum(weight**2 * np.maximum(residual, 0.0), axis=(0, 2))


def bias_shift(site, weight: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """δ_i = Σ_{j removed} Σ_features W_ij S1_ij / S0_i (plain mean where S0_i = 0)."""
    s0 = site.s0[:, None, None]
    live = s0 > 0
    expected = np.where(live, site.s1 / np.where(live, s0, 1.0), site.mean[None])
    return np.sum((weight * expected)[:, removed], axis=(1, 2))
