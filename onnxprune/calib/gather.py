"""The calibrate stage: collect, per selected group, what its method says it needs.

Needs: "weights" (producer filters), "gram" (streamed tap statistics through ORT), "grad" (Taylor
sums at the taps), "ippro" (producer weight gradients and Σ x·∂L/∂σ(x) at the group's first
nonlinearity) — these two from one pass through the ONNX→torch interpreter — and "jacobian"
(output-Jacobian-weighted input sums at every consumer, for elimination–compensation); per
weight also "norms" (each layer's input feature norms, for Wanda; one ORT pass).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.calib.data import Dataset
from onnxprune.calib.grads import Gradients, Product, collect_gradients
from onnxprune.calib.jacobian import (
    JointStats,
    Site,
    SiteStats,
    collect_jacobian_stats,
    collect_weight_stats,
)
from onnxprune.calib.norms import collect_input_norms
from onnxprune.calib.stats import Moments, collect_all, summed
from onnxprune.config import PruneConfig
from onnxprune.errors import UsageError
from onnxprune.graph.groups import ChannelGroup, Tap, tap_key
from onnxprune.graph.load import export
from onnxprune.graph.sparsify import WeightLayer, to_canonical
from onnxprune.graph.weights import (
    consumer_matrix,
    group_rows,
    producer_batchnorms,
    producer_filters,
    producer_weight_names,
)
from onnxprune.methods.heads import feature_tap
from onnxprune.ops.flow import rank_of
from onnxprune.ops.recurrent import is_recurrent
from onnxprune.plan import GroupStats, TapStats
from onnxprune.progress import progress


@dataclass(frozen=True)
class Calibration:
    """Per-group statistics, the loss the gradient pass used (None without gradients), the
    per-channel moments of the tensors asked for (`moments` of `gather`), and the model's
    outputs on the `reference` feeds of `gather` (empty when no ORT statistics pass ran)."""

    stats: Mapping[str, GroupStats] = field(default_factory=dict)
    loss: str | None = None
    moments: Mapping[str, Moments] = field(default_factory=dict)
    outputs: Mapping[str, np.ndarray] = field(default_factory=dict)


def gather(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    counts: Mapping[str, int],
    needs: frozenset[str],
    dataset: Dataset,
    config: PruneConfig,
    *,
    moments: Mapping[str, int] | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
) -> Calibration:
    """GroupStats for every group in `counts`: weights, tap statistics and/or gradient sums;
    the per-channel moments of the tensors `moments` (name → channel axis), read in the same
    ORT pass as the tap statistics; and the model's outputs on the `reference` feeds
    (verification samples) from that pass's session, when there is one."""
    selected = [g for g in groups if g.name in counts]
    model = export(graph) if needs & {"gram", "grad", "ippro", "jacobian"} or moments else None
    taps, found, outputs = {}, {}, {}
    if "gram" in needs or moments:
        wanted = [(tap, g.channels) for g in selected for tap in g.taps]
        wanted += [(norm, g.channels) for g in selected for _, norm in g.normalized]
        features = [
            (feature_tap(tap, g.feature_dim), g.channels * g.feature_dim)
            for g in selected
            if g.head_dim > 1
            for tap in g.taps
        ]
        wanted = list(dict.fromkeys(wanted + features)) if "gram" in needs else []
        batches = _batches(dataset, config, "statistics")
        qr = config.id_solver == "qr"
        folded = {tap for tap, _ in features}  # head maps are cross-validated (methods/heads.py)
        if config.cv_maps:  # and, asked for, the maps of single-tap channel groups (methods/id.py)
            folded |= {g.taps[0] for g in selected if g.head_dim == 1 and len(g.taps) == 1}
        if config.cv_widths and config.scores_widths:  # width candidates scored held out
            folded |= {tap for g in selected for tap in g.taps}
        taps, found, outputs = collect_all(
            model,
            wanted,
            dict(moments or {}),
            batches,
            qr=qr,
            reference=reference,
            folded=folded,
            row_mask=config.row_mask,
        )
    grads = _gradients(model, graph, selected, needs, dataset, config)
    consumers = _consumer_sites(graph, selected) if "jacobian" in needs else {}
    jacobian = {}
    if consumers:
        sites = list(dict.fromkeys(site for items in consumers.values() for _, site, _ in items))
        batches = _batches(dataset, config, "jacobians", feeds_only=False)
        jacobian = collect_jacobian_stats(
            model, sites, batches, jacobian=config.jacobian, joint=config.joint, seed=config.seed
        )
    stats = {}
    for group in selected:
        stats[group.name] = GroupStats(
            weights=producer_filters(graph, group) if "weights" in needs else (),
            batchnorms=producer_batchnorms(graph, group) if "weights" in needs else (),
            taps=_pooled(group, {tap.key: taps[tap] for tap in group.taps if tap in taps}),
            grads=_group_grads(graph, group, grads) if grads else {},
            consumers=_pooled_consumers(
                graph,
                group,
                {
                    name: (jacobian[site], weight)
                    for name, site, weight in consumers.get(group.name, ())
                },
            ),
            norms=_pooled(group, {key: taps[n] for key, n in group.normalized if n in taps}),
            features=_pooled(group, _features(group, taps)),
        )
    return Calibration(stats, grads.loss if grads else None, found, outputs)


