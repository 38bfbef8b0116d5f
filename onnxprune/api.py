"""The Python API: `prune()` and `analyze()`, each a short composition of the stages.

load → normalize → analyze → calibrate → plan → rewrite → verify/measure → Report
"""

from __future__ import annotations

import gc
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.budget import Widths, choose_widths, refine_widths, streams_note, unfolded
from onnxprune.calib.data import (
    Dataset,
    batch_for,
    count_shapes,
    input_specs,
    inputs_without_sample_axis,
)
from onnxprune.calib.gather import gather, gather_norms, gather_weights
from onnxprune.calib.row_mask import row_mask_input
from onnxprune.calib.split import DataInputs, Split, split_inputs
from onnxprune.calib.stats import one_blas_thread
from onnxprune.config import PruneConfig
from onnxprune.deploy.quantize import quantize
from onnxprune.errors import NothingToPruneError, RejectedError, UsageError
from onnxprune.graph.analyze import analyze as find_groups
from onnxprune.graph.external import materialized
from onnxprune.graph.fused import merge_constant_adds
from onnxprune.graph.groups import ChannelGroup
from onnxprune.graph.layernorm import fold_embedding_matmuls, to_rmsnorm
from onnxprune.graph.load import (
    Loaded,
    drop_mapped_pages,
    export,
    load_with_layout,
    model_bytes,
    normalize,
    save_model,
    too_large_for_protobuf,
    upgraded,
    weightless_export,
)
from onnxprune.graph.quantized import dequantized_weights, quantized_message
from onnxprune.graph.reshare import reshared
from onnxprune.graph.rewrite import rewrite
from onnxprune.graph.sparsify import (
    deflated_size,
    layer_weights,
    selected_layers,
    sparsify,
    weight_layers,
    zero_count,
)
from onnxprune.graph.unbatched import with_sample_axis, without_sample_axis
from onnxprune.measure.cost import count
from onnxprune.measure.latency import benchmark
from onnxprune.measure.verify import Verification, deviation_warning, shortfalls, verify
from onnxprune.methods import build_method
from onnxprune.methods.cob import unrotated_note
from onnxprune.methods.planner import make_plans
from onnxprune.methods.sparse import bias_shifts, choose_removed, weight_needs, weight_scores
from onnxprune.methods.width import group_ratio, kept
from onnxprune.options import WidthRule
from onnxprune.plan import Plan
from onnxprune.recalibrate import recalibrate, reference_tensors
from onnxprune.recover.hints import hints_from_plans
from onnxprune.report import GroupRow, Report, TargetResult
from onnxprune.sequential import refit
from onnxprune.within_heads import prune_within_heads

ModelLike = str | os.PathLike | onnx.ModelProto
DataLike = str | os.PathLike | Mapping[str, np.ndarray] | Dataset


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
    quantized: tuple[str, ...] = ()  # weight layers behind DequantizeLinear (graph/quantized.py)
    # (weight, readers) read by several Conv/Gemm/MatMul nodes that pruning would cut apart:
    # readers in different groups, one of them prunable (graph/shared.py joins the groups of a
    # detector's head, shared by the pyramid levels, where it can)
    shared: tuple[tuple[str, int], ...] = ()


