"""The Python API: `prune()` and `analyze()`, each a short composition of the stages.

load → normalize → analyze → calibrate → plan → rewrite → verify/measure → Report
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.budget import choose_widths, refine_widths
from onnxprune.calib.data import (
    Dataset,
    batch_for,
    count_shapes,
    input_specs,
    load_data,
    with_input_shapes,
)
from onnxprune.calib.gather import gather, gather_weights
from onnxprune.config import PruneConfig
from onnxprune.errors import NothingToPruneError, UsageError
from onnxprune.graph.analyze import analyze as find_groups
from onnxprune.graph.groups import ChannelGroup
from onnxprune.graph.load import (
    check_opset,
    export,
    has_external_data,
    load_model,
    normalize,
    save_model,
    too_large_for_protobuf,
)
from onnxprune.graph.rewrite import rewrite
from onnxprune.graph.sparsify import (
    deflated_size,
    layer_weights,
    sparsify,
    weight_layers,
    zero_count,
)
from onnxprune.measure.cost import count
from onnxprune.measure.latency import benchmark
from onnxprune.measure.verify import verify
from onnxprune.methods import build_method
from onnxprune.methods.base import Plan
from onnxprune.methods.cob import unrotated_note
from onnxprune.methods.planner import make_plans
from onnxprune.methods.sparse import WEIGHT_NEEDS, bias_shifts, choose_removed, weight_scores
from onnxprune.methods.width import WidthRule, group_ratio
from onnxprune.recalibrate import recalibrate
from onnxprune.report import GroupRow, Report

ModelLike = str | os.PathLike | onnx.ModelProto


@dataclass(frozen=True)
class Result:
    """A pruned model, its report, and the groups and plans that produced it."""

    model: onnx.ModelProto
    report: Report
    groups: tuple[ChannelGroup, ...]
    plans: Mapping[str, Plan]
    external_data: bool = False

    def save(self, path: str | os.PathLike) -> None:
        """Write the pruned model atomically (external data kept if the input had it)."""
        save_model(self.model, path, external_data=self.external_data)


@dataclass(frozen=True)
class Analysis:
    """What `onnxprune analyze` shows: the groups and the model's cost (`unknown`: the nodes
    whose shapes stayed unknown, so their MACs are missing)."""

    groups: tuple[ChannelGroup, ...]
    params: int
    macs: int
    group_macs: Mapping[str, int]
    unknown: tuple[str, ...] = ()


def analyze(
    model: ModelLike, *, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> Analysis:
    """Channel groups of `model` (prunable or with the reason why not) and its cost.

    A group's MACs are those of the nodes whose work scales with its width: producers,
    passthrough ops and consumers. They are counted with the symbolic input dims set to
    `input_shapes` (1 where not given).
    """
    graph = normalize(_load(model))
    groups = find_groups(graph)
    cost = count(export(graph), input_shapes=dict(input_shapes or {}))
    macs = {node.name: node.macs for node in cost.per_node}
    group_macs = {
        g.name: sum(macs.get(n, 0) for n in {*g.producers, *g.passthrough, *g.consumers})
        for g in groups
    }
    return Analysis(groups, cost.params, cost.macs, group_macs, cost.unknown)


def prune(
    model: ModelLike,
    *,
    method: str = "magnitude",
    ratio: float = 0.5,
    data: str | os.PathLike | Mapping[str, np.ndarray] | Dataset | None = None,
    labels: str | os.PathLike | np.ndarray | None = None,
    config: PruneConfig | None = None,
    **options: Any,
) -> Result:
    """Prune `model` with `method`, removing `ratio` of the channels of every prunable group.

    `data` is calibration data (npz/npy path, image folder, dict of arrays, a Dataset, or None
    for seeded random inputs used only to verify). Other options are PruneConfig fields, or
    WidthRule fields (`layer_ratios`, `exclude`, `round_to`, `prune_residual`, `recipe`).
    """
    config = config or _config(method, ratio, options)
    proto = _load(model)
    config = _fit_batch(config, proto)
    external = not isinstance(model, onnx.ModelProto) and has_external_data(model)
    graph = normalize(proto)
    if config.granularity == "weight":
        return _prune_weights(proto, graph, data, labels, config, external)
    groups = find_groups(graph)
    widths = choose_widths(graph, groups, config)
    if not widths.counts and not config.allow_noop:
        raise NothingToPruneError(
            "nothing to prune: no channel group is both prunable and selected",
            hint="run `onnxprune analyze MODEL` to see why; --allow-noop accepts this",
        )
    pruner = build_method(
        config.method,
        norm=config.norm,
        compensate=config.compensate,
        id_solver=config.id_solver,
        ippro_lambda=config.ippro_lambda,
        threshold=config.threshold_rule(),
        rms_correction=config.rms_correction,
        joint=config.joint,
    )
    dataset = _dataset(proto, data, labels, config, needs_data=bool(pruner.needs - {"weights"}))
    needs = pruner.needs | _extra_needs(config)
    calibration = gather(graph, groups, widths.counts, needs, dataset, config)
    widths = refine_widths(graph, groups, widths, calibration.stats, pruner, config, dataset)
    plans = make_plans(groups, widths.counts, calibration.stats, pruner, config)
    pruned_graph = rewrite(graph, groups, plans, exact_borders=config.exact_borders)
    notes = (widths.note,) if widths.note else ()
    notes += unrotated_note(groups, plans) if config.method == "cob" else ()
    if config.recalibrate:
        batches = lambda: (b.feeds for b in dataset.batches(config.batch_size))  # noqa: E731
        pruned_graph, layers = recalibrate(export(graph), pruned_graph, groups, plans, batches)
        notes += (f"recalibrated the output mean and variance of {layers} layers",)
    pruned = _finish(proto, pruned_graph, config)
    result = _result(proto, pruned, groups, plans, dataset, config, calibration.loss, notes)
    return replace(result, external_data=external or too_large_for_protobuf(pruned))


def _prune_weights(
    proto: onnx.ModelProto,
    graph: gs.Graph,
    data: Any,
    labels: Any,
    config: PruneConfig,
    external: bool,
) -> Result:
    """Per weight (METHODS.md §2.1): score, zero the lowest `sparsity` fraction, shift biases,
    in `config.steps` rounds (geometric schedule) with statistics refreshed after each."""
    layers = weight_layers(graph)
    if not layers:
        raise NothingToPruneError("nothing to prune: no Gemm/MatMul/Conv with a constant weight")
    needs = WEIGHT_NEEDS.get(config.method, frozenset())
    dataset = _dataset(proto, data, labels, config, needs_data=bool(needs))
    pruned_graph, removed, loss = graph, {}, None
    for step in range(1, config.steps + 1):
        fraction = 1 - (1 - config.sparsity) ** (step / config.steps)
        pruned_graph, removed, loss = _sparsify_step(
            pruned_graph, removed, fraction, needs, dataset, config
        )
    pruned = _finish(proto, pruned_graph, config)
    rows = tuple(
        GroupRow(n, m.size, int(m.size - m.sum()), "sparsified", {"sparsity": float(m.mean())})
        for n, m in removed.items()
    )
    zeros = (zero_count(graph, layers), zero_count(gs.import_onnx(pruned), layers))
    sparse = {
        "unit": "weights",
        "nonzero_weights": tuple(total - zero for zero, total in zeros),
        "zipped_size": (deflated_size(proto), deflated_size(pruned)),
    }
    result = _result(proto, pruned, (), {}, dataset, config, loss, (DENSE_NOTE,), rows, sparse)
    return replace(result, external_data=external or too_large_for_protobuf(pruned))


def _sparsify_step(
    graph: gs.Graph,
    before: Mapping[str, np.ndarray],
    fraction: float,
    needs: frozenset[str],
    dataset: Dataset,
    config: PruneConfig,
) -> tuple[gs.Graph, dict[str, np.ndarray], str | None]:
    """One round on `graph`: the weights removed `before` stay removed, more go up to
    `fraction`, and the biases take the shifts of the newly removed ones."""
    layers = weight_layers(graph)
    stats, grads, loss = gather_weights(graph, layers, needs, dataset, config)
    weights = layer_weights(graph, layers)
    scores = weight_scores(config.method, weights, stats, grads, seed=config.seed)
    scores = {n: np.where(before[n], -np.inf, s) if n in before else s for n, s in scores.items()}
    removed = choose_removed(scores, fraction, local=config.local)
    shifts = {}
    if config.method == "biascomp":  # weights removed before are zero: they shift nothing
        shifts = bias_shifts(weights, stats, removed, joint=config.joint)
    return sparsify(graph, layers, removed, shifts), removed, loss


DENSE_NOTE = (
    "weights are zeroed inside dense tensors: ONNX Runtime's dense kernels run no faster on this "
    "file; the saving is its compressed size (or a sparse runtime)"
)


def _config(method: str, ratio: float, options: Mapping[str, Any]) -> PruneConfig:
    width_fields = set(WidthRule.__dataclass_fields__)
    width = {k: v for k, v in options.items() if k in width_fields}
    rest = {k: v for k, v in options.items() if k not in width_fields}
    unknown = set(rest) - set(PruneConfig.__dataclass_fields__)
    if unknown:
        raise UsageError(f"unknown option(s): {', '.join(sorted(unknown))}")
    for key in ("layer_ratios", "exclude"):
        if key in width:
            width[key] = tuple(width[key])
    return PruneConfig(method=method, width=WidthRule(ratio=ratio, **width), **rest)


def _load(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        check_opset(model)
        return model
    return load_model(model)


def _fit_batch(config: PruneConfig, proto: onnx.ModelProto) -> PruneConfig:
    """`config` with the batch size the model accepts (a model with a fixed batch runs only it)."""
    batch = batch_for((spec.shape for spec in input_specs(proto)), config.batch_size)
    return config if batch == config.batch_size else replace(config, batch_size=batch)


def _extra_needs(config: PruneConfig) -> frozenset[str]:
    needs = set()
    if config.compensate != "none":
        needs.add("gram")
    return frozenset(needs)


def _dataset(
    proto: onnx.ModelProto, data: Any, labels: Any, config: PruneConfig, *, needs_data: bool
) -> Dataset:
    if isinstance(data, Dataset):
        return data
    specs = with_input_shapes(input_specs(proto), config.input_shapes)
    if data is None and (needs_data or config.compensate != "none" or config.recalibrate):
        raise UsageError(
            f"method '{config.method}' needs calibration data",
            hint="pass --data calib.npz (or --data random for a synthetic smoke test)",
        )
    return load_data(
        data,
        specs,
        labels=labels,
        samples=config.calib_samples,
        seed=config.seed,
        random_samples=config.verify_samples,
    )


def _finish(original: onnx.ModelProto, graph: gs.Graph, config: PruneConfig) -> onnx.ModelProto:
    """Export the pruned graph keeping the original's IR version, opsets and metadata."""
    model = export(graph)
    model.ir_version = original.ir_version
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, attr, getattr(original, attr))
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    amount = (
        f"sparsity={config.sparsity}"
        if config.granularity == "weight"
        else f"ratio={config.width.ratio}"
    )
    note = f"method={config.method} {amount}"
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in original.metadata_props}, "onnxprune": note}
    )
    return model