def _pooled(group: ChannelGroup, by_key: dict[str, TapStats]) -> dict[str, TapStats]:
    """`by_key` with each set of copies of one tap (`ChannelGroup.pooled`) holding their summed
    statistics: a method then plans one correction for every copy of a shared weight."""
    for keys in group.pooled:
        if all(key in by_key for key in keys):
            total = summed([by_key[key] for key in keys])
            by_key.update(dict.fromkeys(keys, total))
    return by_key


def _pooled_consumers(
    graph: gs.Graph, group: ChannelGroup, by_node: dict[str, tuple[SiteStats, np.ndarray]]
) -> dict[str, tuple[SiteStats, np.ndarray]]:
    """`by_node` with the copies of one shared consumer (one weight, read at the copies of one
    tap, `ChannelGroup.pooled`) holding their summed Jacobian statistics, so biascomp gives
    every copy one bias shift."""
    if not group.pooled:
        return by_node
    pool = {key: i for i, keys in enumerate(group.pooled) for key in keys}
    weights = {node.name: node.inputs[1].name for node in graph.nodes if node.name in by_node}
    copies: dict[tuple, list[str]] = defaultdict(list)
    for edit in (e for e in group.edits if e.role == "in" and e.node in by_node):
        index = pool.get(tap_key(edit.tap or "", edit.offset))
        if index is not None:
            copies[(index, weights[edit.node])].append(edit.node)
    for names in (n for n in copies.values() if len(n) > 1):
        parts = [by_node[name][0] for name in names]
        total = SiteStats(
            *(sum(getattr(p, f) for p in parts) for f in ("s0", "s1", "s2")),
            sum(p.mean for p in parts) / len(parts),  # per sample: the copies have as many
            _summed_joint([p.joint for p in parts]),
        )
        by_node.update({name: (total, by_node[name][1]) for name in names})
    return by_node


def _summed_joint(parts: list[JointStats | None]) -> JointStats | None:
    if any(p is None for p in parts):
        return None
    return JointStats(sum(p.m for p in parts), sum(p.t for p in parts))


def _features(group: ChannelGroup, taps: Mapping[Tap, TapStats]) -> dict[str, TapStats]:
    """A head group's feature-level tap statistics, by head tap key (empty for other groups)."""
    if group.head_dim == 1:
        return {}
    found = ((tap.key, feature_tap(tap, group.feature_dim)) for tap in group.taps)
    return {key: taps[features] for key, features in found if features in taps}


def gather_weights(
    graph: gs.Graph,
    layers: tuple[WeightLayer, ...],
    needs: frozenset[str],
    dataset: Dataset,
    config: PruneConfig,
) -> tuple[dict[str, SiteStats], dict[str, np.ndarray], str | None]:
    """For per-weight pruning: Jacobian sums per layer ("jacobian") and the summed loss
    gradient of each layer's weight in its canonical layout ("grad"), plus the loss used."""
    model = export(graph) if needs & {"jacobian", "grad"} else None
    stats, grads, loss = {}, {}, None
    if "jacobian" in needs:
        batches = _batches(dataset, config, "jacobians", feeds_only=False)
        stats = collect_weight_stats(
            model, layers, batches, jacobian=config.jacobian, joint=config.joint, seed=config.seed
        )
    if "grad" in needs:
        batches = _batches(dataset, config, "gradients", feeds_only=False)
        names = tuple(dict.fromkeys(layer.weight for layer in layers))
        found = collect_gradients(
            model, [], batches, weights=names, task=config.task, seed=config.seed
        )
        grads = {
            layer.name: to_canonical(graph, layer, found.weights[layer.weight]) for layer in layers
        }
        loss = found.loss
    return stats, grads, loss


