"""Widths from a target instead of a ratio: MACs, parameters, or measured latency.

`WidthCost` is the cost of every Conv/Gemm/MatMul node as an exact function of the group widths
(a node's work scales with its kept outputs and its kept inputs), so a search needs no rewriting.
A uniform ratio is found by bisection; for ID, `allocate_by_error` spends the budget greedily
where the ID error grows least per MAC saved (the idea of the authors' IDiter).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.width import group_steps, keep_counts
from onnxprune.options import WidthRule

Steps = Mapping[str, int]  # group name → its rounding step (width.group_steps)


@dataclass(frozen=True)
class _Term:
    base: float
    out: tuple[tuple[str, int], ...]  # (group, channels) parts of the outputs that may shrink
    out_total: int  # all output channels (parts cut off by a Split may be in other groups)
    inputs: tuple[tuple[str, int, int], ...]  # (group, channels, spatial) read through weights
    in_total: int
    chan: tuple[str, int] | None  # a depthwise conv (or attention MatMul) passing a group through


@dataclass(frozen=True)
class WidthCost:
    """Cost (MACs or parameters) of the model as a function of the kept width of each group."""

    fixed: float
    terms: tuple[_Term, ...]

    def __call__(self, widths: Mapping[str, int]) -> float:
        total = self.fixed
        for term in self.terms:
            factor = 1.0
            if term.out:
                removed = sum(c - widths.get(g, c) for g, c in term.out)
                factor *= (term.out_total - removed) / term.out_total
            if term.chan is not None:
                factor *= widths.get(term.chan[0], term.chan[1]) / term.chan[1]
            if term.inputs:
                removed = sum((c - widths.get(g, c)) * sp for g, c, sp in term.inputs)
                factor *= (term.in_total - removed) / term.in_total
            total += term.base * factor
        return total


def width_cost(
    groups: Sequence[ChannelGroup], node_cost: Mapping[str, float], in_sizes: Mapping[str, int]
) -> WidthCost:
    """Build the cost function from per-node costs and each consumer's input-channel total."""
    touched: dict[str, dict] = {}
    out_total: dict[str, int] = {}
    for group in groups:
        for edit in group.edits:
            if (edit.role == "out" and edit.input == 1) or edit.role == "hidden":
                out_total[edit.node] = out_total.get(edit.node, 0) + group.channels
    for group in (g for g in groups if g.prunable):
        for edit in group.edits:
            entry = touched.setdefault(edit.node, {"out": [], "chan": None, "inputs": []})
            if edit.role == "out" and edit.input == 1:
                entry["out"].append((group.name, group.channels))
            elif edit.role == "chan" and edit.input == 1:
                entry["chan"] = (group.name, group.channels)
            elif edit.role == "in":
                entry["inputs"].append((group.name, group.channels, edit.spatial))
            elif edit.role == "hidden":  # G·H' rows × (In' + H') columns per direction
                entry["out"].append((group.name, group.channels))
                directions = out_total[edit.node] // group.channels
                entry["inputs"].append((group.name, group.channels, 1 / directions))
        if group.heads:  # q·kᵀ and attention·v batch over the heads: both shrink
            for name in group.passthrough:
                entry = touched.setdefault(name, {"out": [], "chan": None, "inputs": []})
                entry["chan"] = (group.name, group.channels)
    terms, fixed = [], 0.0
    for node, cost in node_cost.items():
        entry = touched.get(node)
        if entry is None:
            fixed += cost
            continue
        outs = tuple(entry["out"])
        terms.append(
            _Term(
                cost,
                outs,
                out_total.get(node, 1),
                tuple(entry["inputs"]),
                in_sizes.get(node, 1),
                entry["chan"],
            )
        )
    return WidthCost(fixed, tuple(terms))


def ratio_for_target(
    groups: Sequence[ChannelGroup],
    rule: WidthRule,
    measure: Callable[[Mapping[str, int]], float],
    target: float,
    *,
    trim: bool = True,
    tolerance: float = 0.0,
) -> tuple[float, dict[str, int]]:
    """The uniform ratio whose widths bring `measure` (a fraction of the original) nearest to
    `target`, never more than `tolerance` above it.

    Bisection on the ratio. A uniform ratio moves every group at once, so its cost jumps in
    steps of a few percent on small models (more with rounding); with `trim` (for cheap, exact
    measures) the widths just above the target are then narrowed one step at a time in the group
    that keeps the largest fraction until within the tolerance (`_narrow`), and single steps
    that land nearer the target are taken after (`_closest`): the result stays near-uniform
    and lands nearest the target on either side, instead of always below it.
    """
    lo, hi = 0.0, 0.999
    steps = group_steps(groups, rule.round_to)
    below: tuple[float, float, dict[str, int]] | None = None
    above: tuple[float, float, dict[str, int]] | None = None
    for _ in range(30):
        mid = (lo + hi) / 2
        counts = keep_counts(groups, replace(rule, ratio=mid))
        value = measure(counts)
        if value > target:
            lo = mid
            if above is None or value < above[0]:
                above = (value, mid, counts)
        else:
            hi = mid
            if below is None or value > below[0]:
                below = (value, mid, counts)
    candidates = [c for c in (below, above) if c is not None]
    if trim and above is not None:
        channels = {g.name: g.channels for g in groups if g.name in above[2]}
        counts = _narrow(dict(above[2]), channels, measure, target + tolerance, steps)
        candidates.append((measure(counts), above[1], counts))
    found = [c for c in candidates if c[0] <= target + tolerance]
    if not found:  # the target cannot be met: come as close as the widths allow
        best = min(candidates, key=lambda c: c[0])
        return best[1], best[2]
    best = min(found, key=lambda c: (abs(c[0] - target), c[0]))
    if not trim:
        return best[1], best[2]
    channels = {g.name: g.channels for g in groups if g.name in best[2]}
    return best[1], _closest(
        dict(best[2]), channels, measure, target, steps=steps, tolerance=tolerance
    )


