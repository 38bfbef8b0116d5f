"""First-order Taylor channel importance (Molchanov et al., CVPR 2019).

Removing channel j changes the loss by about −Σ_positions a_j·∂L/∂a_j per sample; the importance
is the sum over samples of its square, taken at the taps (where the channel is consumed) and
summed over a coupled group's taps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import Selection
from onnxprune.plan import GroupStats


@dataclass(frozen=True)
class Taylor(Selection):
    """Keep the channels whose removal would change the loss most, to first order."""

    name: str = "taylor"
    needs: frozenset[str] = frozenset({"grad"})

    def scores(self, group: ChannelGroup, stats: GroupStats, *, seed: int = 0) -> np.ndarray:
        """The gradient pass's Σ_samples (Σ_positions a·∂L/∂a)² per channel."""
        return np.asarray(stats.grads["taylor"], dtype=np.float64)