def gather_norms(
    graph: gs.Graph, layers: tuple[WeightLayer, ...], dataset: Dataset, config: PruneConfig
) -> dict[str, np.ndarray]:
    """For Wanda: ‖X_j‖₂ of each layer's input features over every sample and position."""
    batches = _batches(dataset, config, "input norms")
    return collect_input_norms(export(graph), layers, batches)


def _gradients(model, graph, selected, needs, dataset, config) -> Gradients | None:
    if not needs & {"grad", "ippro"}:
        return None
    products = []
    if "grad" in needs:
        products += [Product(tap, tap, g.channels) for g in selected for tap in g.taps]
    weights: tuple[str, ...] = ()
    if "ippro" in needs:
        products += [Product(*g.sigma, g.channels) for g in selected if g.sigma]
        weights = tuple(n for g in selected for n in producer_weight_names(graph, g))
    return collect_gradients(
        model,
        list(dict.fromkeys(products)),
        _batches(dataset, config, "gradients", feeds_only=False),
        weights=tuple(dict.fromkeys(weights)),
        task=config.task,
        seed=config.seed,
    )


def _consumer_sites(graph: gs.Graph, groups: list[ChannelGroup]) -> dict[str, list]:
    """Per group: (consumer node, its Jacobian Site, its weight on the group) for every consumer.

    A recurrent node as reader (its input weights or its own recurrence) is refused: its gate
    pre-activations, which the bias shift acts on, are no tensor of the graph."""
    nodes = {node.name: node for node in graph.nodes}
    found: dict[str, list] = {}
    for group in groups:
        for edit in group.edits:
            if edit.role in ("in", "hidden") and is_recurrent(nodes[edit.node]):
                raise UsageError(
                    f"group '{group.name}' is read by {nodes[edit.node].op} '{edit.node}': "
                    "per-channel biascomp does not weigh recurrent gates",
                    hint="--exclude the group, or use another method",
                )
        norm = next((e.node for e in group.edits if e.role == "norm"), None)
        if norm is not None:
            raise UsageError(
                f"group '{group.name}' is read by the LayerNormalization '{norm}' over its "
                "channels: per-channel biascomp does not weigh its rebuilt statistics",
                hint="--exclude the group, or use another method",
            )
        for edit in (e for e in group.edits if e.role == "in"):
            tap = next(t for t in group.taps if t.tensor == edit.tap and t.offset == edit.offset)
            node = nodes[edit.node]
            rank = rank_of(node.outputs[0])
            axis = rank - 1 if node.op == "MatMul" and rank else 1
            site = Site(node.outputs[0].name, axis, tap, group.channels)
            weight = consumer_matrix(graph, edit, group.channels)
            found.setdefault(group.name, []).append((node.name, site, weight))
    return found


def _batches(dataset: Dataset, config: PruneConfig, what: str, *, feeds_only: bool = True):
    total = -(-len(dataset) // config.batch_size)
    batches = dataset.batches(config.batch_size)
    items = (b.feeds for b in batches) if feeds_only else batches
    return progress(items, total, f"calibrating ({what})")


def _group_grads(graph: gs.Graph, group: ChannelGroup, grads: Gradients) -> dict[str, object]:
    out: dict[str, object] = {}
    found = [grads.products[p] for p in grads.products if p.x == p.y and p.x in group.taps]
    if found:
        out["taylor"] = sum(g.taylor for g in found)
        out["first_order"] = sum(g.first_order for g in found)
    sigma = Product(*group.sigma, group.channels) if group.sigma else None
    if sigma in grads.products:
        out["ippro_d"] = grads.products[sigma].first_order
    names = producer_weight_names(graph, group)
    if all(name in grads.weights for name in names):
        nodes = {node.name: node for node in graph.nodes}
        out["weight_grads"] = tuple(
            group_rows(group, nodes[p], grads.weights[n])
            for p, n in zip(group.producers, names, strict=True)
        )
    return out
