"""Turn the width options into kept channel counts: a ratio, or a MAC/parameter/latency target.

Before calibration, `choose_widths` resolves ratios and targets by a uniform-ratio search. With
`--global` (any method), `refine_widths` then spends the budget (the channel ratio, or the MAC /
parameter target) greedily across groups by the method's damage estimate per MAC saved. For ID
with a MAC or parameter target, `refine_widths` proposes allocations after calibration (greedy by
the ID error increase per unit of cost saved, with a coupled group's error counted once per tap
or pooled, and the near-uniform one) and keeps the one whose pruned model deviates least from
the original on calibration data: the local error-per-MAC ranking alone misjudged how errors in
residual streams and depthwise stages compound (docs/RESULTS.md, "ID at high reductions").
With `prune_residual` unset (`id`'s default) the candidates with the residual streams pruned
compete too: the streams are pruned where the target needs it, or where that deviates less
than the best allocation with them whole by STREAMS_EVIDENCE standard errors of the per-sample
difference (an allocation that cuts more groups fits more maps to the same samples, so a small
in-sample lead did not hold on held-out data: docs/RESULTS.md, "Residual streams as candidates").
With `cv_widths` the candidates are scored by two-fold cross-validation on the calibration
samples instead (`held_out_deviation`), and the least held-out deviation is chosen, streams or not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.calib.data import Dataset
from onnxprune.calib.row_mask import row_keep
from onnxprune.calib.stats import channel_moments
from onnxprune.config import PruneConfig
from onnxprune.errors import UsageError
from onnxprune.graph.groups import ChannelGroup
from onnxprune.graph.load import export
from onnxprune.graph.rewrite import rewrite
from onnxprune.graph.weights import consumer_input_sizes
from onnxprune.measure.cost import count
from onnxprune.measure.verify import run, run_original
from onnxprune.methods.base import Method
from onnxprune.methods.id import pooled_gram
from onnxprune.methods.linalg import id_error_curve
from onnxprune.methods.planner import make_plans
from onnxprune.methods.targets import (
    WidthCost,
    allocate,
    allocate_by_error,
    ratio_for_target,
    removal_floors,
    score_damage,
    width_cost,
)
from onnxprune.methods.width import group_steps, keep_counts, tied_counts
from onnxprune.plan import GroupStats, Plan
from onnxprune.progress import progress
from onnxprune.recalibrate import recalibrate, reference_tensors
from onnxprune.report import MISS_TOLERANCE, TargetResult

Score = Callable[[Mapping[str, int]], np.ndarray]
STREAMS_EVIDENCE = 2.0  # standard errors by which pruned residual streams must deviate less


@dataclass(frozen=True)
class Widths:
    """Kept channels per selected group, and how they were chosen (for the report): a target's
    outcome, or a note (global ranking). `streams`: the near-uniform widths with the residual
    streams pruned, where `refine_widths` may choose them over `counts` (streams whole)."""

    counts: dict[str, int]
    note: str | None = None
    target: TargetResult | None = None
    streams: dict[str, int] | None = None

    def calibrated(self) -> dict[str, int]:
        """The widths of every group whose statistics the candidates need."""
        return {**(self.streams or {}), **self.counts}


def choose_widths(graph: gs.Graph, groups: tuple[ChannelGroup, ...], config: PruneConfig) -> Widths:
    """Kept counts from the ratio options, or from the near-uniform widths nearest the target
    (at most MISS_TOLERANCE of the original above it). With `prune_residual` None (`id`'s
    default) residual streams stay whole if the target is in reach without them; with a MAC or
    parameter target, the widths with them pruned are kept as a candidate (`Widths.streams`)."""
    kind, target = _target(config)
    if kind is None:
        return Widths(keep_counts(groups, config.width))
    if kind == "latency":
        raw = _latency_measure(graph, groups)
    else:
        cost = cost_of(graph, groups, kind)
        full = cost({})
        raw = lambda counts: cost(counts) / full  # noqa: E731
    measure = lambda counts: raw(tied_counts(groups, counts))  # noqa: E731  as they will be pruned
    search = lambda rule: ratio_for_target(  # noqa: E731
        groups, rule, measure, target, trim=kind != "latency", tolerance=MISS_TOLERANCE
    )
    ratio, counts = search(config.width)
    streams = None
    if config.width.prune_residual is None:
        pruned_ratio, pruned = search(replace(config.width, prune_residual=True))
        if measure(counts) > target + MISS_TOLERANCE:  # out of reach with the streams whole
            ratio, counts = pruned_ratio, pruned
        elif kind != "latency" and not config.global_ranking and set(pruned) != set(counts):
            streams = tied_counts(groups, pruned)
    counts = tied_counts(groups, counts)
    outcome = TargetResult(kind, target, measure(counts), ratio=ratio)
    return replace(_reached(counts, outcome), streams=streams)


def streams_note(groups: tuple[ChannelGroup, ...], widths: Widths, config: PruneConfig) -> tuple:
    """The report line saying that `id`'s default pruned residual streams, and why."""
    if config.width.prune_residual is not None:
        return ()
    if not any(g.coupled and widths.counts.get(g.name, g.channels) < g.channels for g in groups):
        return ()
    why = "they deviated least" if widths.streams else "the target is out of reach with them whole"
    return (f"residual streams pruned: {why} (--no-prune-residual keeps them whole)",)


