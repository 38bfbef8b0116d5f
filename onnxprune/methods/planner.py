"""The plan stage: ask the method for each group's plan, then add compensation and error numbers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from onnxprune.config import PruneConfig
from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import GroupStats, Method, Plan
from onnxprune.methods.id import lsq_corrections, mean_shift_corrections, pooled_gram
from onnxprune.methods.linalg import (
    optimal_rank_error,
    rank_for_error,
    reconstruction_error,
    selection_map,
)
from onnxprune.methods.width import rounding_step, tied_counts


def make_plans(
    groups: tuple[ChannelGroup, ...],
    counts: Mapping[str, int],
    stats: Mapping[str, GroupStats],
    method: Method,
    config: PruneConfig,
) -> dict[str, Plan]:
    """One Plan per selected group."""
    keeps = {}
    for group in groups:
        if group.name in counts:
            keeps[group.name] = counts[group.name]
            if config.epsilon is not None and stats[group.name].taps:
                keeps[group.name] = epsilon_width(group, stats[group.name], config)
    keeps = tied_counts(groups, keeps)
    plans = {}
    for group in groups:
        if group.name not in keeps:
            continue
        group_stats = stats[group.name]
        plan = method.plan(group, group_stats, keeps[group.name], seed=config.seed)
        if method.name != "id" and config.compensate != "none":
            plan = compensate(plan, group_stats, config.compensate)
        plans[group.name] = with_errors(plan, group, group_stats)
    return plans


def compensate(plan: Plan, stats: GroupStats, mode: str) -> Plan:
    """Keep the method's selection; add the mean shift ("bias") or least-squares map ("lsq")."""
    if mode == "bias":
        return replace(plan, corrections=mean_shift_corrections(stats, plan.keep))
    return replace(plan, corrections=lsq_corrections(stats, plan.keep, intercept=True))


def epsilon_width(group: ChannelGroup, stats: GroupStats, config: PruneConfig) -> int:
    """Smallest width whose ID error is ≤ ε (rounded up to the rounding multiple)."""
    taps = list(stats.taps.values())
    gram = taps[0].gram if len(taps) == 1 else pooled_gram(taps)
    keep = max(1, rank_for_error(gram, config.epsilon))
    step = rounding_step(group.channels, config.width.round_to)
    return min(group.channels, -(-keep // step) * step)


def with_errors(plan: Plan, group: ChannelGroup, stats: GroupStats) -> Plan:
    """Add the relative reconstruction error at the taps and its ratio to the rank-k optimum."""
    if not stats.taps:
        return plan
    errors, optimal = [], []
    for tensor, tap in stats.taps.items():
        correction = plan.corrections.get(tensor)
        M = selection_map(group.channels, plan.keep) if correction is None else correction.M
        c = None if correction is None else correction.c
        keep = plan.keep
        if plan.rotation is not None:  # a ≈ Mᵀ (Q a)_S + c: the map from a itself is Q_Sᵀ M
            M, keep = np.asarray(plan.rotation)[np.asarray(keep)].T @ M, np.arange(group.channels)
        errors.append(reconstruction_error(tap.gram, tap.mean, tap.n, keep, M, c))
        optimal.append(optimal_rank_error(tap.gram, len(plan.keep)))
    err, opt = float(np.max(errors)), float(np.max(optimal))
    info = {**plan.info, "err": err}
    if opt > 1e-6:
        info["err/opt"] = err / opt
    return replace(plan, info=info)