def analyze(
    model: ModelLike, *, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> Analysis:
    """Channel groups of `model` (prunable or with the reason why not) and its cost.

    A group's MACs are those of the nodes whose work scales with its width: producers,
    passthrough ops and consumers. They are counted with the symbolic input dims set to
    `input_shapes` (1 where not given).
    """
    graph = normalize(_load(model).model)
    groups = find_groups(graph)
    exported = weightless_export(graph)
    cost = count(exported, input_shapes=dict(input_shapes or {}))
    macs = {node.name: node.macs for node in cost.per_node}
    group_macs = {
        g.name: sum(macs.get(n, 0) for n in {*g.producers, *g.passthrough, *g.consumers})
        for g in groups
    }
    shared = _copied_weights(groups, _shared_weights(exported))
    return Analysis(
        groups, cost.params, cost.macs, group_macs, cost.unknown, dequantized_weights(graph),
        shared,
    )  # fmt: skip


def prune(
    model: ModelLike,
    *,
    method: str | None = None,
    ratio: float | None = None,
    data: DataLike | None = None,
    labels: str | os.PathLike | np.ndarray | None = None,
    verify_data: DataLike | None = None,
    config: PruneConfig | None = None,
    **options: Any,
) -> Result:
    """Prune `model` with `method`, removing `ratio` of the channels of every prunable group.

    `data` is calibration data (npz/npy path, image folder, dict of arrays, a Dataset, or None
    for seeded random inputs used only to verify). Other options are PruneConfig fields, or
    WidthRule fields (`layer_ratios`, `exclude`, `round_to`, `prune_residual`, `recipe`); or
    pass a whole `config` instead (not both). The result is verified on `verify_data` or else on
    a held-out share of `data` (`holdout`) that the fit never sees.

    Raises RejectedError (with the result attached) when verification misses `min_agreement`
    or `max_deviation`.
    """
    config = _resolve_config(config, method, ratio, options)
    loaded = _load(model)
    unbatched = inputs_without_sample_axis(loaded.model, data)
    proto = with_sample_axis(loaded.model, unbatched) if unbatched else loaded.model
    config = _fit_batch(config, proto)
    run = _prune_weights if config.granularity == "weight" else _prune_channels
    # the graph is not held here, so that the stage that runs can drop it once it is done
    result = run(proto, _normalized(proto), DataInputs(data, labels, verify_data), config)
    notes = (*loaded.notes(), *_unbatched_note(unbatched), *result.report.notes,
             *_copies_note(loaded.model, result.model))  # fmt: skip
    report = replace(result.report, notes=notes)
    if unbatched:
        result = replace(result, model=without_sample_axis(result.model, loaded.model))
    external = loaded.external or too_large_for_protobuf(result.model)
    result = replace(result, report=report, external_data=external)
    _accept(result, config)
    return result


def _unbatched_note(names: Sequence[str]) -> tuple[str, ...]:
    """The report's note on inputs without a sample axis (graph/unbatched.py)."""
    if not names:
        return ()
    quoted = ", ".join(f"'{n}'" for n in names)
    return (
        f"input {quoted} has no sample axis (the data's axis 0 is one more): the samples ran one "
        "at a time; the pruned model takes its input as the original does",
    )


_WEIGHT_LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _shared_weights(model: onnx.ModelProto) -> dict[str, list[tuple[str, int]]]:
    """The weights (inputs 0 and 1, not biases) that several Conv/Gemm/MatMul nodes read, with
    each (node, input index) that reads them. Not biases: torch's exporter merges equal
    initializers, and zero-initialised biases then share one; not the shape constants normalize
    copies per reader on purpose."""
    weights = {t.name for t in model.graph.initializer}
    readers: dict[str, list[tuple[str, int]]] = {}
    for node in (n for n in model.graph.node if n.op_type in _WEIGHT_LAYERS):
        for index, name in enumerate(node.input[:2]):
            if name in weights:
                readers.setdefault(name, []).append((node.name, index))
    return {name: read for name, read in readers.items() if len(read) > 1}


def _copied_weights(
    groups: Sequence[ChannelGroup], shared: Mapping[str, list[tuple[str, int]]]
) -> tuple[tuple[str, int], ...]:
    """The shared weights (name, readers) that pruning cuts apart: the prunable groups do not
    edit every reader's weight alike (the same groups, in the same roles)."""
    cuts: dict[tuple[str, int], set[tuple[str, str]]] = defaultdict(set)
    for g in (g for g in groups if g.prunable):
        for e in (e for e in g.edits if e.role in ("out", "in")):
            cuts[(e.node, e.input)].add((g.name, e.role))
    return tuple(
        (name, len(read))
        for name, read in shared.items()
        if len({frozenset(cuts[r]) for r in read}) > 1
    )


def _copies_note(original: onnx.ModelProto, pruned: onnx.ModelProto) -> tuple[str, ...]:
    """A note naming the initializers that several nodes of `original` read and that the pruned
    model reads as separate copies: the groups were pruned one reader at a time (RetinaNet's and
    FCOS's heads, shared by every pyramid level), so its parameters can grow."""
    now = {node.name: node.input for node in pruned.graph.node}
    copied = {
        name: len(read)
        for name, read in _shared_weights(original).items()
        if len({now[n][i] for n, i in read if n in now and i < len(now[n])}) > 1
    }
    if not copied:
        return ()
    name, count = next(iter(copied.items()))
    return (
        f"{len(copied)} weight(s) that several nodes share were pruned per node and are now "
        f"separate copies (e.g. '{name}', read by {count} nodes), so parameters and file size "
        "can grow: each reader kept its own channels or correction (copies that came out equal "
        "are shared again); exclude their groups to keep such a weight whole",
    )


def _normalized(proto: onnx.ModelProto) -> gs.Graph:
    """`normalize(proto)`, then a cycle collection: the graphs that normalize (and later
    rewrite) replace are reference cycles (nodes ↔ tensors) holding copies of the weights; only
    the cycle collector frees them, and it runs by object counts, not bytes (collecting here cut
    ResNet-50's peak RSS by 120 MB)."""
    graph = normalize(proto)
    gc.collect()
    return graph


def _prune_channels(
    proto: onnx.ModelProto, graph: gs.Graph, inputs: DataInputs, config: PruneConfig
) -> Result:
    """Channel pruning: analyze, choose widths, calibrate on the fit split, plan, rewrite."""
    config = replace(config, row_mask=row_mask_input(proto, config.row_mask))
    graph, config, notes = _streams_for_cob(graph, config)
    groups = find_groups(graph)
    widths = choose_widths(graph, groups, config)
    split, head_rows = None, ()
    if config.heads != "whole":
        split = split_inputs(proto, inputs, config, fitted=True)
        graph, groups, widths, head_rows = _within_heads(graph, groups, widths, split.fit, config)
    if not widths.counts and not head_rows and not config.allow_noop:
        _refuse_quantized(graph, groups)
        raise NothingToPruneError(
            "nothing to prune: no channel group is both prunable and selected",
            hint="run `onnxprune analyze MODEL` to see why; --allow-noop accepts this",
        )
    pruner = build_method(
        config.method,
        norm=config.norm,
        criterion=config.criterion or "folded",
        compensate=config.compensate,
        id_solver=config.id_solver,
        ippro_lambda=config.ippro_lambda,
        threshold=config.threshold_rule(),
        rms_correction=config.rms_correction,
        joint=config.joint,
    )
    needs = pruner.needs | _extra_needs(config, groups, inputs.data)
    fitted = bool(needs - {"weights"}) or config.recalibrate or config.quantize == "int8"
    fitted = fitted or config.finetune_steps > 0
    split = split or split_inputs(proto, inputs, config, fitted=fitted)
    fit = split.fit
    calibrated = widths.calibrated()
    moments = reference_tensors(graph, groups, calibrated) if config.recalibrate else {}
    # the statistics pass also gives the original's outputs for verification, unless the graph
    # it runs is no longer the original's function (heads narrowed by --heads dims|both)
    reference = split.verify.arrays if config.verify and not head_rows else None
    calibration = gather(
        graph, groups, calibrated, needs, fit, config, moments=moments, reference=reference
    )
    with one_blas_thread():  # on busy cores OpenBLAS threads spin (calib/stats.py)
        widths = refine_widths(graph, groups, widths, calibration.stats, pruner, config, fit)
        stats = calibration.stats if config.cv_maps else unfolded(calibration.stats)
        plans = make_plans(groups, widths.counts, stats, pruner, config)
    # the tap statistics (float64 Grams, up to width² per tap: 285 MB on ResNet-50) are spent
    # once planned; the refit, recalibration and verification sessions come next
    loss, outputs, measured = calibration.loss, calibration.outputs, calibration.moments
    del calibration, stats
    drop_mapped_pages(graph)
    notes += streams_note(groups, widths, config)
    batches = lambda: (b.feeds for b in fit.batches(config.batch_size))  # noqa: E731
    if config.sequential:
        free_map = config.method == "id" or config.compensate == "lsq"
        plans, refit_notes = refit(graph, groups, plans, batches, free_map=free_map,
                                   exact_borders=config.exact_borders,
                                   row_mask=config.row_mask)  # fmt: skip
        notes += refit_notes
    with one_blas_thread():  # its folds multiply maps into weights (0.8 → 0.5 CPU s on ResNet-50)
        pruned_graph = rewrite(graph, groups, plans, exact_borders=config.exact_borders)
    drop_mapped_pages(graph)  # the rewrite read the weights it selected from
    gc.collect()  # the graphs normalize and rewrite replaced: see prune
    notes += (widths.note,) if widths.note else ()
    notes += unrotated_note(groups, plans) if config.method == "cob" else ()
    if config.recalibrate and (head_rows or _removes_channels(groups, plans)):
        pruned_graph, layers = recalibrate(
            partial(export, graph), pruned_graph, groups, plans, batches,
            reference=measured,
        )  # fmt: skip
        notes += (f"recalibrated the output mean and variance of {layers} layers",)
    pruned = _finish(proto, pruned_graph, config)
    # both graphs hold the weights (the pruned one shares the unchanged arrays): free them
    # before the fine-tuning and verification sessions, which hold the weights again
    del graph, pruned_graph, measured
    gc.collect()
    pruned, notes = _finetuned(proto, pruned, split.fit, config, notes, (groups, plans))
    pruned = _quantized(pruned, split.fit, config)
    within = {row.name for row in head_rows} if config.heads == "dims" else set()
    rows = head_rows + tuple(
        _row(group, plans.get(group.name), config) for group in groups if group.name not in within
    )
    report = _report(
        proto, pruned, split, config, loss, notes, rows, widths.target, reference=outputs,
    )  # fmt: skip
    return Result(pruned, report, groups, plans)


def _removes_channels(groups: Sequence[ChannelGroup], plans: Mapping[str, Plan]) -> bool:
    """True when some plan removes channels: with none removed (ratio 0) recalibration would
    only round every layer's weights differently (and copies of a shared weight apart)."""
    return any(len(plans[g.name].keep) < g.channels for g in groups if g.name in plans)


def _within_heads(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    widths: Widths,
    fit: Dataset,
    config: PruneConfig,
) -> tuple[gs.Graph, tuple[ChannelGroup, ...], Widths, tuple[GroupRow, ...]]:
    """`--heads dims|both`: each selected head group keeps its ratio's share of every head's
    value dims and `qk_ratio`'s (default: the same) of its query/key dims (within_heads.py).
    The narrowed graph is analyzed again; with `dims` its head groups then leave the channel
    pipeline, with `both` it removes whole heads of them as well."""
    dims = {}
    for group in (g for g in groups if g.heads and g.name in widths.counts):
        ratio = group_ratio(group, config.width)
        qk_ratio = ratio if config.qk_ratio is None else config.qk_ratio
        dims[group.name] = tuple(
            kept(group.head_dim, r, config.width.round_to) for r in (qk_ratio, ratio)
        )
    batches = (batch.feeds for batch in fit.batches(config.batch_size))
    graph, rows = prune_within_heads(
        graph, groups, dims, batches, values=config.head_values, row_mask=config.row_mask
    )
    groups = find_groups(graph)
    widths = choose_widths(graph, groups, config)
    if config.heads == "dims":
        widths = replace(widths, counts={n: k for n, k in widths.counts.items() if n not in dims})
    return graph, groups, widths, rows


def _streams_for_cob(
    graph: gs.Graph, config: PruneConfig
) -> tuple[gs.Graph, PruneConfig, tuple[str, ...]]:
    """For cob, LayerNorms become RMSNorms on mean-free streams (graph/layernorm.py), exactly,
    so the residual streams through them can be rotated and sliced (SliceGPT). Those streams
    are coupled groups: they are pruned as with `prune_residual`."""
    if config.method != "cob":
        return graph, config, ()
    conversion = to_rmsnorm(graph)
    notes = ()
    if conversion.kept:
        name, why = conversion.kept[0]
        notes = (f"cob: {len(conversion.kept)} LayerNorm(s) stay, their streams unsliced, "
                 f"e.g. '{name}': {why}",)  # fmt: skip
    if not conversion.converted:
        return graph, config, notes
    width = replace(config.width, prune_residual=True)
    counts = (len(conversion.centred), len(conversion.converted) - len(conversion.centred))
    parts = ("LayerNorm(s) turned into RMSNorms on mean-free streams",
             "RMSNorm(s) with γ folded into their readers")  # fmt: skip
    done = ", ".join(f"{n} {part}" for n, part in zip(counts, parts, strict=True) if n)
    note = f"cob: {done}; the residual streams are rotated and sliced"
    return conversion.graph, replace(config, width=width), (note, *notes)


def _refuse_quantized(graph: gs.Graph, groups: tuple[ChannelGroup, ...]) -> None:
    """Nothing to prune because the weights are quantized: say so (NothingToPruneError)."""
    nodes = dequantized_weights(graph)
    if nodes and not any(g.prunable for g in groups):
        raise NothingToPruneError(f"nothing to prune: {quantized_message(nodes)}")


def _prune_weights(
    proto: onnx.ModelProto, graph: gs.Graph, inputs: DataInputs, config: PruneConfig
) -> Result:
    """Per weight (METHODS.md §2.1): score, zero the lowest `sparsity` fraction, shift biases,
    in `config.steps` rounds (geometric schedule) with statistics refreshed after each."""
    layers = selected_layers(graph, config.width.exclude)
    if not layers:
        _refuse_quantized(graph, ())
        raise NothingToPruneError(
            "nothing to prune: no Gemm/MatMul/Conv with a constant weight"
            + (" that --exclude leaves" if config.width.exclude else "")
        )
    needs = weight_needs(config.method, config.compensate)
    split = split_inputs(proto, inputs, config, fitted=bool(needs) or config.quantize == "int8")
    pruned_graph, removed, loss = graph, {}, None
    for step in range(1, config.steps + 1):
        fraction = 1 - (1 - config.sparsity) ** (step / config.steps)
        pruned_graph, removed, loss = _sparsify_step(
            pruned_graph, removed, fraction, needs, split.fit, config
        )
    pruned = _quantized(_finish(proto, pruned_graph, config), split.fit, config)
    rows = tuple(
        GroupRow(n, m.size, int(m.size - m.sum()), "sparsified", {"sparsity": float(m.mean())})
        for n, m in removed.items()
    )
    every = weight_layers(graph)  # excluded layers count as kept weights
    zeros = (zero_count(graph, every), zero_count(gs.import_onnx(pruned), every))
    sparse = {
        "unit": "weights",
        "nonzero_weights": tuple(total - zero for zero, total in zeros),
        "zipped_size": (deflated_size(materialized(proto)), deflated_size(pruned)),
    }
    report = _report(proto, pruned, split, config, loss, (DENSE_NOTE,), rows, None, sparse)
    return Result(pruned, report, (), {})


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
    layers = selected_layers(graph, config.width.exclude)
    stats, grads, loss = gather_weights(graph, layers, needs, dataset, config)
    norms = gather_norms(graph, layers, dataset, config) if "norms" in needs else None
    weights = layer_weights(graph, layers)
    scores = weight_scores(config.method, weights, stats, grads, norms=norms, seed=config.seed)
    scores = {n: np.where(before[n], -np.inf, s) if n in before else s for n, s in scores.items()}
    removed = choose_removed(scores, fraction, scope=config.weight_scope())
    shifts = {}
    if "jacobian" in needs:  # weights removed before are zero: they shift nothing
        shifts = bias_shifts(weights, stats, removed, joint=config.joint)
    return sparsify(graph, layers, removed, shifts), removed, loss


DENSE_NOTE = (
    "weights are zeroed inside dense tensors: ONNX Runtime's dense kernels run no faster on this "
    "file; the saving is its compressed size (or a sparse runtime)"
)


def _resolve_config(
    config: PruneConfig | None,
    method: str | None,
    ratio: float | None,
    options: Mapping[str, Any],
) -> PruneConfig:
    """`config` as given, or one built from the keywords; both at once is refused, since a
    keyword silently losing to the config (or the reverse) would prune something else."""
    if config is None:
        return _config(method, ratio, options)
    given = [k for k, v in (("method", method), ("ratio", ratio)) if v is not None]
    if given or options:
        names = ", ".join([*given, *sorted(options)])
        raise UsageError(
            f"prune() got both config and option keywords ({names}); pass one or the other",
            hint="dataclasses.replace(config, ...) makes a changed copy of a PruneConfig",
        )
    return config


def _config(method: str | None, ratio: float | None, options: Mapping[str, Any]) -> PruneConfig:
    """A PruneConfig from keywords: WidthRule fields go to `width`, the rest to the config."""
    width_fields = set(WidthRule.__dataclass_fields__)
    width = {k: v for k, v in options.items() if k in width_fields}
    rest = {k: v for k, v in options.items() if k not in width_fields}
    unknown = set(rest) - set(PruneConfig.__dataclass_fields__) | ({"width"} & set(rest))
    if unknown:
        raise UsageError(f"unknown option(s): {', '.join(sorted(unknown))}")
    for key in ("layer_ratios", "exclude"):
        if key in width:
            width[key] = tuple(width[key])
    if ratio is not None:
        width["ratio"] = ratio
    if method is not None:
        rest["method"] = method
    return PruneConfig(width=WidthRule(**width), **rest)


def _load(model: ModelLike) -> Loaded:
    """The model (at a supported opset), whether its file keeps weights in external data
    (False for a proto), and the opset it was converted from."""
    if isinstance(model, onnx.ModelProto):
        return upgraded(model)
    return load_with_layout(model, mapped=True)


def _fit_batch(config: PruneConfig, proto: onnx.ModelProto) -> PruneConfig:
    """`config` with the batch size the model accepts (a model with a fixed batch runs only it)."""
    batch = batch_for((spec.shape for spec in input_specs(proto)), config.batch_size)
    return config if batch == config.batch_size else replace(config, batch_size=batch)


def _extra_needs(
    config: PruneConfig, groups: tuple[ChannelGroup, ...], data: object
) -> frozenset[str]:
    """Statistics the method does not ask for but compensation or the RMSNorm divisor
    correction (methods/planner.divisor_corrected, with real data) reads."""
    needs = set()
    if config.compensate != "none":
        needs.add("gram")
    normalized = any(g.normalized for g in groups if g.prunable)
    if normalized and data is not None and config.method != "cob":
        needs.add("gram")
    return frozenset(needs)


def _finish(original: onnx.ModelProto, graph: gs.Graph, config: PruneConfig) -> onnx.ModelProto:
    """Export the pruned graph keeping the original's IR version, opsets and metadata.

    Intermediate shapes (`value_info`) are written only when the original had them: they
    change which fusions ONNX Runtime applies (MiniLM without them, as exported, ran 13 %
    faster on CPU than with the complete shapes, which enable its slower SkipLayerNorm fusion),
    so a pruned model keeps the runtime behaviour its input had. A correction's shift Add after
    a MatMul merges into the bias Add after it (the pattern ONNX Runtime's optimizer fuses)."""
    merge_constant_adds(graph)
    fold_embedding_matmuls(graph)
    model = export(graph)
    if not original.graph.value_info:
        del model.graph.value_info[:]
    model.ir_version = original.ir_version
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, attr, getattr(original, attr))
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    amount = (
        f"sparsity={config.sparsity} scope={config.weight_scope()}"
        if config.granularity == "weight"
        else f"ratio={config.width.ratio}"
    )
    note = f"method={config.method} {amount}"
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in original.metadata_props}, "onnxprune": note}
    )
    # weights the pruning left unchanged may still be mapped from the input's data file: a
    # model that protobuf can hold gets their bytes (a self-contained result), and the copies
    # of a shared weight that came out equal are one again; past its limit they stay mapped,
    # and saving streams them from the input's file
    return model if too_large_for_protobuf(model) else reshared(original, materialized(model))


