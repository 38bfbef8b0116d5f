"""Rewrite channels-last flattens before a dense layer as channel-major ones.

Keras flattens a feature map in its own (NHWC) order, so tf2onnx writes `Flatten()` → `Dense` on
an NCHW graph as Transpose(0, 2, 3, 1) → Reshape(N, H·W·C) → MatMul: channel c lands on every
C-th feature, interleaved with the others, which no channel group can follow. Permuting the
dense weight's rows to channel-major order (row c·H·W + p takes row p·C + c) and reading the
Reshape from the Transpose's input computes the same product, only summed in another order; the
result is the channel-major flatten every handler already understands (ops/reshape.py). Any
rank (Conv1D's (N, C, L) alike) with a static C and spatial dims; the dense layers reading the
flattened features must all be MatMul or Gemm (A not transposed) with a constant 2-D weight.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.reshape import flattens_to_batch


def flatten_channels_first(graph: gs.Graph) -> None:
    """Rewrite every channels-last flatten read only by dense layers (module docstring) in
    place (the Transposes are left for `cleanup`)."""
    for node in list(graph.nodes):
        found = _flatten_after(node, graph)
        if found is None:
            continue
        flatten, dims = found
        order = _channel_major_order(dims)
        for dense in flatten.outputs[0].outputs:
            axis = 1 if dense.op == "Gemm" and dense.attrs.get("transB", 0) else 0
            weight = dense.inputs[1]
            values = np.take(np.asarray(weight.values), order, axis=axis)
            dense.inputs[1] = gs.Constant(f"{weight.name}.channels_first", values)
        flatten.inputs[0] = node.inputs[0]


def _flatten_after(node: gs.Node, graph: gs.Graph) -> tuple[gs.Node, list[int]] | None:
    """The Reshape/Flatten after Transpose `node` and the channel-major dims (C, spatial...)
    when the two flatten channels last into dense layers only, else None."""
    shape = node.inputs[0].shape if node.op == "Transpose" else None
    if shape is None or len(shape) < 3 or len(node.outputs[0].outputs) != 1:
        return None
    rank, dims = len(shape), list(shape[1:])
    if list(node.attrs.get("perm", [])) != [0, *range(2, rank), 1]:
        return None
    if not all(isinstance(d, int) for d in dims) or node.outputs[0] in graph.outputs:
        return None
    flatten = node.outputs[0].outputs[0]
    if not _flattens_features(flatten, shape[0], math.prod(dims)):
        return None
    out = flatten.outputs[0]
    if out in graph.outputs or not out.outputs:
        return None
    if not all(_dense_reader(dense, out, math.prod(dims)) for dense in out.outputs):
        return None
    return flatten, dims


def _flattens_features(node: gs.Node, batch: object, features: int) -> bool:
    """True when `node` flattens its input to (batch, features): Flatten(axis 1), or a Reshape
    to a constant target that provably keeps the batch (`flattens_to_batch`)."""
    if node.op == "Flatten":
        return node.attrs.get("axis", 1) == 1
    target = node.inputs[1] if node.op == "Reshape" else None
    if not isinstance(target, gs.Constant):
        return False
    values = [int(v) for v in np.asarray(target.values).reshape(-1)]
    return len(values) == 2 and flattens_to_batch(node, batch, values, features)


def _dense_reader(node: gs.Node, flat: gs.Tensor, features: int) -> bool:
    """True when `node` multiplies `flat` (its first input) by a constant 2-D weight whose
    `features` input rows a permutation can reorder."""
    if node.op not in ("MatMul", "Gemm") or node.inputs[0] is not flat:
        return False
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(weight, gs.Constant) or len(weight.shape) != 2:
        return False
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return False
    axis = 1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0
    return weight.shape[axis] == features


def _channel_major_order(dims: list[int]) -> np.ndarray:
    """Row of the channels-last weight that each channel-major feature reads: feature
    c·P + p (P spatial positions) was feature p·C + c."""
    channels, positions = dims[0], math.prod(dims[1:])
    return (np.arange(positions)[None, :] * channels + np.arange(channels)[:, None]).reshape(-1)
