"""Inputs without a sample axis: torchvision's detection models take one image (3, H, W).

Every stage feeds samples on axis 0. Such a model runs here with a sample axis of one in front
(`with_sample_axis`: the input becomes (1, 3, H, W), a Squeeze gives the model what it read),
so it is a fixed-batch-1 model to the pipeline; the file the user gets takes its input as it
was exported (`without_sample_axis`). Whether an input lacks the axis is read off the data
(`calib.data.unbatched_inputs`): its arrays have one axis more, in front, than the model
declares.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import helper

from onnxprune.graph.load import copy_model

MARK = "onnxprune_sample_axis"


def with_sample_axis(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose inputs `names` take a leading axis of 1, squeezed away before
    the nodes that read them (Squeeze's axes an input from opset 13, an attribute before)."""
    model = copy_model(model)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    for name in names:
        inner = f"{name}.{MARK}"
        for node in graph.node:
            node.input[:] = [inner if x == name else x for x in node.input]
        value = next(v for v in graph.input if v.name == name)
        shape = value.type.tensor_type.shape
        shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=1))
        if opset < 13:
            squeeze = helper.make_node("Squeeze", [name], [inner], name=inner, axes=[0])
        else:
            axes = f"{inner}.axes"
            if axes not in {t.name for t in graph.initializer}:  # left by a quantizer's reuse
                graph.initializer.append(helper.make_tensor(axes, onnx.TensorProto.INT64, [1], [0]))
            squeeze = helper.make_node("Squeeze", [name, axes], [inner], name=inner)
        graph.node.insert(0, squeeze)
    return model


def without_sample_axis(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (derived from `with_sample_axis`) with its inputs as `original` declares them:
    each marked Squeeze is removed and its readers read the input again."""
    graph = model.graph
    squeezes = [n for n in graph.node if n.op_type == "Squeeze" and n.name.endswith(MARK)]
    if not squeezes:
        return model
    renamed = {n.output[0]: n.input[0] for n in squeezes}
    axes = {n.input[1] for n in squeezes if len(n.input) > 1}
    for node in squeezes:
        graph.node.remove(node)
    for node in graph.node:
        node.input[:] = [renamed.get(x, x) for x in node.input]
    axes -= {x for node in graph.node for x in node.input}  # a quantizer may share them
    kept = [t for t in graph.initializer if t.name not in axes]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    declared = {v.name: v for v in original.graph.input}
    for value in graph.input:
        if value.name in renamed.values():
            value.type.CopyFrom(declared[value.name].type)
    return model
