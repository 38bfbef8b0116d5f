"""FPGM (He et al., CVPR 2019): prune the filters nearest the geometric median of their layer.

Such filters are the most replaceable by the others. A channel's score is the sum of Euclidean
distances from its filter to all other filters; coupled groups concatenate their producers'
filters so one distance covers every weight that writes the channel. Data-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import Selection
from onnxprune.plan import GroupStats


@dataclass(frozen=True)
class FPGM(Selection):
    """Keep the channels whose filters are farthest, in total, from the others."""

    name: str = "fpgm"
    needs: frozenset[str] = frozenset({"weights"})

    def scores(self, group: ChannelGroup, stats: GroupStats, *, seed: int = 0) -> np.ndarray:
        """Each filter's summed distance to the others."""
        from scipy.spatial.distance import cdist  # lazy: scipy.spatial slows every CLI start

        filters = np.concatenate([np.asarray(w, np.float64) for w in stats.weights], axis=1)
        return cdist(filters, filters).sum(axis=1)