def refine_widths(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    widths: Widths,
    stats: Mapping[str, GroupStats],
    method: Method,
    config: PruneConfig,
    dataset: Dataset | None = None,
) -> Widths:
    """`--global` (any method: `global_widths`), or for ID with a MAC/parameter target: candidate
    allocations by ID error per cost and the uniform one, the best by measured output deviation
    on `dataset`, held out with `cv_widths` (without `dataset`: the tap-counted error
    allocation)."""
    if config.global_ranking:
        return global_widths(graph, groups, widths, stats, method, config)
    if not config.scores_widths:
        return widths
    kind, target = _target(config)
    channels = {g.name: g.channels for g in groups if g.name in widths.counts}
    cost = cost_of(graph, groups, kind)
    coupled = {g.name for g in groups if g.coupled}
    steps = group_steps(groups, config.width.round_to)
    candidates = _allocations(groups, channels, stats, cost, target, steps, coupled)
    reached = lambda counts: cost(counts) / cost({})  # noqa: E731
    if dataset is None:
        label, counts = next(iter(_feasible(candidates, reached, target).values()))
        return _reached(counts, TargetResult(kind, target, reached(counts), label))
    candidates.setdefault(tuple(sorted(widths.counts.items())), ("near-uniform", widths.counts))
    if widths.streams:
        pruned = {name: g.channels for g in groups if (name := g.name) in widths.streams}
        found = _allocations(groups, pruned, stats, cost, target, steps, coupled)
        found.setdefault(tuple(sorted(widths.streams.items())), ("near-uniform", widths.streams))
        for key, (label, counts) in found.items():
            cut = any(counts.get(name, m) < m for name, m in pruned.items() if name not in channels)
            candidates.setdefault(key, (label + STREAMS_PRUNED if cut else label, counts))
    candidates = _feasible(candidates, reached, target)
    score = (
        held_out_deviation(graph, groups, stats, method, config, dataset)
        if config.cv_widths
        else None
    )
    held_out = score is not None
    if score is None:
        score = output_deviation(graph, groups, stats, method, config, dataset)
    found = progress(candidates.values(), len(candidates), "scoring width candidates")
    per_sample = {label: (score(counts), counts) for label, counts in found}
    deviations = {lab: float(np.sqrt(np.sum(e))) for lab, (e, _) in per_sample.items()}
    deviations = dict(sorted(deviations.items(), key=lambda item: item[1]))
    label = next(iter(deviations))
    whole = [lab for lab in deviations if not lab.endswith(STREAMS_PRUNED)]
    pruned_best = label.endswith(STREAMS_PRUNED) and whole and not held_out
    if pruned_best and not clearly_less(per_sample[label][0], per_sample[whole[0]][0]):
        label = whole[0]
    counts = per_sample[label][1]
    ratio = widths.target.ratio if widths.target and label == "near-uniform" else None
    outcome = TargetResult(kind, target, reached(counts), label, ratio, deviations)
    return replace(_reached(counts, outcome), streams=widths.streams)


