"""Keep at least one channel in every TSRA subspace, whatever the method.

A TSRA needs a non-empty U and V (its split must stay inside the channel axis), so a plan that
empties a subspace of its group is not a valid pruning. `SubspaceGuard` wraps any method: when
the plan for `keep` channels leaves a subspace empty, it asks again for one more channel until
every subspace has one, and records the extra channels in the plan's info.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import GroupStats, Method, Plan


def empty_subspace(group: ChannelGroup, keep: np.ndarray) -> bool:
    """True when some subspace of `group` keeps no channel."""
    keep = np.asarray(keep)
    return any(not np.any((keep >= a) & (keep < b)) for a, b in group.ranges)


@dataclass(frozen=True)
class SubspaceGuard:
    """`inner`, re-asked with more channels until every TSRA subspace keeps one."""

    inner: Method

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def needs(self) -> frozenset[str]:
        return self.inner.needs

    def __getattr__(self, attr: str) -> object:
        if attr == "inner":  # not yet set (copy/pickle): do not recurse
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def plan(self, group: ChannelGroup, stats: GroupStats, keep: int, *, seed: int = 0) -> Plan:
        plan = self.inner.plan(group, stats, keep, seed=seed)
        if not group.subspaces:
            return plan
        asked = keep
        while empty_subspace(group, plan.keep) and asked < group.channels:
            asked += 1
            plan = self.inner.plan(group, stats, asked, seed=seed)
        if asked == keep:
            return plan
        return replace(plan, info={**plan.info, "subspace_extra": float(asked - keep)})
