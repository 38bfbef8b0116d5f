"""The plan stage: ask the method for each group's plan, then add compensation and error numbers."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial

import numpy as np

from onnxprune.config import PruneConfig
from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import Method
from onnxprune.methods.heads import head_features
from onnxprune.methods.id import lsq_corrections, mean_shift_corrections, pooled_gram
from onnxprune.methods.linalg import (
    id_error_curve,
    optimal_rank_error,
    reconstruction_error,
    selection_map,
)
from onnxprune.methods.width import rounding_step, tied_counts
from onnxprune.plan import Correction, GroupStats, Plan, TapStats
from onnxprune.threads import thread_map


def make_plans(
    groups: tuple[ChannelGroup, ...],
    counts: Mapping[str, int],
    stats: Mapping[str, GroupStats],
    method: Method,
    config: PruneConfig,
) -> dict[str, Plan]:
    """One Plan per selected group, the groups planned side by side in threads (`thread_map`),
    as many at once as keep their Grams under PARALLEL_GRAM_BYTES together (each group holds
    several copies of its Gram while planned); a group whose Gram alone exceeds it is planned
    by itself after the others."""

    def plan_one(group: ChannelGroup) -> Plan:
        group_stats = stats[group.name]
        planned = partial(_planned, method, group, group_stats, config)
        if config.epsilon is not None and group_stats.taps:
            plan = plan_for_error(group, group_stats, config, planned)
        else:
            plan = planned(counts[group.name])
        return _finished(plan, group, group_stats, method)

    selected = [g for g in groups if g.name in counts]
    size = {g.name: _gram_bytes(stats[g.name]) for g in selected}
    wide = [g for g in selected if size[g.name] > PARALLEL_GRAM_BYTES]
    narrow = [g for g in selected if size[g.name] <= PARALLEL_GRAM_BYTES]
    largest = max((size[g.name] for g in narrow), default=0)
    most = max(1, PARALLEL_GRAM_BYTES // max(largest, 1))
    done = dict(zip((g.name for g in narrow), thread_map(plan_one, narrow, most=most), strict=True))
    done.update((g.name, plan_one(g)) for g in wide)
    plans = {g.name: done[g.name] for g in selected}
    return plans if config.epsilon is None else _widen_tied(groups, stats, method, config, plans)


PARALLEL_GRAM_BYTES = 256 << 20  # a 5792-channel float64 Gram


def _gram_bytes(stats: GroupStats) -> int:
    """The largest Gram in a group's statistics (0 without data)."""
    taps = [*stats.taps.values(), *stats.features.values()]
    return max((tap.gram.nbytes for tap in taps), default=0)


def _finished(plan: Plan, group: ChannelGroup, stats: GroupStats, method: Method) -> Plan:
    """The plan with its error numbers and the RMSNorm divisor correction, except for the
    groups cob rotates (it corrects the divisor there itself, with --rms-correction)."""
    plan = with_errors(plan, group, stats)
    if method.name != "cob" or plan.info.get("rotated") == 0.0:
        plan = divisor_corrected(plan, group, stats)
    return plan


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
            plans[group.name] = _finished(plan, group, stats[group.name], method)
    return plans


def compensate(plan: Plan, stats: GroupStats, mode: str) -> Plan:
    """Keep the method's selection; add the mean shift ("bias") or least-squares map ("lsq")."""
    if mode == "bias":
        return replace(plan, corrections=mean_shift_corrections(stats, plan.keep))
    return replace(plan, corrections=lsq_corrections(stats, plan.keep, intercept=True))


def plan_for_error(
    group: ChannelGroup, stats: GroupStats, config: PruneConfig, planned: Callable[[int], Plan]
) -> Plan:
    """The plan at the narrowest allowed width whose error is ≤ ε at every tap.

    The bound is the max over taps, the number the report shows: each tap's own relative error
    ‖Z_t − (Z_t,S M_t + 1c_tᵀ)‖_F ≤ ε ‖Z_t‖_F, so no consumer of a coupled group reads a worse
    reconstruction than ε (a pooled norm, the mean of the taps' squared errors, let single taps
    exceed it). Widths are multiples of the rounding step (and the full width); the search
    bisects on them, which finds the narrowest when the error falls with the width (ID's nested
    pivots with a least-squares map per tap) and always returns a width that meets ε. It first
    probes the width the pooled ID error curve suggests and the one below (two plans when the
    guess is right, as for a single tap).
    """
    step = rounding_step(group.channels, config.width.round_to, group.unit)
    widths = sorted({*range(step, group.channels, step), group.channels})
    guess = int(bisect_left(widths, _curve_width(stats, config.epsilon)))
    lo, hi, best, probes = 0, len(widths) - 1, None, [guess, guess - 1]
    while lo < hi:
        mid = probes.pop(0) if probes else (lo + hi) // 2
        if not lo <= mid < hi:
            continue
        plan = planned(widths[mid])
        if max(tap_errors(plan, group, stats)) <= config.epsilon:
            hi, best = mid, plan
        else:
            lo = mid + 1
    return best if best is not None else planned(widths[hi])


