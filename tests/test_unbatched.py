"""Models as torchvision's detectors export them: an input without a sample axis, outputs whose
length the data decides (boxes after NMS), weights shared by several nodes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from graphs import Builder, conv_chain

import onnxprune
from onnxprune.calib.data import data_shapes, fed_specs, input_specs, unbatched_inputs
from onnxprune.errors import VerificationError
from onnxprune.graph.fused import merge_constant_adds
from onnxprune.graph.unbatched import with_sample_axis, without_sample_axis
from onnxprune.measure.verify import data_lengths, deviation_warning, verify


def unbatched_chain() -> onnx.ModelProto:
    """x (3, 8, 8) → Unsqueeze → c1(8) → relu → c2(6) → relu → c3(4) → Squeeze → y (4, 8, 8)."""
    b = Builder(3)
    axes = b.const("axes", np.array([0], dtype=np.int64))
    h = b.node("Unsqueeze", "batch", ["x", axes])
    h = b.relu("r1", b.conv("c1", h, 3, 8))
    h = b.relu("r2", b.conv("c2", h, 8, 6))
    y = b.node("Squeeze", "unbatch", [b.conv("c3", h, 6, 4), axes])
    return b.model([y], shape=(3, 8, 8))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_data_with_one_more_axis_marks_the_input_unbatched(tmp_path):
    model = unbatched_chain()
    images = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=images)
    specs = input_specs(model)
    assert data_shapes(tmp_path / "d.npz", specs) == {"x": (5, 3, 8, 8)}  # from the header
    assert unbatched_inputs(specs, {"x": (5, 3, 8, 8)}) == ("x",)
    assert unbatched_inputs(specs, {"x": (3, 8, 8)}) == ()  # as declared: axis 0 is samples
    assert fed_specs(model, tmp_path / "d.npz")[0].shape == (1, 3, 8, 8)
    batched = conv_chain()  # a symbolic batch is never taken for a missing one
    assert unbatched_inputs(input_specs(batched), {"x": (5, 5, 3, 8, 8)}) == ()


@pytest.mark.parametrize("opset", [11, 17])
def test_sample_axis_added_and_removed_is_the_same_model(opset):
    model = unbatched_chain()
    model.opset_import[0].version = opset
    if opset < 13:  # Unsqueeze/Squeeze take their axes as attributes there
        for node in model.graph.node:
            if node.op_type in ("Unsqueeze", "Squeeze"):
                del node.input[1:]
                node.attribute.append(onnx.helper.make_attribute("axes", [0]))
    wrapped = with_sample_axis(model, ["x"])
    x = np.random.default_rng(1).standard_normal((3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(wrapped, x[None]), _run(model, x))
    back = without_sample_axis(wrapped, model)
    assert back.graph.input == model.graph.input
    assert back.graph.node == model.graph.node
    assert back.graph.initializer == model.graph.initializer


def test_prune_feeds_one_sample_at_a_time_and_keeps_the_interface():
    model = unbatched_chain()
    images = np.random.default_rng(2).standard_normal((24, 3, 8, 8)).astype(np.float32)
    exact = onnxprune.prune(model, method="id", ratio=0.0, data={"x": images})
    assert exact.model.graph.input == model.graph.input
    for x in images[:4]:
        want = _run(model, x)
        got = _run(exact.model, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    half = onnxprune.prune(model, method="id", ratio=0.5, data={"x": images})
    assert half.model.graph.input == model.graph.input
    widths = {g.name: len(p.keep) for g in half.groups for p in [half.plans.get(g.name)] if p}
    assert widths == {"c1": 4, "c2": 3}
    assert _run(half.model, images[0]).shape == (4, 8, 8)
    assert any("no sample axis" in note for note in half.report.notes)


def nonzero_model(threshold: float, batch: object) -> onnx.ModelProto:
    """x (batch, 4) → NonZero(x > threshold)ᵀ → idx (K, 2), and as floats → where (K, 2):
    lengths the data decides (the float one looks like class scores, as a detector's boxes)."""
    b = Builder()
    mask = b.node("Greater", "gt", ["x", b.const("t", np.float32(threshold))])
    idx = b.node("Transpose", "tr", [b.node("NonZero", "nz", [mask])], perm=[1, 0])
    where = b.node("Cast", "where", [idx], to=onnx.TensorProto.FLOAT)
    model = b.model([], shape=(batch, 4))
    for name, kind in ((idx, onnx.TensorProto.INT64), (where, onnx.TensorProto.FLOAT)):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, kind, ["K", 2]))
    return model