STREAMS_PRUNED = ", residual streams pruned"


def clearly_less(errors: np.ndarray, than: np.ndarray, evidence: float = STREAMS_EVIDENCE) -> bool:
    """Whether per-sample errors `errors` are less than `than` on the same samples by more than
    `evidence` standard errors of their mean paired difference."""
    diff = np.asarray(than, dtype=np.float64) - np.asarray(errors, dtype=np.float64)
    if diff.size < 2:
        return False
    return bool(diff.mean() > evidence * diff.std(ddof=1) / np.sqrt(diff.size))


def global_widths(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    widths: Widths,
    stats: Mapping[str, GroupStats],
    method: Method,
    config: PruneConfig,
) -> Widths:
    """`--global`: widths allocated across the selected groups by `damage_curve` per MAC saved,
    until `ratio` of all their channels are removed (or the MAC/parameter target is met), no
    group losing more than `max_group_ratio` of its channels."""
    channels = {g.name: g.channels for g in groups if g.name in widths.counts}
    damage = {name: damage_curve(method, group_of(groups, name), stats[name], config.seed)
              for name in channels}  # fmt: skip
    kind, target = _target(config)
    cost = cost_of(graph, groups, "params" if kind == "params" else "macs")
    full, budget = cost({}), int(np.floor(config.width.ratio * sum(channels.values()) + 1e-9))
    if kind is None:
        done = lambda w: sum(channels[g] - k for g, k in w.items()) >= budget  # noqa: E731
    else:
        done = lambda w: cost(w) <= target * full  # noqa: E731
    floors = removal_floors(channels, config.max_group_ratio)
    counts = tied_counts(
        groups,
        allocate(channels, damage, cost, done, group_steps(groups, config.width.round_to), floors),
    )
    removed, total = sum(channels[g] - k for g, k in counts.items()), sum(channels.values())
    unit = "parameter" if kind == "params" else "MAC"
    note = f"global allocation by {method.name} damage per {unit}: {removed} of {total} channels"
    note += " removed"
    if kind is None:
        return Widths(counts, note)
    return _reached(counts, TargetResult(kind, target, cost(counts) / full, "global"))


def damage_curve(method: Method, group: ChannelGroup, stats: GroupStats, seed: int) -> np.ndarray:
    """What keeping k channels of `group` costs in `method`'s own terms, k = 0..m (0 at k = m).

    ID: its squared relative error (summed over a coupled group's taps), read off one pivoted
    factorisation. Other methods: the removed share of their channel scores (score_damage),
    normalised per group because raw scores are in per-layer units (filter norms grow with the
    fan-in, gradients with the layer's place in the network; METHODS.md, "Global allocation");
    scale-free scores (IPPRO's PROscore) are summed as they are. cob's groups that cannot rotate
    are planned as ID plans them, and take ID's curve.
    """
    if method.name == "id" or (method.name == "cob" and not group.rotatable):
        return _curve(stats) ** 2
    scores = getattr(method, "scores", None)
    if scores is None:
        raise UsageError(f"--global needs per-channel scores; '{method.name}' has none")
    normalise = not getattr(method, "scale_free", False)
    return score_damage(scores(group, stats, seed=seed), normalise=normalise)


def group_of(groups: tuple[ChannelGroup, ...], name: str) -> ChannelGroup:
    """The group called `name`."""
    return next(g for g in groups if g.name == name)


def _reached(counts: dict[str, int], outcome: TargetResult) -> Widths:
    return Widths(counts, outcome.note(), outcome)


def _feasible(candidates: dict, reached: Callable, target: float) -> dict:
    """The candidates that meet the target (up to MISS_TOLERANCE above it), or, if none does,
    those that come closest: a smaller deviation never excuses a missed budget."""
    floor = max(target + MISS_TOLERANCE, min(reached(counts) for _, counts in candidates.values()))
    return {k: v for k, v in candidates.items() if reached(v[1]) <= floor + 1e-9}


