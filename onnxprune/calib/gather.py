"""The calibrate stage: collect, per selected group, what its method says it needs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxprune.calib.data import Dataset, progress
from onnxprune.calib.grads import collect_gradients
from onnxprune.calib.stats import collect
from onnxprune.config import PruneConfig
from onnxprune.graph.groups import ChannelGroup, Tap
from onnxprune.graph.load import export
from onnxprune.graph.weights import producer_filters
from onnxprune.methods.base import GroupStats


@dataclass(frozen=True)
class Calibration:
    """Per-group statistics, and the loss the gradient pass used (None without gradients)."""

    stats: Mapping[str, GroupStats] = field(default_factory=dict)
    loss: str | None = None


def gather(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    counts: Mapping[str, int],
    needs: frozenset[str],
    dataset: Dataset,
    config: PruneConfig,
) -> Calibration:
    """GroupStats for every group in `counts`: weights, tap statistics and/or gradient sums."""
    selected = [g for g in groups if g.name in counts]
    wanted = list(dict.fromkeys((tap, g.channels) for g in selected for tap in g.taps))
    model = export(graph) if needs & {"gram", "grad"} else None
    taps = (
        collect(model, wanted, _batches(dataset, config, "statistics")) if "gram" in needs else {}
    )
    grads, loss = {}, None
    if "grad" in needs:
        grads, loss = collect_gradients(
            model,
            wanted,
            _batches(dataset, config, "gradients", feeds_only=False),
            task=config.task,
            seed=config.seed,
        )
    stats = {}
    for group in selected:
        stats[group.name] = GroupStats(
            weights=producer_filters(graph, group) if "weights" in needs else (),
            taps={tap.tensor: taps[tap] for tap in group.taps if tap in taps},
            grads=_group_grads(group, grads),
        )
    return Calibration(stats, loss)


def _batches(dataset: Dataset, config: PruneConfig, what: str, *, feeds_only: bool = True):
    total = -(-len(dataset) // config.batch_size)
    batches = dataset.batches(config.batch_size)
    items = (b.feeds for b in batches) if feeds_only else batches
    return progress(items, total, f"calibrating ({what})", enabled=True)


def _group_grads(group: ChannelGroup, grads: Mapping[Tap, object]) -> dict:
    found = [grads[tap] for tap in group.taps if tap in grads]
    if not found:
        return {}
    return {
        "taylor": sum(g.taylor for g in found),
        "first_order": sum(g.first_order for g in found),
    }