def test_outputs_of_data_decided_length_are_counted_not_compared():
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    original, pruned = nonzero_model(0.0, 1), nonzero_model(1.0, 1)
    assert data_lengths(original) == {"tr_out", "where_out"}
    check = verify(original, pruned, {"x": x}, data="x")
    out = check.outputs[0]
    # every run's rows are kept: five runs of one sample (the fixed batch), not the first five
    assert out.lengths == (int((x > 0).sum()), int((x > 1).sum()))
    assert np.isnan(out.rel_l2) and check.rel_l2 == 0.0
    assert f"{out.lengths[0]} rows -> {out.lengths[1]}" in deviation_warning(check)
    written = json.loads(json.dumps(check.to_dict(), allow_nan=False))["outputs"][0]
    assert written["rel_l2"] is None and written["lengths"] == list(out.lengths)  # strict JSON
    same = verify(original, nonzero_model(0.0, 1), {"x": x}, data="x")
    assert same.outputs[0].lengths is None and same.outputs[0].rel_l2 == 0.0
    assert same.outputs[1].top1_agreement is None and same.agreement is None


def sliced_model(stop: int) -> onnx.ModelProto:
    """x (N, 4) → x[:stop] → y (N, 4): the output declares the input's sample axis."""
    b = Builder()
    starts, stops = (
        b.const("s0", np.array([0], np.int64)),
        b.const("s1", np.array([stop], np.int64)),
    )
    y = b.node("Slice", "cut", ["x", starts, stops])
    model = b.model([], shape=("N", 4))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, ["N", 4])
    )
    return model


def test_a_changed_sample_axis_still_fails_verification():
    original, truncated = sliced_model(1 << 30), sliced_model(-1)
    assert data_lengths(original) == set()
    x = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    with pytest.raises(VerificationError, match="changed shape"):
        verify(original, truncated, {"x": x}, data="x")


def test_a_shared_weight_pruned_per_reader_is_named_in_analysis_and_report():
    """c2 and c3 read one weight; their groups prune it differently, so it is copied."""
    b = Builder(5)
    h = b.relu("r1", b.conv("c1", "x", 3, 8))
    shared = b.rand("shared.w", 8, 8, 3, 3)
    h = b.relu("r2", b.node("Conv", "c2", [h, shared], kernel_shape=[3, 3], pads=[1] * 4))
    h = b.relu("r3", b.node("Conv", "c3", [h, shared], kernel_shape=[3, 3], pads=[1] * 4))
    model = b.model([b.conv("c4", h, 8, 4)])
    data = {"x": np.random.default_rng(6).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    result = onnxprune.prune(model, method="magnitude", ratio=0.5, data=data)
    (note,) = [n for n in result.report.notes if "separate copies" in n]
    assert "'shared.w', read by 2 nodes" in note
    readers = [n.input[1] for n in result.model.graph.node if n.name in ("c2", "c3")]
    assert len(set(readers)) == 2
    unshared = onnxprune.prune(conv_chain(), method="magnitude", ratio=0.5, data=data)
    assert not [n for n in unshared.report.notes if "separate copies" in n]
    assert onnxprune.analyze(model).shared == (("shared.w", 2),)  # said before pruning too
    assert onnxprune.analyze(conv_chain()).shared == ()


def test_bench_scores_and_times_an_unbatched_model_one_sample_per_run():
    from onnxprune.calib.data import Dataset
    from onnxprune.measure.latency import benchmark

    model = unbatched_chain()
    images = np.random.default_rng(7).standard_normal((6, 3, 8, 8)).astype(np.float32)
    pruned = onnxprune.prune(model, method="id", ratio=0.5, data={"x": images}).model
    result = benchmark(
        [model, pruned], evaluation=Dataset({"x": images}), warmup=0, repeats=1, min_time=0.0
    )
    assert [row.batch for row in result.rows] == [1, 1]  # one image per run, not a batch of 3
    want = np.stack([_run(model, x) for x in images])
    got = np.stack([_run(pruned, x) for x in images])
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert result.rows[0].rel_l2 == 0.0
    assert result.rows[1].rel_l2 == pytest.approx(rel, rel=1e-4)


def test_constant_adds_merge_for_scalars_too():
    """Add(Add(x, 2.5), 1.5) as a detector's box decoding writes it: the merged constant is a
    0-d array (numpy's scalar sum crashed graphsurgeon's Constant at the pruned model's finish)."""
    b = Builder()
    inner = b.node("Add", "inner", ["x", b.const("c1", np.float32(2.5))])
    model = b.model([b.node("Add", "outer", [inner, b.const("c2", np.float32(1.5))])])
    graph = gs.import_onnx(model)
    merge_constant_adds(graph)
    (add,) = graph.nodes
    assert add.inputs[1].values.shape == () and float(add.inputs[1].values) == 4.0
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(gs.export_onnx(graph), x), x + 4.0, rtol=1e-6)
