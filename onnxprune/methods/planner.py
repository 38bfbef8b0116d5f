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
    plans = {}
    for group in groups:
        if group.name not in counts:
            continue
        group_stats = stats[group.name]
        keep = counts[group.name]
        if config.epsilon is not None and group_stats.taps:
            keep = epsilon_width(group, group_stats, config)
        plan = _planned(method, group, group_stats, config, keep)
        plans[group.name] = with_errors(plan, group, group_stats)
    return plans if config.epsilon is None else _widen_tied(groups, stats, method, config, plans)


def _widen_tied(
    groups: tuple[ChannelGroup, ...],
    stats: Mapping[str, GroupStats],
    method: Method,
    config: PruneConfig,
    plans: dict[str, Plan],
) -> dict[str, Plan]:
    """Under --epsilon each group picks its own width; the conv groups of one grouped Conv are
    planned again at the widest of theirs, so each still meets ε and `group` stays valid."""
    widths = tied_counts(groups, {name: len(p.keep) for name, p in plans.items()}, widest=True)
    for group in (g for g in groups if g.name in plans):
        width = widths.get(group.name, group.channels)  # absent: a tied group was left alone
        if width != len(plans[group.name].keep):
            plan = _planned(method, group, stats[group.name], config, width)
            plans[group.name] = with_errors(plan, group, stats[group.name])
    return plans


def _planned(
    method: Method, group: ChannelGroup, stats: GroupStats, config: PruneConfig, keep: int
) -> Plan:
    """The method's plan at width `keep`, with the configured compensation added."""
    plan = method.plan(group, stats, keep, seed=config.seed)
    if method.name != "id" and config.compensate != "none":
        plan = compensate(plan, stats, config.compensate)
    return plan


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
