"""The calibrate stage: collect, per selected group, what its method says it needs."""

from __future__ import annotations

from collections.abc import Mapping

import onnx_graphsurgeon as gs

from onnxprune.calib.data import Dataset, progress
from onnxprune.calib.stats import collect
from onnxprune.config import PruneConfig
from onnxprune.graph.groups import ChannelGroup, Tap
from onnxprune.graph.load import export
from onnxprune.graph.weights import producer_filters
from onnxprune.methods.base import GroupStats, TapStats


def gather(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    counts: Mapping[str, int],
    needs: frozenset[str],
    dataset: Dataset,
    config: PruneConfig,
) -> dict[str, GroupStats]:
    """GroupStats for every group in `counts`: producer weights and/or streamed tap statistics."""
    selected = [g for g in groups if g.name in counts]
    taps = _tap_stats(graph, selected, dataset, config) if "gram" in needs else {}
    stats = {}
    for group in selected:
        weights = producer_filters(graph, group) if "weights" in needs else ()
        group_taps = {tap.tensor: taps[(tap, group.channels)] for tap in group.taps if taps}
        stats[group.name] = GroupStats(weights=weights, taps=group_taps)
    return stats


def _tap_stats(
    graph: gs.Graph, groups: list[ChannelGroup], dataset: Dataset, config: PruneConfig
) -> dict[tuple[Tap, int], TapStats]:
    wanted = list(dict.fromkeys((tap, g.channels) for g in groups for tap in g.taps))
    total = -(-len(dataset) // config.batch_size)
    batches = progress(
        (b.feeds for b in dataset.batches(config.batch_size)), total, "calibrating", enabled=True
    )
    found = collect(export(graph), wanted, batches)
    return {(tap, channels): found[tap] for tap, channels in wanted}