def _allocations(
    groups: tuple[ChannelGroup, ...],
    channels: Mapping[str, int],
    stats: Mapping[str, GroupStats],
    cost: WidthCost,
    target: float,
    steps: Mapping[str, int],
    coupled: set[str],
) -> dict[tuple, tuple[str, dict[str, int]]]:
    """Distinct error-per-cost allocations, keyed by their widths: a coupled group's error
    summed over its taps or pooled, and (if that meets the target) residual streams kept whole."""
    found: dict[tuple, tuple[str, dict[str, int]]] = {}
    inner = {name: c for name, c in channels.items() if name not in coupled}
    options = [("by ID error, coupled taps summed", channels, True),
               ("by ID error", channels, False)]  # fmt: skip
    if inner and len(inner) < len(channels):
        options.append(("by ID error, coupled groups kept", inner, True))
    for label, pool, per_tap in options:
        curves = {name: _curve(stats[name], per_tap=per_tap) for name in pool}
        counts = tied_counts(groups, allocate_by_error(pool, curves, cost, target, steps))
        if cost(counts) <= target * cost({}) or pool is channels:
            found.setdefault(tuple(sorted(counts.items())), (label, counts))
    return found


def output_deviation(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    stats: Mapping[str, GroupStats],
    method: Method,
    config: PruneConfig,
    dataset: Dataset,
    samples: int = 256,
) -> Score:
    """Each of the first `samples` calibration samples' squared deviation of all outputs from the
    original's over the original outputs' total squared norm (their sum is the squared relative
    L2 deviation), as a function of the widths (pruned as `prune` will; with `recalibrate`,
    recalibrated on those samples only, to keep the scoring cheap). With `row_mask`, an output
    whose first two axes are the mask's counts only its rows where the mask is nonzero."""
    subset = dataset.head(min(samples, len(dataset)))
    return _deviation(graph, groups, method, config, [(stats, subset, subset)])


def held_out_deviation(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    stats: Mapping[str, GroupStats],
    method: Method,
    config: PruneConfig,
    dataset: Dataset,
    samples: int = 256,
) -> Score | None:
    """As `output_deviation`, but two-fold: the maps fitted on the even calibration samples'
    statistics (`TapStats.folds`; recalibrated on the even ones among the first `samples`) are
    scored on the odd ones among them, and the other way round. A candidate that cuts more
    groups fits more maps to the same samples; scored in-sample it looks better than it is.
    None where a tap has no fold statistics or a fold has fewer than two samples."""
    taps = [tap for s in stats.values() for tap in s.taps.values()]
    subset = dataset.head(min(samples, len(dataset)))
    if not taps or any(len(t.folds) != 2 for t in taps) or len(subset) < 4:
        return None
    parts = [subset.fold(k, 2) for k in (0, 1)]
    fits = [{name: _fold(s, k) for name, s in stats.items()} for k in (0, 1)]
    return _deviation(graph, groups, method, config, [(fits[0], *parts), (fits[1], *parts[::-1])])


def unfolded(stats: Mapping[str, GroupStats]) -> dict[str, GroupStats]:
    """The statistics without their taps' fold statistics (`id` reads folds as --cv-maps)."""
    return {
        name: replace(s, taps={k: replace(t, folds=()) for k, t in s.taps.items()})
        for name, s in stats.items()
    }


def _fold(stats: GroupStats, k: int) -> GroupStats:
    return replace(stats, taps={key: tap.folds[k] for key, tap in stats.taps.items()})