def _finetuned(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    fit: Dataset,
    config: PruneConfig,
    notes: tuple[str, ...],
    pruning: tuple[Sequence[ChannelGroup], Mapping[str, Plan]] | None = None,
) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """`pruned` fine-tuned by distillation from `original` on the fit split only (so that
    verification stays on samples it never saw), with a note on what it did. With `pruning`
    (the groups and their plans) the pruned taps are matched to the original's kept channels
    too (`recover.hints`)."""
    if not config.finetune_steps:
        return pruned, notes
    from onnxprune.recover.finetune import LR, finetune  # lazy: imports torch

    hints = ()
    if pruning is not None:
        outputs = [o.name for o in pruned.graph.output]
        hints = hints_from_plans(*pruning, skip=outputs)
    result = finetune(
        pruned,
        original,
        fit,
        steps=config.finetune_steps,
        lr=LR if config.finetune_lr is None else config.finetune_lr,
        batch_size=config.batch_size,
        seed=config.seed,
        hints=hints,
        row_mask=config.row_mask,
    )
    note = (
        f"fine-tuned by distillation: {result.steps_run} steps ({result.stopped}), weights of "
        f"step {result.best_step}, held-out loss {result.initial_loss:.4g} → {result.best_loss:.4g}"
    )
    if hints:
        note += f"; {len(hints)} inner tensors matched to the original's kept channels"
    if fit.synthetic:
        note += "; on random data: distillation on noise says little about real inputs"
    return result.model, (*notes, note)


