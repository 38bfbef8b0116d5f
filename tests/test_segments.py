"""Cutting a model into segments: every node up to the last end runs exactly once, and chaining
the segments in ONNX Runtime gives each end the value the whole model gives it."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
from conftest import reference_feeds, reference_path

from onnxprune.calib.stats import add_taps, tapped_session
from onnxprune.graph.load import load_model
from onnxprune.graph.segments import segment_model, split_at
from onnxprune.measure.verify import session_for


def _chained(model: onnx.ModelProto, ends: list[str], feeds: dict) -> dict[str, np.ndarray]:
    """Each end's value from running the segments one after the other on `feeds`."""
    values = dict(feeds)
    for segment in split_at(model, ends):
        types = {n: onnx.helper.np_dtype_to_tensor_dtype(values[n].dtype) for n in segment.inputs}
        part = segment_model(model, segment, types)
        aliases = add_taps(part, segment.outputs)
        found = session_for(part).run(aliases, {n: values[n] for n in segment.inputs})
        values.update(zip(segment.outputs, found, strict=True))
    return {end: values[end] for end in ends}


def test_segments_partition_the_nodes_up_to_the_last_end_in_order():
    model = graphs.residual_block()
    names = [n.name for n in model.graph.node]
    ends = ["c3_out", "c1_out"]  # any order: segments follow the graph
    segments = split_at(model, ends)
    assert [s.end for s in segments] == ["c1_out", "c3_out"]
    covered = [i for s in segments for i in s.nodes]
    assert covered == list(range(names.index("c3") + 1))
    assert (segments[0].inputs, segments[0].outputs) == (("x",), ("c1_out",))
    assert (segments[1].inputs, segments[1].outputs) == (("c1_out",), ("c3_out",))


def test_a_tensor_read_past_the_next_segment_is_handed_on_by_its_producer():
    model = graphs.residual_block()
    first, second = split_at(model, ["c2_out", "c4_out"])
    assert first.outputs == ("c2_out", "r1_out")  # t also feeds the residual Add after c3
    assert set(second.inputs) == {"c2_out", "r1_out"}
    assert split_at(model, ["c2_out", "c3_out"])[0].outputs == ("c2_out",)  # the Add never runs


def test_chained_segments_give_every_end_the_whole_model_value():
    model = load_model(reference_path("resnet"))
    ends = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    feeds = reference_feeds("resnet", 8)
    session, aliases = tapped_session(model, ends)
    whole = dict(zip(ends, session.run(aliases, feeds), strict=True))
    chained = _chained(model, ends, feeds)
    for end in ends:
        scale = float(np.abs(whole[end]).max())
        np.testing.assert_allclose(chained[end], whole[end], rtol=1e-5, atol=1e-5 * scale)


def test_no_ends_no_segments():
    assert split_at(graphs.conv_chain(), []) == []


def test_a_tensor_read_only_inside_a_subgraph_is_a_segment_input():
    """An If branch reads `a` from the outer scope without listing it as a node input."""
    a_out = onnx.helper.make_tensor_value_info("a_out", onnx.TensorProto.FLOAT, None)
    branch = lambda op: onnx.helper.make_graph(  # noqa: E731
        [onnx.helper.make_node(op, ["a"], ["a_out"])], op, [], [a_out]
    )
    nodes = [
        onnx.helper.make_node("Relu", ["x"], ["a"], name="relu"),
        onnx.helper.make_node("Sigmoid", ["a"], ["s"], name="sigmoid"),
        onnx.helper.make_node(
            "If", ["c"], ["y"], name="if", then_branch=branch("Neg"), else_branch=branch("Abs")
        ),
    ]
    inputs = [
        onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3]),
        onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
    ]
    outputs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in "sy"]
    graph = onnx.helper.make_graph(nodes, "if", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    first, second = split_at(model, ["s", "y"])
    assert first.outputs == ("s", "a")  # handed on: the If's branches read it
    assert set(second.inputs) == {"a", "c"}
    x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], dtype=np.float32)
    got = _chained(model, ["s", "y"], {"x": x, "c": np.array(True)})
    np.testing.assert_array_equal(got["y"], -np.maximum(x, 0))