def _result(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    groups: tuple[ChannelGroup, ...],
    plans: Mapping[str, Plan],
    dataset: Dataset,
    config: PruneConfig,
    loss: str | None,
    notes: tuple[str, ...] = (),
    rows: tuple[GroupRow, ...] = (),
    sparse: Mapping[str, Any] | None = None,
) -> Result:
    check = None
    if config.verify:
        feeds = dataset.head(config.verify_samples).arrays
        check = verify(original, pruned, feeds, data=dataset.source)
    shapes = count_shapes(dataset, input_specs(original))
    before, after = count(original, input_shapes=shapes), count(pruned, input_shapes=shapes)
    rows = rows or tuple(_row(group, plans.get(group.name), config) for group in groups)
    if dataset.synthetic:
        notes += ("validation data is synthetic (random): deviations say little about accuracy",)
    bench = None
    if config.bench_batches:
        timing = benchmark(
            [original, pruned], batches=config.bench_batches, names=("original", "pruned")
        )
        bench = {"table": timing.format_table(), **timing.to_dict()}
    report = Report(
        model=original.graph.name or "model",
        method=config.method,
        options=_options(config),
        groups=rows,
        params=(before.params, after.params),
        macs=(before.macs, after.macs),
        file_size=(original.ByteSize(), pruned.ByteSize()),
        data=dataset.source,
        verification=check,
        loss=loss,
        bench=bench,
        notes=notes,
        **(sparse or {}),
    )
    return Result(pruned, report, groups, plans)


def _row(group: ChannelGroup, plan: Plan | None, config: PruneConfig) -> GroupRow:
    if plan is not None:
        status = "pruned" if len(plan.keep) < group.channels else "kept (rounding)"
        return GroupRow(group.name, group.channels, len(plan.keep), status, dict(plan.info))
    if not group.prunable:
        where = f" at '{group.blocker}'" if group.blocker else ""
        status = f"unprunable: {group.reason}{where}"
    elif group.coupled and not config.width.prune_residual:
        status = "coupled (residual/gate): pass --prune-residual to prune"
    elif group_ratio(group, config.width) is None:
        status = "excluded"
    else:
        status = "kept"
    return GroupRow(group.name, group.channels, group.channels, status)


def _options(config: PruneConfig) -> dict[str, Any]:
    width = config.width
    plain = replace(width, recipe=dict(width.recipe))
    return {**{k: v for k, v in vars(config).items() if k != "width"}, **vars(plain)}


def output_path_for(model_path: str | os.PathLike) -> Path:
    """Default output: `model.pruned.onnx` next to the input."""
    path = Path(model_path)
    return path.with_name(f"{path.stem}.pruned.onnx")