def _deviation(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    method: Method,
    config: PruneConfig,
    splits: list[tuple[Mapping[str, GroupStats], Dataset, Dataset]],
) -> Score:
    """Per-sample squared output deviations over the scored samples' total squared norm, as a
    function of the widths; per split (statistics, samples recalibrated on, samples scored)."""
    original = export(graph)
    parts, norms = [], []
    for stats, fit, scored in splits:
        batches = partial(_feeds, fit, config.batch_size)
        moments = {}  # the original's, at every layer any candidate recalibrates: one pass
        if config.recalibrate:
            moments = channel_moments(original, reference_tensors(graph, groups, stats), batches())
        feeds = scored.arrays
        squares = partial(_masked_squares, feeds=feeds, row_mask=config.row_mask)
        reference = run_original(original, feeds)
        norms.append(sum(float(np.sum(squares(v))) for v in reference.values()))
        parts.append((stats, batches, moments, feeds, len(scored), squares, reference))
    total = max(sum(norms), 1e-30)

    def score(counts: Mapping[str, int]) -> np.ndarray:
        errors = []
        for stats, batches, moments, feeds, n, squares, reference in parts:
            plans = make_plans(groups, counts, stats, method, config)
            pruned = rewrite(graph, groups, plans, exact_borders=config.exact_borders)
            if config.recalibrate:
                pruned, _ = recalibrate(
                    lambda: original, pruned, groups, plans, batches, reference=moments
                )
            got = run(export(pruned), feeds)
            errors.append(sum(_per_sample(squares(got[k] - v), n) for k, v in reference.items()))
        return np.concatenate(errors) / total

    return score


def _feeds(dataset: Dataset, batch_size: int):
    return (b.feeds for b in dataset.batches(batch_size))


def _masked_squares(
    value: np.ndarray, feeds: Mapping[str, np.ndarray], row_mask: str | None
) -> np.ndarray:
    """`value`'s squares in float64, zero on the rows `row_mask` leaves out
    (`calib.row_mask.row_keep`)."""
    squares = value.astype(np.float64) ** 2
    if squares.ndim < 2:
        return squares
    keep = row_keep(squares.reshape(*squares.shape[:2], -1), feeds, row_mask)
    if keep is None:
        return squares
    return squares * keep.reshape(*squares.shape[:2], *(1,) * (squares.ndim - 2))


def _per_sample(squares: np.ndarray, n: int) -> np.ndarray:
    """Sums of `squares` per sample (axis 0), or spread evenly where axis 0 is not the batch."""
    if squares.ndim and squares.shape[0] == n:
        return squares.reshape(n, -1).sum(axis=1)
    return np.full(n, squares.sum() / n)


def cost_of(graph: gs.Graph, groups: tuple[ChannelGroup, ...], kind: str) -> WidthCost:
    """MACs or parameters as a function of the group widths."""
    per_node = count(export(graph)).per_node
    node_cost = {n.name: float(n.macs if kind == "macs" else n.params) for n in per_node}
    return width_cost(groups, node_cost, consumer_input_sizes(graph, groups))


def _target(config: PruneConfig) -> tuple[str | None, float]:
    for name, value in config.targets().items():
        if value is not None:
            return name.removeprefix("target_"), value
    return None, 1.0


def _curve(stats: GroupStats, *, per_tap: bool = True) -> np.ndarray:
    """The group's relative ID error by width. A coupled group's pooled curve is the mean of
    its taps' relative errors²; with `per_tap` it is their sum, since every tap carries it."""
    taps = list(stats.taps.values())
    if len(taps) == 1:
        return id_error_curve(taps[0].gram)
    curve = id_error_curve(pooled_gram(taps))
    return curve * np.sqrt(len(taps)) if per_tap else curve


def _latency_measure(graph: gs.Graph, groups: tuple[ChannelGroup, ...]):
    """Measured median latency (batch 1) of the structure-pruned model over the original's."""
    from onnxprune.measure.latency import benchmark

    original = export(graph)
    cache: dict[tuple, float] = {}

    def measure(counts: Mapping[str, int]) -> float:
        key = tuple(sorted(counts.items()))
        if key not in cache:
            plans = {name: Plan(keep=np.arange(k)) for name, k in counts.items()}
            pruned = export(rewrite(graph, groups, plans))
            rows = benchmark([original, pruned], batches=(1,), repeats=30, min_time=0.5).rows
            cache[key] = rows[1].median_ms / rows[0].median_ms
        return cache[key]

    return measure
