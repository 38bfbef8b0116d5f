"""Sensitivity: the metric when only one channel group is pruned, and a recipe built from it.

`measure_sensitivity` prunes each prunable group alone (a recipe with that group's ratio, ratio 0
everywhere else) at a few ratios and scores the result on the evaluation split. `allocate` then
spends a MAC budget greedily on the (group, width) steps with the least measured loss per MAC
saved, interpolating linearly between the measured ratios and never beyond the largest one; the
MACs of every candidate are exact (`budget.cost_of` on the normalized graph), so the recipe meets
its target when pruned with the same `round_to` and `prune_residual`. The (group, ratio) cells run
one after another, in local worker processes or as Ray tasks (`compare.parallel`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune.api import prune
from onnxprune.budget import cost_of
from onnxprune.compare.parallel import Backend, CellError, run_cells
from onnxprune.compare.sweep import (
    Evaluator,
    MethodSpec,
    as_dataset,
    parse_method,
    pyplot,
    save_figure,
)
from onnxprune.errors import NothingToPruneError, OnnxPruneError, UsageError
from onnxprune.graph.analyze import analyze as find_groups
from onnxprune.graph.groups import ChannelGroup
from onnxprune.graph.load import load_model, normalize
from onnxprune.measure.cost import count
from onnxprune.methods.width import group_ratio, group_steps, tied_counts
from onnxprune.options import WidthRule, check_ratio

DEFAULT_RATIOS = (0.25, 0.5, 0.75)
ModelLike = str | os.PathLike | onnx.ModelProto


@dataclass(frozen=True)
class GroupPoint:
    """One group pruned alone at one ratio: the kept width, the scores and the MACs left."""

    ratio: float
    kept: int
    metric: float
    loss: float
    rel_l2: float
    macs: int


@dataclass(frozen=True)
class Sensitivity:
    """Per-group measurements; `points[group]` follows `ratios`."""

    model: str
    method: str
    metric: str
    higher_is_better: bool
    base: float
    macs: int
    ratios: tuple[float, ...]
    channels: Mapping[str, int]
    points: Mapping[str, tuple[GroupPoint, ...]]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "model": self.model,
            "method": self.method,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "base": self.base,
            "macs": self.macs,
            "ratios": list(self.ratios),
            "channels": dict(self.channels),
            "points": {g: [asdict(p) for p in pts] for g, pts in self.points.items()},
            "settings": dict(self.settings),
        }

    def write(self, out_dir: str | os.PathLike, stem: str = "sensitivity") -> tuple[Path, Path]:
        """Write `<stem>.csv` (one row per group and ratio) and `<stem>.json` into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
        with csv_path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["group", "channels", *GroupPoint.__dataclass_fields__])
            for group, pts in self.points.items():
                for p in pts:
                    writer.writerow([group, self.channels[group], *asdict(p).values()])
        json_path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return csv_path, json_path

    def format_table(self) -> str:
        """Groups × ratios: the metric, with the kept width where it differs from the ratio's."""
        head = ("group", "channels", *(f"r={r:g}" for r in self.ratios), "MACs -% at max")
        rows = [head]
        for group, pts in self.points.items():
            c = self.channels[group]
            cells = [_point_cell(p, c) for p in pts]
            saved = 1 - pts[-1].macs / self.macs if pts and self.macs else 0.0
            rows.append((group, str(c), *cells, f"{100 * saved:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [
            "  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                      for i, (x, w) in enumerate(zip(row, widths, strict=True)))
            for row in rows
        ]  # fmt: skip
        lines.append(
            f"{self.metric} with only that group pruned (original {self.base:.4g}); "
            "[k] = channels kept where rounding changed the ratio's width"
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class Allocation:
    """Per-group removal ratios (a recipe) and what they reach."""

    ratios: Mapping[str, float]
    kept: Mapping[str, int]
    target_macs: float
    reached_macs: float
    estimated_loss: float

    def recipe(self, **meta: Any) -> dict[str, Any]:
        """The recipe file's content: `ratios` (read by methods/width.load_recipe) plus notes."""
        return {
            "ratios": dict(self.ratios),
            "target_macs": self.target_macs,
            "reached_macs": self.reached_macs,
            "estimated_loss": self.estimated_loss,
            "kept": dict(self.kept),
            **meta,
        }


def measure_sensitivity(
    model: ModelLike,
    method: str | MethodSpec,
    *,
    data: Any,
    evaluation: Any,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    backend: Backend | None = None,
    **options: Any,
) -> Sensitivity:
    """Prune every prunable group alone at each of `ratios` and score it on `evaluation`.

    Options go to `onnxprune.prune` (`round_to`, `prune_residual`, `compensate` …); with
    `prune_residual` the coupled groups (residual streams) are measured too. `backend`
    runs the cells in worker processes or on Ray (the numbers do not depend on it). A cell that
    fails fails the measurement (an allocation needs every point), after all cells ran.
    """
    spec = method if isinstance(method, MethodSpec) else parse_method(method)
    ratios = tuple(sorted({check_ratio(r) for r in ratios}))
    if not ratios:
        raise UsageError("give at least one sensitivity ratio")
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    groups = prunable_groups(proto, bool(options.get("prune_residual", False)))
    if not groups:
        raise NothingToPruneError("nothing to measure: no channel group is prunable",
                                  hint="run `onnxprune analyze MODEL`; --prune-residual "
                                  "includes residual streams")  # fmt: skip
    backend = backend or Backend()
    backend.check_model(proto)
    evaluator = Evaluator(proto, as_dataset(proto, evaluation, role="evaluation"))
    seed = int(options.pop("seed", 0))
    if data is not None:
        data = as_dataset(proto, data, role="calibration", seed=seed,
                          samples=options.get("calib_samples"))  # fmt: skip
    macs = count(proto).macs
    base_options = {"verify": False, "allow_noop": True, **options, **spec.options}
    shared = _Shared(proto, spec.method, data, evaluator, seed, base_options)
    tasks = [(g.name, g.channels, r) for g in groups for r in ratios]
    outcomes = run_cells(_group_point, shared, tasks, backend, "sensitivity cells")
    for (group, _, ratio), outcome in zip(tasks, outcomes, strict=True):
        if isinstance(outcome, CellError):
            raise OnnxPruneError(f"group '{group}' at ratio {ratio:g}: {outcome.message}")
    points = {g.name: tuple(outcomes[i * len(ratios) : (i + 1) * len(ratios)])
              for i, g in enumerate(groups)}  # fmt: skip
    settings = {"options": {k: v for k, v in options.items() if _jsonable(v)}, "seed": seed}
    name = Path(model).stem if not isinstance(model, onnx.ModelProto) else proto.graph.name
    return Sensitivity(name, spec.label, evaluator.metric,
                       evaluator.higher_is_better, evaluator.base.value, macs, ratios,
                       {g.name: g.channels for g in groups}, points, settings)  # fmt: skip


def allocate(
    model: ModelLike,
    sensitivity: Sensitivity,
    target_macs: float,
    *,
    round_to: int = 16,
    prune_residual: bool = False,
) -> Allocation:
    """Per-group ratios keeping at most `target_macs` of the MACs with the least estimated loss.

    Greedy: repeatedly narrow the group whose interpolated loss (ties: relative L2 deviation)
    grows least per MAC saved, in steps of `round_to` channels where a group has ≥ 2·round_to
    (else 1), never past the largest measured ratio. Raises UsageError when out of reach.
    """
    if not 0.0 < target_macs <= 1.0:
        raise UsageError(f"'target_macs' is the fraction to keep, in (0, 1]; got {target_macs}")
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    graph = normalize(proto)
    groups = find_groups(graph)
    known = {g.name: g for g in groups}
    missing = sorted(set(sensitivity.points) - set(known))
    if missing:
        raise UsageError(f"sensitivity groups {missing[:3]} are not in this model")
    widths_cost = cost_of(graph, groups, "macs")
    cost = lambda widths: widths_cost({**widths, **tied_counts(groups, widths)})  # noqa: E731
    channels = {name: known[name].channels for name in sensitivity.points}
    curves = {name: _curve(pts, channels[name]) for name, pts in sensitivity.points.items()}
    widths = dict(channels)
    steps = group_steps(groups, round_to)
    full = cost(widths)
    while cost(widths) > target_macs * full + 1e-6:
        step = _best_step(widths, channels, curves, cost, steps)
        if step is None:
            raise UsageError(
                f"target_macs {target_macs:g} is out of reach: pruning every measured group up "
                f"to its largest measured ratio keeps {cost(widths) / full:.3f} of the MACs",
                hint="measure larger --ratios, or pass --prune-residual to include coupled groups",
            )
        widths[step[0]] = step[1]
    widths.update(tied_counts(groups, widths))  # one conv group's step is all of theirs
    ratios = {name: (channels[name] - k) / channels[name] for name, k in widths.items()}
    loss = sum(float(np.interp(1 - widths[n] / channels[n], *curves[n][:2])) for n in widths)
    return Allocation(ratios, widths, target_macs, cost(widths) / full, loss)


def prunable_groups(model: onnx.ModelProto, prune_residual: bool) -> tuple[ChannelGroup, ...]:
    """Groups a ratio would prune (prunable; coupled ones only with `prune_residual`)."""
    rule = WidthRule(prune_residual=prune_residual)
    return tuple(g for g in find_groups(normalize(model)) if group_ratio(g, rule) is not None)


def plot_sensitivity(sensitivity: Sensitivity, path: str | os.PathLike) -> bool:
    """A groups × ratios heatmap of the loss; False (nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    names = list(sensitivity.points)
    loss = np.array([[p.loss for p in sensitivity.points[n]] for n in names], dtype=float)
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(sensitivity.ratios), 1.2 + 0.35 * len(names)))
    image = ax.imshow(loss, cmap="Reds", aspect="auto", vmin=min(0.0, float(loss.min())))
    ax.set_xticks(range(len(sensitivity.ratios)), [f"{r:g}" for r in sensitivity.ratios])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for (i, j), value in np.ndenumerate(loss):
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7)
    ax.set(xlabel="ratio (this group only)", title=f"{sensitivity.model}: {sensitivity.method}")
    fig.colorbar(image, ax=ax, label=f"{sensitivity.metric} loss")
    save_figure(plt, fig, path)
    return True


# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Shared:
    """What every sensitivity cell reads (sent once to each worker process)."""

    model: onnx.ModelProto
    method: str
    data: Any
    evaluator: Evaluator
    seed: int
    options: Mapping[str, Any]


def _group_point(shared: _Shared, task: tuple[str, int, float]) -> GroupPoint:
    """Prune only group `task[0]` (of `task[1]` channels) at ratio `task[2]` and score it."""
    group, channels, ratio = task
    result = prune(shared.model, method=shared.method, data=shared.data, seed=shared.seed,
                   ratio=0.0, recipe={group: ratio}, **shared.options)  # fmt: skip
    plan = result.plans.get(group)
    score = shared.evaluator(result.model)
    kept = channels if plan is None else len(plan.keep)
    return GroupPoint(ratio, kept, score.value, shared.evaluator.loss(score), score.rel_l2,
                      result.report.macs[1])  # fmt: skip


def _curve(
    points: Sequence[GroupPoint], channels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(removed fraction, loss, rel L2) from (0, 0, 0) through the measured widths, each loss
    clipped at 0 and made non-decreasing so narrower never looks better than wider."""
    by_kept = {channels: (0.0, 0.0)}
    for p in sorted(points, key=lambda p: -p.kept):
        by_kept.setdefault(p.kept, (max(p.loss, 0.0), p.rel_l2))
    kept = sorted(by_kept, reverse=True)
    x = np.array([1 - k / channels for k in kept])
    loss = np.maximum.accumulate([by_kept[k][0] for k in kept])
    rel = np.maximum.accumulate([by_kept[k][1] for k in kept])
    return x, loss, rel


def _best_step(widths, channels, curves, cost, steps):
    now = cost(widths)
    best, best_rate = None, (np.inf, np.inf)
    for name, k in widths.items():
        c = channels[name]
        step = steps[name]
        new = k - step if k % step == 0 else k - k % step
        x, loss, rel = curves[name]
        if new < 1 or 1 - new / c > x[-1] + 1e-9:
            continue
        saved = now - cost({**widths, name: new})
        if saved <= 0:
            continue
        old_x, new_x = 1 - k / c, 1 - new / c
        rate = (
            (np.interp(new_x, x, loss) - np.interp(old_x, x, loss)) / saved,
            (np.interp(new_x, x, rel) - np.interp(old_x, x, rel)) / saved,
        )
        if rate < best_rate:
            best, best_rate = (name, new), rate
    return best


def _point_cell(point: GroupPoint, channels: int) -> str:
    expected = channels - int(np.floor(point.ratio * channels + 1e-9))
    text = f"{point.metric:.4g}"
    return text if point.kept == expected else f"{text} [{point.kept}]"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
