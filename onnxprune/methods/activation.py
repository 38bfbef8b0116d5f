"""Activation-based selection: keep the channels with the largest mean |a| at the taps.

Data-only (no gradients). Coupled groups average the taps after scaling each to unit total, so a
tap with large activations does not dominate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import Selection
from onnxprune.plan import GroupStats


@dataclass(frozen=True)
class Activation(Selection):
    """Keep the channels with the largest mean absolute activation."""

    name: str = "activation"
    needs: frozenset[str] = frozenset({"gram"})

    def scores(self, group: ChannelGroup, stats: GroupStats, *, seed: int = 0) -> np.ndarray:
        """Mean |a| per channel, each tap scaled to unit total, summed over the taps."""
        return np.asarray(sum(_unit(tap.abs_sum / max(tap.n, 1)) for tap in stats.taps.values()))


def _unit(values: np.ndarray) -> np.ndarray:
    total = float(values.sum())
    return values / total if total > 0 else values