def _curve_width(stats: GroupStats, epsilon: float) -> int:
    """The first width whose ID error on the (pooled, unit-trace) Gram is ≤ ε: a guess."""
    taps = list(stats.taps.values())
    curve = id_error_curve(taps[0].gram if len(taps) == 1 else pooled_gram(taps))
    return int(np.argmax(curve <= epsilon))


def tap_errors(plan: Plan, group: ChannelGroup, stats: GroupStats) -> list[float]:
    """Each tap's relative reconstruction error under `plan` (from its Gram, mean and count)."""
    errors = []
    for key, tap in stats.taps.items():
        correction = plan.corrections.get(key)
        M = selection_map(group.channels, plan.keep) if correction is None else correction.M
        c = None if correction is None else correction.c
        tap, keep = _feature_level(group, stats, key, tap, plan.keep, M)
        if plan.rotation is not None:  # a ≈ Mᵀ (Q a)_S + c: the map from a itself is Q_Sᵀ M
            M, keep = np.asarray(plan.rotation)[np.asarray(keep)].T @ M, np.arange(group.channels)
        errors.append(reconstruction_error(tap.gram, tap.mean, tap.n, keep, M, c))
    return errors


def _feature_level(
    group: ChannelGroup,
    stats: GroupStats,
    key: str,
    tap: TapStats,
    keep: np.ndarray,
    M: np.ndarray | None,
) -> tuple[TapStats, np.ndarray]:
    """The tap statistics and kept indices a correction M is stated in: a head group's map
    from every kept feature (methods/heads.py) is judged on the features, any other on the
    channels."""
    if M is None or group.head_dim == 1 or np.shape(M)[1] == group.channels:
        return tap, keep
    return stats.features[key], head_features(keep, group.feature_dim)


def with_errors(plan: Plan, group: ChannelGroup, stats: GroupStats) -> Plan:
    """Add the relative reconstruction error at the taps and its ratio to the rank-k optimum
    (not for taps wider than BOUND_MAX_CHANNELS)."""
    if not stats.taps:
        return plan
    errors = tap_errors(plan, group, stats)
    optimal = []
    for key, tap in stats.taps.items():
        correction = plan.corrections.get(key)
        M = None if correction is None else correction.M
        tap, keep = _feature_level(group, stats, key, tap, plan.keep, M)
        if tap.gram.shape[0] > BOUND_MAX_CHANNELS:
            optimal = []
            break
        optimal.append(optimal_rank_error(tap.gram, len(keep)))
    info = {**plan.info, "err": float(np.max(errors))}
    opt = float(np.max(optimal)) if optimal else 0.0
    if opt > 1e-6:
        info["err/opt"] = info["err"] / opt
    return replace(plan, info=info)


# The optimum needs every eigenvalue of the tap's Gram: O(width³), 2.5 s at 3072 channels on one
# core, more than the plan itself (ViT-B/16's twelve FFN groups: 36 s of CPU for the report).
BOUND_MAX_CHANNELS = 1024


def divisor_corrected(plan: Plan, group: ChannelGroup, stats: GroupStats) -> Plan:
    """Scale the correction at every tap behind an RMSNorm by s = √(C·E_S / (k·E)).

    RMSNorm divides by √(Σ x²/C); pruned to k channels S it divides by √(Σ_S x²/k). Its output
    y has Σ y² = C per sample, so the kept outputs come out divided by s_n = √(Σ_S y_n² / k).
    s is the root mean square of s_n: E_S and E are the energies (Gram diagonal) of the norm's
    output over S and over all channels (cob's --rms-correction factor, which reads the tap's
    energies instead). Exact when the removed channels are zero at the norm (s = √(C/k)); on
    average where their share of the energy varies per sample. Only taps that the norm reaches
    through ops that scale with their input (ReLU, a gain, pooling, flatten) are marked
    (graph/analyze.py): behind TSRA, whose gain depends on the channels kept, the factor at the
    tap differs (on the TSRA-VGG's last block 1.06 at the tap for 1.10 at the norm).
    The errors in `plan.info` stay those of the unscaled map (they compare with the old tap).
    Without statistics (data-free) every channel is taken to carry equal energy: s = 1.
    """
    keep = np.asarray(plan.keep)
    corrections, scales = dict(plan.corrections), []
    for key, _ in group.normalized:
        norm = stats.norms.get(key)
        energy = None if norm is None else np.clip(np.diag(norm.gram), 0.0, None)
        if energy is None or keep.size == group.channels or energy[keep].sum() <= 0:
            continue
        scale = float(np.sqrt(group.channels * energy[keep].sum() / (keep.size * energy.sum())))
        old = corrections.get(key)
        M = selection_map(group.channels, keep) if old is None else np.asarray(old.M)
        corrections[key] = Correction(M * scale, None if old is None else old.c)
        scales.append(scale)
    if not scales:
        return plan
    return replace(plan, corrections=corrections, info={**plan.info, "rms_scale": max(scales)})


def _planned(
    method: Method, group: ChannelGroup, stats: GroupStats, config: PruneConfig, keep: int
) -> Plan:
    """The method's plan at width `keep`, with the configured compensation added."""
    plan = method.plan(group, stats, keep, seed=config.seed)
    if method.name != "id" and config.compensate != "none":
        plan = compensate(plan, stats, config.compensate)
    return plan