def _quantized(pruned: onnx.ModelProto, fit: Dataset, config: PruneConfig) -> onnx.ModelProto:
    """The pruned model quantized as `config.quantize` asks (int8: calibrated on the fit split,
    so verification still compares on samples the calibration never saw)."""
    if config.quantize is None:
        return pruned
    return quantize(
        pruned,
        config.quantize,
        data=fit,
        exclude=config.quantize_exclude,
        float_ends=config.quantize_float_ends,
        batch_size=config.batch_size,
    )


def _report(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    split: Split,
    config: PruneConfig,
    loss: str | None,
    notes: tuple[str, ...],
    rows: tuple[GroupRow, ...],
    target: TargetResult | None,
    sparse: Mapping[str, Any] | None = None,
    *,
    reference: Mapping[str, np.ndarray] | None = None,
) -> Report:
    """Verify `pruned` on the verification split (against the original's outputs `reference`
    where the statistics pass computed them), count both models, collect the warnings."""
    check = _verification(original, pruned, split, config, reference)
    shapes = count_shapes(split.fit, input_specs(original))
    before, after = count(original, input_shapes=shapes), count(pruned, input_shapes=shapes)
    if split.fit.synthetic:
        notes += ("validation data is synthetic (random): deviations say little about accuracy",)
    bench = None
    if config.bench_batches:
        timing = benchmark(
            [original, pruned], batches=config.bench_batches, names=("original", "pruned")
        )
        bench = {"table": timing.format_table(), **timing.to_dict()}
    found = (target.warning() if target else None, deviation_warning(check) if check else None)
    warnings = tuple(w for w in found if w)
    return Report(
        model=original.graph.name or "model",
        method=config.method,
        options=_options(config),
        groups=rows,
        params=(before.params, after.params),
        macs=(before.macs, after.macs),
        file_size=(model_bytes(original), model_bytes(pruned)),
        data=split.fit.source,
        verification=check,
        loss=loss,
        bench=bench,
        notes=notes,
        warnings=warnings,
        target=target,
        **(sparse or {}),
    )


