"""The interface every method implements, and helpers for selection-only plans.

A method reads a ChannelGroup and its GroupStats and returns a Plan (onnxprune/plan.py: keep
channels `keep`, replace each tap activation by a ≈ Mᵀ a_S + c, DESIGN.md §3; a CoB plan also
rotates the producers first). Methods never touch ONNX protos.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.plan import GroupStats, Plan


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


class Selection:
    """Base of the selection-only methods: `plan` keeps the channels their `scores` rank
    highest, so each such method states only how it scores."""

    def scores(self, group: ChannelGroup, stats: GroupStats, *, seed: int = 0) -> np.ndarray:
        """One score per channel of `group`, higher kept first."""
        raise NotImplementedError

    def plan(self, group: ChannelGroup, stats: GroupStats, keep: int, *, seed: int = 0) -> Plan:
        """Keep the `keep` best-scoring channels, with no correction."""
        return selection_plan(self.scores(group, stats, seed=seed), keep)
