"""Elimination–compensation (Ballini et al., 2026), per channel: importance after the optimal
shift of the adjacent bias (METHODS.md §2.4, our derivation; the paper is per weight).

Removing input channel j of a consumer and shifting its bias b_i by δ_i changes output unit i by
g_i(δ_i − W_ij a_j). With the Jacobian-weighted sums S0, S1, S2 of calib/jacobian.py:

    δ_i = Σ_j W_ij S1_ij / S0_i        I_j = Σ_i W_ij² (S2_ij − S1_ij² / S0_i)

summed over every consumer of the group and every feature of the channel (Flatten→Gemm), with
conv kernels summed over their taps (exact away from zero-padded borders). Units with S0_i = 0
fall back to the plain mean: δ_i = W_ij·mean(a_j), I = 0. The per-weight closed forms live in
methods/sparse.py; this module sums them over each removed channel's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import top_k
from onnxprune.methods.sparse import importance, independent_shift, joint_shift
from onnxprune.plan import GroupStats, Plan


@dataclass(frozen=True)
class BiasCompensation:
    """Keep the channels whose removal costs most after the optimal bias shift.

    With `joint`, the shifts of each consumer's biases solve M δ = c exactly (METHODS.md §2.4)
    instead of summing the per-unit (diagonal) optima; the selection is the same.
    """

    name: str = "biascomp"
    needs: frozenset[str] = frozenset({"jacobian"})
    joint: bool = False

    def plan(self, group: ChannelGroup, stats: GroupStats, keep: int, *, seed: int = 0) -> Plan:
        kept = top_k(self.scores(group, stats, seed=seed), keep)
        removed = np.setdiff1d(np.arange(group.channels), kept)
        shifts = {
            name: bias_shift(site, weight, removed, joint=self.joint)
            for name, (site, weight) in stats.consumers.items()
        }
        return Plan(keep=kept, shifts=shifts)

    def scores(self, group: ChannelGroup, stats: GroupStats, *, seed: int = 0) -> np.ndarray:
        """The output change each channel's removal leaves after its bias shift, summed over
        the consumers."""
        return np.asarray(sum(channel_importance(*pair) for pair in stats.consumers.values()))


def channel_importance(site, weight: np.ndarray) -> np.ndarray:
    """I_j = Σ_i Σ_features W² (S2 − S1²/S0): the output change left after the best shift."""
    return importance(weight, site).sum(axis=(0, 2))


def bias_shift(site, weight: np.ndarray, removed: np.ndarray, *, joint: bool = False) -> np.ndarray:
    """δ_i = Σ_{j removed} Σ_features W_ij S1_ij / S0_i (plain mean where S0_i = 0), or with
    `joint` the solution of M δ = c for the removed channels together."""
    mask = np.zeros(weight.shape, dtype=bool)
    mask[:, np.asarray(removed, dtype=int)] = True
    return (joint_shift if joint else independent_shift)(weight, site, mask)
