"""Keep at least one channel in every TSRA subspace, whatever the method.

A TSRA needs a non-empty U and V (its split must stay inside the channel axis), so a plan that
empties a subspace of its group is not a valid pruning. `SubspaceGuard` wraps any method: when
the plan for `keep` channels leaves a subspace empty, it asks again with more channels until each
empty subspace receives its best channel. The width is then kept: the method's best `keep − e`
channels plus those e, with the least-squares map for that selection where the method folds a
map (id: its interpolation matrix is that map; with an intercept when the method had one).
Plans that cannot be spliced (per-unit bias shifts, rotations) use the larger plan and record
the extra channels in their info.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import Method
from onnxprune.methods.id import lsq_corrections
from onnxprune.plan import GroupStats, Plan


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
        if not group.subspaces or not empty_subspace(group, plan.keep):
            return plan
        empty = [r for r in group.ranges if not _inside(plan.keep, r).size]
        found: dict[tuple[int, int], int] = {}
        asked, grown = keep, plan
        while len(found) < len(empty) and asked < group.channels:
            asked += 1
            grown = self.inner.plan(group, stats, asked, seed=seed)
            for r in empty:
                if r not in found and _inside(grown.keep, r).size:
                    found[r] = int(_inside(grown.keep, r)[0])
        spliced = _splice(self.inner, group, stats, keep, seed, plan, list(found.values()))
        if spliced is not None:
            return spliced
        return replace(grown, info={**grown.info, "subspace_extra": float(asked - keep)})


def _inside(keep: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    keep = np.asarray(keep)
    return keep[(keep >= span[0]) & (keep < span[1])]


def _splice(
    inner: Method,
    group: ChannelGroup,
    stats: GroupStats,
    keep: int,
    seed: int,
    plan: Plan,
    extra: list[int],
) -> Plan | None:
    """The best `keep − len(extra)` channels plus `extra` (and their least-squares map)."""
    if plan.shifts or plan.rotation is not None or keep <= len(extra):
        return None
    base = inner.plan(group, stats, keep - len(extra), seed=seed)
    if base.shifts or set(extra) & set(np.asarray(base.keep).tolist()):
        return None
    chosen = np.sort(np.concatenate([np.asarray(base.keep), np.asarray(extra, dtype=np.intp)]))
    corrections = {}
    if plan.corrections:
        intercept = any(c.c is not None for c in plan.corrections.values())
        corrections = lsq_corrections(stats, chosen, intercept)
    info = {**base.info, "subspace_swap": float(len(extra))}
    return replace(base, keep=chosen, corrections=corrections, info=info)
