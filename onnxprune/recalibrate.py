"""Restore each affected layer's per-channel output mean and variance after pruning.

What re-estimating BatchNorm statistics does in PyTorch, done on the folded graph: for every
Conv/Gemm/MatMul that lost input channels, in topological order, its outputs are mapped by a
per-channel affine y ← (y − μ')·σ/σ' + μ so that on the calibration data they have the original
model's mean μ and standard deviation σ again; the affine is folded into its weights and bias (a
MatMul's shift into the Add after it). Channels are axis 1 of a Conv/Gemm output and the last
axis of a MatMul's (a transformer's Linear on (batch, sequence, features)). Label-free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.calib.stats import channel_moments
from onnxprune.graph.groups import ChannelGroup
from onnxprune.graph.load import export
from onnxprune.graph.rewrite import affine_outputs, shift_node
from onnxprune.methods.base import Plan

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]
_AFFINE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def recalibrate(
    original: onnx.ModelProto,
    pruned: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    plans: Mapping[str, Plan],
    batches: Batches,
) -> tuple[gs.Graph, int]:
    """Recalibrate `pruned` in place against `original`; returns it and the layers adjusted."""
    targets = _targets(pruned, groups, plans)
    if not targets:
        return pruned, 0
    reference = channel_moments(original, {t: axis for _, t, axis, _ in targets}, batches())
    for name, tensor, axis, keep in targets:
        mean, var = (values[keep] for values in reference[tensor])
        now_mean, now_var = channel_moments(export(pruned), {tensor: axis}, batches())[tensor]
        scale = np.ones_like(var)
        live = now_var > 1e-12 * max(float(now_var.max()), 1e-30)
        scale[live] = np.sqrt(var[live] / now_var[live])
        affine_outputs(pruned, name, scale, mean - scale * now_mean)
    return pruned, len(targets)


def _targets(
    pruned: gs.Graph, groups: tuple[ChannelGroup, ...], plans: Mapping[str, Plan]
) -> list[tuple[str, str, int, np.ndarray]]:
    """(node, output tensor, its channel axis, original indices of its kept outputs) for every
    affected layer (a MatMul only with a 2-D weight, whose columns are its output channels)."""
    consumers = {c for g in groups if g.name in plans for c in g.consumers}
    found = []
    for node in pruned.nodes:
        if node.name in consumers and node.op in _AFFINE_OPS:
            if node.op == "MatMul" and np.ndim(node.inputs[1].values) != 2:
                continue
            keep = _kept_outputs(node, groups, plans)
            output = (shift_node(pruned, node) or node).outputs[0].name
            found.append((node.name, output, -1 if node.op == "MatMul" else 1, keep))
    return found


def _kept_outputs(
    node: gs.Node, groups: tuple[ChannelGroup, ...], plans: Mapping[str, Plan]
) -> np.ndarray:
    """Original indices of pruned `node`'s outputs, over every group they belong to (several
    where a Split cut them)."""
    owners = [g for g in groups if g.name in plans and node.name in g.producers]
    removed = sum(g.channels - len(plans[g.name].keep) for g in owners)
    kept = np.arange(_out_width(node) + removed)
    for group in sorted(owners, key=lambda g: -g.first_row(node.name)):
        lo = group.first_row(node.name)
        segment = kept[lo : lo + group.channels][np.asarray(plans[group.name].keep)]
        kept = np.concatenate([kept[:lo], segment, kept[lo + group.channels :]])
    return kept


def _out_width(node: gs.Node) -> int:
    weight = node.inputs[1].values
    if node.op == "ConvTranspose":
        return int(weight.shape[1] * node.attrs.get("group", 1))
    if node.op == "Gemm":
        return int(weight.shape[0] if node.attrs.get("transB", 0) else weight.shape[1])
    if node.op == "MatMul":
        return int(weight.shape[1])
    return int(weight.shape[0])
