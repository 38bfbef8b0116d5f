"""Per-weight (unstructured) pruning on the graph: find weight layers, zero weights, shift biases.

The weights stay dense tensors with zeros in them, so the file has as many parameters as before:
it compresses better (zip/deflate), but ONNX Runtime's dense kernels run no faster on it.
Layers are Gemm (transA = 0), MatMul with a constant right operand, and 2-D Conv with group = 1,
each with its weight in one canonical layout: (out, in) or (out, in, kh, kw), alpha included.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.graph.load import infer_shapes
from onnxprune.graph.rewrite import add_bias


@dataclass(frozen=True)
class WeightLayer:
    """A node whose constant weight can be sparsified, and the tensors around it.

    `input` is the activation it reads, `output` its pre-activation z (channel axis `out_axis`);
    `conv` holds (kernel, strides, pads, dilations) for Conv, else None.
    """

    name: str
    op: str
    weight: str
    input: str
    output: str
    out_axis: int
    shape: tuple[int, ...]
    conv: tuple[tuple[int, ...], ...] | None = None


def weight_layers(graph: gs.Graph) -> tuple[WeightLayer, ...]:
    """Every Gemm/MatMul/Conv of `graph` whose weight is a constant, in graph order."""
    found = []
    for node in graph.nodes:
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        if not isinstance(node.inputs[0], gs.Variable):
            continue
        layer = _layer(node)
        if layer is not None:
            found.append(layer)
    return tuple(found)


def selected_layers(graph: gs.Graph, exclude: tuple[str, ...] = ()) -> tuple[WeightLayer, ...]:
    """`weight_layers` less those whose node name matches an `exclude` regular expression
    (--exclude: e.g. a patch embedding or a classifier kept dense)."""
    return tuple(
        layer
        for layer in weight_layers(graph)
        if not any(re.search(pattern, layer.name) for pattern in exclude)
    )


def _layer(node: gs.Node) -> WeightLayer | None:
    value = np.asarray(node.inputs[1].values)
    names = dict(
        name=node.name,
        op=node.op,
        weight=node.inputs[1].name,
        input=node.inputs[0].name,
        output=node.outputs[0].name,
    )
    if node.op == "Gemm" and not node.attrs.get("transA", 0) and value.ndim == 2:
        shape = value.shape if node.attrs.get("transB", 0) else value.shape[::-1]
        return WeightLayer(**names, out_axis=1, shape=tuple(shape))
    if node.op == "MatMul" and value.ndim == 2:  # units on the last axis, whatever the rank
        return WeightLayer(**names, out_axis=-1, shape=tuple(value.shape[::-1]))
    if node.op == "Conv" and value.ndim == 4 and node.attrs.get("group", 1) == 1:
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return None
        attrs = tuple(
            tuple(node.attrs.get(k, d))
            for k, d in (("strides", (1, 1)), ("pads", (0, 0, 0, 0)), ("dilations", (1, 1)))
        )
        return WeightLayer(
            **names, out_axis=1, shape=tuple(value.shape), conv=(tuple(value.shape[2:]), *attrs)
        )
    return None


def to_canonical(graph: gs.Graph, layer: WeightLayer, array: np.ndarray) -> np.ndarray:
    """`array` (the stored weight, or its gradient) in the layer's (out, in, …) layout, float64."""
    node = _node(graph, layer.name)
    array = np.asarray(array, dtype=np.float64)
    return array.T if _transposed(node) else array


def _transposed(node: gs.Node) -> bool:
    """True where the stored weight is (in, out): MatMul, and Gemm with transB = 0."""
    return node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0))


def layer_weights(graph: gs.Graph, layers: tuple[WeightLayer, ...]) -> dict[str, np.ndarray]:
    """The effective weight of each layer (Gemm's alpha folded in), canonical layout."""
    out = {}
    for layer in layers:
        node = _node(graph, layer.name)
        scale = node.attrs.get("alpha", 1.0) if layer.op == "Gemm" else 1.0
        out[layer.name] = scale * to_canonical(graph, layer, node.inputs[1].values)
    return out


def sparsify(
    graph: gs.Graph,
    layers: tuple[WeightLayer, ...],
    removed: Mapping[str, np.ndarray],
    shifts: Mapping[str, np.ndarray],
) -> gs.Graph:
    """A copy of `graph` with the `removed` weights (boolean, canonical layout) set to zero and
    each layer's bias shifted by `shifts[name]` (a zero bias is created where there is none)."""
    graph = graph.copy()
    for layer in layers:
        node = _node(graph, layer.name)
        if layer.name in removed:
            value = np.asarray(node.inputs[1].values)
            mask = np.asarray(removed[layer.name], dtype=bool)
            stored = mask.T if _transposed(node) else mask
            node.inputs[1] = gs.Constant(
                f"{layer.weight}__{layer.name}__sparse",
                np.where(stored, 0, value).astype(value.dtype),
            )
        delta = shifts.get(layer.name)
        if delta is not None and np.any(delta):
            _shift_bias(graph, node, np.asarray(delta, dtype=np.float64))
    graph.cleanup().toposort()
    return infer_shapes(graph)


def _shift_bias(graph: gs.Graph, node: gs.Node, delta: np.ndarray) -> None:
    """b += delta: into a MatMul's constant Add after it, else as rewrite folds consumer shifts
    (Conv/Gemm bias, created if missing and Gemm's beta folded in; a new Add after a MatMul)."""
    add = _bias_add(graph, node) if node.op == "MatMul" else None
    if add is None:
        add_bias(graph, node, delta)
        return
    index = 1 if add.inputs[0] is node.outputs[0] else 0
    bias = np.asarray(add.inputs[index].values, dtype=np.float64) + delta
    dtype = np.asarray(node.inputs[1].values).dtype
    add.inputs[index] = gs.Constant(f"{add.name}__bias_shifted", bias.astype(dtype))


def _bias_add(graph: gs.Graph, node: gs.Node) -> gs.Node | None:
    """The Add of a constant vector that is the only reader of this MatMul's output, if any."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add" or out in graph.outputs:
        return None
    add = out.outputs[0]
    other = [t for t in add.inputs if t is not out]
    if len(other) == 1 and isinstance(other[0], gs.Constant) and np.ndim(other[0].values) == 1:
        return add
    return None


def _node(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def zero_count(graph: gs.Graph, layers: tuple[WeightLayer, ...]) -> tuple[int, int]:
    """(zero weights, all weights) over the layers' weight tensors."""
    zeros = total = 0
    for layer in layers:
        value = np.asarray(_node(graph, layer.name).inputs[1].values)
        zeros += int(np.count_nonzero(value == 0))
        total += value.size
    return zeros, total


def deflated_size(model: onnx.ModelProto) -> int:
    """Bytes of the serialized model after zlib deflate (what a zip archive of it would take)."""
    return len(zlib.compress(model.SerializeToString(), 6))
