"""A Split's part sizes read the same whichever way the Split states them (a `split` input, the
`split` attribute before opset 13, or `num_outputs` from opset 18) by every rule that reads
them through `split_sizes`: the dims `dim_origin` proves and the `unbind` readers of a packed
projection (`graph/packed.py`)."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from onnxprune.graph.packed import _readers
from onnxprune.ops.shape_values import dim_origin

_OPSET = {"input": 17, "attribute": 11, "num_outputs": 18}


def _split_node(
    form: str, x: str, sizes: list[int], axis: int, outputs: list[str]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The Split of `x` into `sizes` along `axis` written in `form`, with the constants it reads
    (empty unless `form` is "input")."""
    if form == "input":
        node = helper.make_node("Split", [x, "sizes"], outputs, axis=axis)
        return [node], [onnx.numpy_helper.from_array(np.array(sizes, np.int64), "sizes")]
    attrs = {"split": sizes} if form == "attribute" else {"num_outputs": len(sizes)}
    return [helper.make_node("Split", [x], outputs, axis=axis, **attrs)], []


def _uneven_split(form: str) -> gs.Graph:
    """x (batch, 7) split on axis 1 into parts of 4 and 3, the outputs' shapes stated with fresh
    symbols (as inference leaves them where it loses a size): only the Split tells their sizes."""
    nodes, inits = _split_node(form, "x", [4, 3], 1, ["y0", "y1"])
    outs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch", y]) for y in ("y0", "y1")]
    graph = helper.make_graph(
        nodes,
        "split",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 7])],
        outs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET[form])])
    return gs.import_onnx(model)


@pytest.mark.parametrize("form", list(_OPSET))
def test_dim_origin_reads_a_split_s_parts_in_every_form(form):
    tensors = _uneven_split(form).tensors()
    y0, y1 = tensors["y0"], tensors["y1"]
    assert [dim_origin(y, 1) for y in (y0, y1)] == [4, 3]  # ceil(7 / 2), then the rest
    assert [dim_origin(y, 0) for y in (y0, y1)] == ["batch", "batch"]


def _unbind(form: str) -> onnx.ModelProto:
    """`t.unbind(0)` of t (3, N, 4): a Split of axis 0 into three parts of one, each Squeezed."""
    b = graphs.Builder(0)
    nodes, inits = _split_node(form, "x", [1, 1, 1], 0, ["s0", "s1", "s2"])
    b.nodes += nodes
    b.inits += inits
    squeeze = {"axes": [0]} if form == "attribute" else {}
    axes = [] if form == "attribute" else [b.const("axes", np.array([0], np.int64))]
    outs = [b.node("Squeeze", f"q{t}", [f"s{t}", *axes], **squeeze) for t in range(3)]
    return b.model(outs, shape=(3, "N", 4), opset=_OPSET[form])


@pytest.mark.parametrize("form", list(_OPSET))
def test_packed_readers_read_unbind_in_every_form(form):
    graph = gs.import_onnx(_unbind(form))
    found = _readers(graph.tensors()["x"])
    assert found is not None
    assert [(node.name, t, axis) for node, t, axis in found] == [(f"q{t}", t, 0) for t in range(3)]