def _verification(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    split: Split,
    config: PruneConfig,
    reference: Mapping[str, np.ndarray] | None = None,
) -> Verification | None:
    """Checker and output deviation on the verification samples (None with verify off)."""
    if not config.verify:
        return None
    feeds, source = split.verify.arrays, split.verify.source
    check = verify(original, pruned, feeds, data=source, reference=reference or None)
    return replace(check, split=split.how, independent=split.independent)


def _accept(result: Result, config: PruneConfig) -> None:
    """Raise RejectedError if verification misses `min_agreement` or `max_deviation`."""
    check = result.report.verification
    if check is None:
        return
    misses = shortfalls(check, min_agreement=config.min_agreement, max_rel_l2=config.max_deviation)
    if misses:
        raise RejectedError(
            f"verification failed on {check.samples} samples: {'; '.join(misses)}",
            result=result,
            hint="prune less or use a correcting method (id, --compensate); "
            "--keep-rejected writes the model anyway",
        )


def _row(group: ChannelGroup, plan: Plan | None, config: PruneConfig) -> GroupRow:
    if plan is not None:
        status = "pruned" if len(plan.keep) < group.channels else "kept (rounding)"
        info = {k: v for k, v in plan.info.items() if k not in ("err", "err/opt")}
        errors = plan.info.get("err"), plan.info.get("err/opt")
        return GroupRow(group.name, group.channels, len(plan.keep), status, info, *errors)
    if not group.prunable:
        where = f" at '{group.blocker}'" if group.blocker else ""
        status = f"unprunable: {group.reason}{where}"
    elif group.coupled and not config.width.prune_residual:
        status = "coupled (residual stream): pass --prune-residual to prune"
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
