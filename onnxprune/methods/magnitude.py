"""Data-free selection: filter norms (magnitude) and a seeded random baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import selection_plan
from onnxprune.plan import GroupStats, Plan


@dataclass(frozen=True)
class Magnitude:
    """Keep the channels whose producer filters have the largest L1 or L2 norm.

    Coupled groups sum the per-producer norms, so a channel is judged by all filters that write it.
    """

    norm: int = 1
    name: str = "magnitude"
    needs: frozenset[str] = frozenset({"weights"})

    def plan(self, group: ChannelGroup, stats: GroupStats, keep: int, *, seed: int = 0) -> Plan:
        scores = sum(np.linalg.norm(w, ord=self.norm, axis=1) for w in stats.weights)
        return selection_plan(np.asarray(scores), keep)


@dataclass(frozen=True)
class Random:
    """Keep a seeded random subset: the floor every method must beat."""

    name: str = "random"
    needs: frozenset[str] = frozenset()

    def plan(self, group: ChannelGroup, stats: GroupStats, keep: int, *, seed: int = 0) -> Plan:
        salt = sum(group.name.encode())
        rng = np.random.default_rng([seed, salt])
        return selection_plan(rng.random(group.channels), keep)