def _narrow(
    counts: dict[str, int], channels: Mapping[str, int], measure, bound: float, steps: Steps
) -> dict[str, int]:
    """Narrow the group that keeps the largest fraction one step at a time until `measure`
    is at most `bound` (or nothing can narrow)."""
    while measure(counts) > bound:
        options = [(k / channels[g], g) for g, k in counts.items() if _step_down(k, steps[g])]
        if not options:
            break
        _, group = max(options)
        counts[group] = _step_down(counts[group], steps[group])
    return counts


def _closest(
    counts: dict[str, int],
    channels: Mapping[str, int],
    measure,
    target: float,
    *,
    steps: Steps,
    tolerance: float,
) -> dict[str, int]:
    """Move one group one rounding step narrower or wider while that brings `measure` nearer
    `target` without passing `target` + `tolerance`: the near-uniform widths, polished so that
    no single step lands nearer."""
    gap = lambda c: abs(measure(c) - target)  # noqa: E731
    while True:
        moves = []
        for group, k in counts.items():
            for new in (
                _step_down(k, steps[group]),
                _step_up(k, channels[group], steps[group]),
            ):
                if new > 0 and new != k:
                    moves.append({**counts, group: new})
        better = [
            c for c in moves if measure(c) <= target + tolerance and gap(c) < gap(counts) - 1e-12
        ]
        if not better:
            return counts
        counts = min(better, key=gap)


def _step_up(k: int, channels: int, step: int) -> int:
    """The next wider width allowed by the group's rounding `step` (the full width at most)."""
    return min(channels, k + step - k % step)


def _step_down(k: int, step: int) -> int:
    """The next narrower width allowed by the group's rounding `step` (0 when none is)."""
    new = k - step if k % step == 0 else k - k % step
    return new if new >= step else 0


def allocate_by_error(
    channels: Mapping[str, int],
    curves: Mapping[str, np.ndarray],
    cost: WidthCost,
    target: float,
    steps: Steps,
) -> dict[str, int]:
    """Greedy widths: shrink the group whose squared ID error grows least per unit cost saved.

    `curves[g][k]` is group g's relative ID error at width k (methods/linalg.id_error_curve);
    `target` is the fraction of the full cost to keep. `steps[g]`: group g's rounding step
    (width.group_steps); every group keeps at least one channel.
    """
    full = cost(dict(channels))
    damage = {name: np.asarray(curve) ** 2 for name, curve in curves.items()}
    floors = dict.fromkeys(channels, 1)
    return allocate(channels, damage, cost, lambda w: cost(w) <= target * full, steps, floors)


def allocate(
    channels: Mapping[str, int],
    damage: Mapping[str, np.ndarray],
    cost: WidthCost,
    done: Callable[[Mapping[str, int]], bool],
    steps: Steps,
    floors: Mapping[str, int],
) -> dict[str, int]:
    """Greedy widths: until `done(widths)`, narrow by one rounding step the group whose damage
    grows least per unit of cost saved (`damage[g][k]`: group g's damage at width k, k = 0..m,
    non-increasing in k), never below `floors[g]`.

    A step that saves no cost is taken only when no other is left. The last step is the one,
    among those that finish, whose damage grows least (a large group's step would otherwise
    overshoot a cost target by its whole block). Where every channel costs the same and each
    damage curve is convex in the removed count, the widths reached have the least total
    damage for their number of removed channels; where damages match, the most cost saved
    (tests/test_targets.py checks both against brute force).
    """
    widths = dict(channels)
    while not done(widths):
        moves = _steps(widths, damage, cost, steps, floors)
        if not moves:
            break
        finishing = [s for s in moves if done({**widths, s[2]: s[3]})]
        if finishing:
            _, _, name, new = min(finishing, key=lambda s: (s[1], s[0]))
            return {**widths, name: new}
        _, _, name, new = min(moves, key=lambda s: s[:2])
        widths[name] = new
    return widths


def _steps(widths, damage, cost, steps, floors) -> list[tuple]:
    """Every allowed one-step narrowing as (damage growth per cost saved, damage growth, group,
    new width); a step saving no cost rates infinite, ordered by its damage growth."""
    now, found = cost(widths), []
    for name, k in widths.items():
        new = _step_down(k, steps[name])
        if new == 0 or new < floors[name]:
            continue
        saved = now - cost({**widths, name: new})
        grown = float(damage[name][new] - damage[name][k])
        found.append((grown / saved if saved > 0 else np.inf, grown, name, new))
    return found


def removal_floors(channels: Mapping[str, int], max_ratio: float) -> dict[str, int]:
    """The narrowest width each group may reach when it may lose at most `max_ratio` of its
    channels (at least one channel stays)."""
    return {name: max(1, m - int(np.floor(max_ratio * m + 1e-9))) for name, m in channels.items()}


def score_damage(scores: np.ndarray, *, normalise: bool = True) -> np.ndarray:
    """Damage of keeping the k best-scoring channels, k = 0..m: the summed scores of the m − k
    removed ones, as a share of the group's total with `normalise` (scores below 0 count 0)."""
    ranked = np.sort(np.clip(np.asarray(scores, dtype=np.float64), 0.0, None))[::-1]
    removed = np.concatenate([np.cumsum(ranked[::-1])[::-1], [0.0]])
    total = float(removed[0])
    return removed / total if normalise and total > 0 else removed
