"""Loading and normalizing: every way a file can be wrong gives a one-line ModelLoadError, and every
normalization (Constant folding, BatchNorm folding, no-op removal) leaves the function unchanged.
"""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close, reference_path, run_model
from onnx import numpy_helper

import onnxprune
from onnxprune.errors import ModelLoadError
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import export, load_model, normalize


def ops(model_or_graph) -> list[str]:
    graph = model_or_graph.graph if isinstance(model_or_graph, onnx.ModelProto) else None
    if graph is not None:
        return [n.op_type for n in graph.node]
    return [n.op for n in model_or_graph.nodes]


def normalized(model: onnx.ModelProto) -> onnx.ModelProto:
    return export(normalize(model))


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# --- normalization keeps the function ---------------------------------------------------------


def test_constant_node_weights_are_folded_and_the_model_prunes():
    model = graphs.constant_weights()
    assert not model.graph.initializer and "Constant" in ops(model)
    graph = normalize(model)
    assert "Constant" not in ops(graph)
    assert_outputs_close(model, export(graph), graphs.random_input(model), atol=1e-6)
    groups = {g.name: g for g in analyze(graph)}
    assert groups["c1"].prunable and groups["c2"].prunable
    result = onnxprune.prune(model, ratio=0.5, round_to=1)
    weights = {t.name: t for t in result.model.graph.initializer}
    c2_in = next(n for n in result.model.graph.node if n.name == "c2").input[1]
    assert tuple(weights[c2_in].dims) == (3, 4, 3, 3)  # 6 → 3 outputs, 8 → 4 inputs


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [t.name for t in model.graph.input], [t.name for t in model.graph.output]


def test_constant_subgraphs_fold_keeping_function_and_io_names():
    model = graphs.paddle_style()
    folded = normalized(model)
    assert not {"Reshape", "Unsqueeze", "Sqrt", "Sub", "Constant"} & set(ops(folded))
    assert ops(folded).count("Div") == 1  # only the hard-swish's / 6 on activations is left
    assert io_names(folded) == io_names(model)
    assert_outputs_close(model, folded, graphs.random_input(model, n=8), atol=1e-6)


@pytest.mark.parametrize("read", ["gather", "slice"])
@pytest.mark.parametrize("batch", [1, "N"])
def test_torch_view_flatten_folds_to_a_constant_target_and_prunes(batch, read):
    model = graphs.torch_flatten(batch, read)  # h.view(h.size(0), -1), Paddle's flatten
    folded = normalized(model)
    assert not {"Shape", "Gather", "Slice", "Unsqueeze", "Concat"} & set(ops(folded))
    assert io_names(folded) == io_names(model)
    feeds = graphs.random_input(model, n=1 if batch == 1 else 5)
    assert_outputs_close(model, folded, feeds, atol=1e-6)
    assert next(g for g in onnxprune.analyze(model).groups if g.name == "c1").prunable
    exact = onnxprune.prune(model, ratio=0.0, round_to=1, data=feeds)
    assert_outputs_close(model, exact.model, feeds, atol=1e-6)
    half = onnxprune.prune(model, ratio=0.5, round_to=1, data=feeds)
    assert half.report.macs == (16 * 6 * 27 + 96 * 5, 16 * 3 * 27 + 48 * 5)


def test_a_shape_dim_read_at_another_position_is_not_copied():
    """[N, g, C/g, H, W]: H and W are dims 2, 3 of the input, static, so they are written as
    their sizes, not as 0 (a copy of the input's dims 3, 4); N is the input's own dim 0."""
    model = graphs.channel_shuffle()
    folded = normalized(model)
    targets = {n.name: n.input[1] for n in folded.graph.node if n.op_type == "Reshape"}
    values = {i.name: numpy_helper.to_array(i).tolist() for i in folded.graph.initializer}
    assert values[targets["u1.groups_apart"]] == [0, 2, 4, 8, 8]
    feeds = graphs.random_input(model, n=3)
    assert_outputs_close(model, folded, feeds, atol=1e-6)


@pytest.mark.parametrize(
    "target, copied",
    [((-1, 96), (0, 96)), ((-1, 6, 16), (0, 6, 16)), ((-1, 2, 3, 4, 4), (0, 2, 3, 4, 4)),
     ((-1, 48), None), ((2, -1), None)],
)  # fmt: skip
def test_a_reshape_minus_one_is_copied_only_where_it_can_only_be_the_batch(target, copied):
    """x (N, 6, 4, 4): -1 at the batch's position is N exactly when the other entries hold all
    of 6·4·4; (-1, 48) folds two samples into a row, and (2, -1) states the batch."""
    b = graphs.Builder(3)
    h = b.relu("r1", b.conv("c1", "x", 3, 6))
    flat = b.node("Reshape", "reshape", [h, b.const("target", np.array(target, np.int64))])
    model = b.model([b.node("Relu", "r2", [flat])], shape=("N", 3, 4, 4))
    graph = normalize(model)
    stated = next(n for n in graph.nodes if n.op == "Reshape").inputs[1].values.tolist()
    assert stated == list(copied or target)
    feeds = graphs.random_input(model, n=4)
    assert_outputs_close(model, export(graph), feeds, atol=1e-6)


@pytest.mark.parametrize(("size", "folds"), [(64, True), (1024, False)])
def test_folding_does_not_write_large_tensors_into_the_file(size, folds):
    model = graphs.expanded_constant(size)  # 16 KiB or 4 MiB of float32 from one scalar
    folded = normalized(model)
    assert ("Expand" not in ops(folded)) == folds
    assert_outputs_close(model, folded, graphs.random_input(model, n=1), atol=1e-6)
    if not folds:
        assert folded.ByteSize() < 10_000


def test_folding_keeps_fp16_weights_in_fp16():
    b = graphs.Builder(23)
    stored = b.const("w16", (0.5 * b.rng.standard_normal((4, 3, 3, 3))).astype(np.float16))
    weight = b.node("Cast", "widen", [stored], to=onnx.TensorProto.FLOAT)
    model = b.model([b.node("Conv", "c1", ["x", weight], pads=[1, 1, 1, 1])])
    folded = normalized(model)
    assert "Cast" in ops(folded)
    assert_outputs_close(model, folded, graphs.random_input(model), atol=1e-6)


def test_small_float_casts_of_constants_fold_so_a_resize_reads_its_scales():
    """float16 converters keep Resize in float32 and write its scales as a float16 constant
    cast back: c1 stayed unprunable behind it ("unknown channel count"); folded, the Resize
    passes c1's channels as in the float32 file."""
    b = graphs.Builder(24)
    h = b.relu("r1", b.conv("c1", "x", 3, 8))
    scales16 = b.const("scales16", np.array([1, 1, 2, 2], dtype=np.float16))
    scales = b.node("Cast", "scales32", [scales16], to=onnx.TensorProto.FLOAT)
    up = b.node("Resize", "up", [h, "", scales], mode="nearest")
    model = b.model([b.conv("c2", up, 8, 4)])
    folded = normalized(model)
    assert "Cast" not in ops(folded)
    assert_outputs_close(model, folded, graphs.random_input(model), atol=1e-6)
    c1 = next(g for g in onnxprune.analyze(model).groups if g.name == "c1")
    assert c1.prunable, c1.reason


def test_paddle_style_arithmetic_is_prunable_and_exact_at_ratio_zero():
    model = graphs.paddle_style()
    analysis = onnxprune.analyze(model)
    c1 = next(g for g in analysis.groups if g.name == "c1")
    assert c1.prunable and not c1.coupled
    assert "hs_mul" in c1.passthrough  # h · Clip(h + 3, 0, 6): the same channels on both inputs
    # MACs of c1 (8·8·8 outputs × 3·3·3) and of its consumer c2 (4·8·8 outputs × 8·3·3)
    assert analysis.group_macs["c1"] == 512 * 27 + 256 * 72 == analysis.macs
    feeds = graphs.random_input(model, n=8)
    for method in ("magnitude", "id"):
        result = onnxprune.prune(model, method=method, ratio=0.0, data=feeds, round_to=1)
        assert_outputs_close(model, result.model, feeds, atol=1e-6)
        half = onnxprune.prune(model, method=method, ratio=0.5, data=feeds, round_to=1)
        assert half.report.macs == (analysis.macs, 256 * 27 + 256 * 36)


@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_batchnorm_after_conv_or_gemm_is_folded_exactly(kind):
    model = graphs.conv_bn(kind)
    folded = normalized(model)
    assert "BatchNormalization" not in ops(folded)
    feeds = graphs.random_input(model, n=8)
    assert_outputs_close(model, folded, feeds, atol=1e-5)


@pytest.mark.parametrize("kind", ["relu", "add"])
def test_batchnorm_that_cannot_fold_stays_as_a_channel_wise_op(kind):
    model = graphs.conv_bn(kind)
    folded = normalized(model)
    assert "BatchNormalization" in ops(folded)
    assert_outputs_close(model, folded, graphs.random_input(model), atol=1e-6)
    group = analyze(normalize(model))[0]
    assert "bn" in group.passthrough
    options = {"prune_residual": True} if kind == "add" else {}
    result = onnxprune.prune(model, ratio=0.5, round_to=1, **options)
    bn = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization")
    inits = {t.name: t for t in result.model.graph.initializer}
    assert [tuple(inits[name].dims) for name in bn.input[1:5]] == [(4,)] * 4


def test_dropout_and_identity_are_removed_keeping_output_names():
    model = graphs.with_noops()
    graph = normalize(model)
    assert not {"Identity", "Dropout"} & set(ops(graph))
    assert [t.name for t in graph.outputs] == ["id2_out"]
    assert_outputs_close(model, export(graph), graphs.random_input(model), atol=0)


# --- opsets -------------------------------------------------------------------------------------


def test_an_opset_above_the_range_is_rejected_naming_it(save_tmp):
    path = save_tmp(graphs.conv_chain(opset=29))
    with pytest.raises(ModelLoadError, match="opset 29") as excinfo:
        load_model(path)
    one_line_error(excinfo)
    with pytest.raises(ModelLoadError, match="opset 29"):
        onnxprune.prune(path)


def _old_classifier(opset: int, duplicated: bool = False, mode: str = "nearest") -> onnx.ModelProto:
    """An IR-3 classifier as old exporters wrote it: every weight also a graph input, an unfolded
    BatchNormalization, Upsample by `mode` (scales an attribute at opset 7, an input at 9),
    Flatten, Gemm, Softmax. `duplicated`: conv c1's last 4 filters (and their BatchNorm entries)
    copy its first 4, so that its 8 channels span only 4."""
    rng = np.random.default_rng(opset)
    w1 = 0.3 * rng.standard_normal((8, 3, 3, 3))  # scaled so that the logits are O(1)
    bn = [rng.uniform(0.5, 1.5, 8), rng.standard_normal(8), rng.standard_normal(8)]
    bn.append(rng.uniform(0.5, 2.0, 8))
    if duplicated:
        w1[4:] = w1[:4]
        for values in bn:
            values[4:] = values[:4]
    arrays = {"w1": w1, "g": bn[0], "b": bn[1], "m": bn[2], "v": bn[3]}
    arrays |= {"w2": 0.1 * rng.standard_normal((6, 8, 3, 3)), "w3": rng.standard_normal((5, 6))}
    arrays |= {"b3": rng.standard_normal(5)}
    scale = {"scales": [1.0, 1.0, 2.0, 2.0]} if opset < 9 else {}
    up_inputs = ["r1"] if opset < 9 else ["r1", "scales"]
    if opset >= 9:
        arrays["scales"] = np.array([1.0, 1.0, 2.0, 2.0])
    helper = onnx.helper
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("Upsample", up_inputs, ["up"], mode=mode, **scale),
        helper.make_node("Conv", ["up", "w2"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g3"], transB=1),
        helper.make_node("Softmax", ["g3"], ["y"]),
    ]
    weights = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    float32 = onnx.TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", float32, ["N", 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(w.name, float32, list(w.dims)) for w in weights]
    output = helper.make_tensor_value_info("y", float32, ["N", 5])
    graph = helper.make_graph(nodes, "old", inputs, [output], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    return model


@pytest.mark.parametrize(
    ("opset", "mode"), [(7, "nearest"), (9, "nearest"), (9, "linear"), (10, "")]
)
def test_an_older_opset_is_converted_and_keeps_the_function(opset, mode, save_tmp):
    """Below the range the model is converted to opset 11 (Upsample → Resize with the old
    sampling stated, the IR raised so the weights need not be inputs); ratio 0 reproduces the
    original as ORT runs it at its own opset, and the report says the pruned model is written
    at opset 11."""
    model = _old_classifier(opset, mode=mode) if mode else graphs.conv_chain(opset=opset)
    path = save_tmp(model)
    loaded = load_model(path)
    assert loaded.opset_import[0].version == 11 and loaded.ir_version >= 6
    feeds = graphs.random_input(model, n=4)
    result = onnxprune.prune(path, method="id", ratio=0, data=feeds)
    assert result.model.opset_import[0].version == 11
    assert any(f"converted from opset {opset} to opset 11" in n for n in result.report.notes)
    onnx.checker.check_model(result.model, full_check=True)
    assert_outputs_close(model, result.model, feeds, atol=1e-5)


def test_duplicated_channels_of_an_old_model_are_removed_exactly(save_tmp):
    """ID on the converted model: c1's 8 channels span 4, so keeping 4 loses nothing."""
    model = _old_classifier(9, duplicated=True)
    feeds = graphs.random_input(model, n=16)
    result = onnxprune.prune(save_tmp(model), method="id", ratio=0.5, data=feeds, exclude=("c2",),
                             round_to=1, compensate="none", recalibrate=False)  # fmt: skip
    assert result.report.params[1] < result.report.params[0]
    assert_outputs_close(model, result.model, feeds, atol=1e-4)


def _scaled_conv(op: str, **attrs) -> onnx.ModelProto:
    """x → `op` (an experimental op of opset 8) → Conv(4) → y."""
    helper = onnx.helper
    node = helper.make_node(op, ["x"], ["s"], name="scaler", **attrs)
    conv = helper.make_node("Conv", ["s", "w"], ["y"], name="conv")
    weight = np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [node, conv],
        "scaler",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])


def test_an_image_scaler_is_written_as_what_it_computes(save_tmp):
    """ImageScaler (gone from ONNX since opset 10) becomes Mul and Add: the same outputs as ONNX
    Runtime's own ImageScaler kernel on the opset-8 file."""
    model = _scaled_conv("ImageScaler", scale=2.5, bias=[0.5, -1.0, 3.0])
    loaded = load_model(save_tmp(model))
    assert "ImageScaler" not in ops(loaded) and loaded.opset_import[0].version == 11
    assert_outputs_close(model, loaded, graphs.random_input(model), atol=1e-6)


def test_ops_an_old_opset_no_longer_defines_are_refused_by_name(save_tmp):
    model = _scaled_conv("ScaledTanh", alpha=1.0, beta=1.0)
    with pytest.raises(ModelLoadError, match="opset 8.*ScaledTanh") as excinfo:
        load_model(save_tmp(model))
    one_line_error(excinfo)


@pytest.mark.parametrize("opset", [11, 13, 17, 21, 23, 24, 25, 28])
def test_supported_opsets_load_and_prune(opset, save_tmp):
    path = save_tmp(graphs.conv_chain(opset=opset))
    model = load_model(path)
    assert model.opset_import[0].version == opset
    result = onnxprune.prune(path, ratio=0.5, round_to=1)
    assert result.model.opset_import[0].version == opset
    assert result.report.macs[1] < result.report.macs[0]
    onnx.checker.check_model(result.model, full_check=True)


# --- external data ------------------------------------------------------------------------------


def _save_external(model: onnx.ModelProto, path) -> None:
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=0,
    )


def _wide_chain() -> onnx.ModelProto:
    """A chain with a weight above onnxprune's 1 KiB external-data threshold after pruning."""
    b = graphs.Builder(21)
    h = b.relu("r1", b.conv("c1", "x", 3, 32))
    h = b.relu("r2", b.conv("c2", h, 32, 32))
    return b.model([b.conv("c3", h, 32, 4)])


def test_external_data_round_trips_through_prune_and_save(tmp_path):
    src = tmp_path / "ext.onnx"
    model = _wide_chain()
    _save_external(model, src)
    assert (tmp_path / "ext.onnx.data").is_file()
    result = onnxprune.prune(src, ratio=0.5, round_to=1)
    assert result.external_data
    out = tmp_path / "out" / "pruned.onnx"
    result.save(out)
    assert (out.parent / "pruned.onnx.data").is_file()
    stored = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.graph.initializer)
    feeds = graphs.random_input(model)
    outputs = run_model(out, feeds)  # ORT reads the external file relative to the model
    expected = run_model(result.model if _has_raw(result.model) else onnx.load(str(out)), feeds)
    np.testing.assert_allclose(outputs["c3_out"], expected["c3_out"], atol=1e-6, rtol=1e-5)
    onnx.checker.check_model(str(out), full_check=True)


def _has_raw(model: onnx.ModelProto) -> bool:
    return all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_saving_with_external_data_leaves_the_result_usable(tmp_path):
    src = tmp_path / "ext.onnx"
    _save_external(_wide_chain(), src)
    result = onnxprune.prune(src, ratio=0.5, round_to=1)
    result.save(tmp_path / "a.onnx")
    assert _has_raw(result.model)
    result.save(tmp_path / "b.onnx")
    run_model(tmp_path / "b.onnx", graphs.random_input(_wide_chain()))


def test_saving_over_an_existing_output_replaces_its_external_data(tmp_path):
    src = tmp_path / "ext.onnx"
    _save_external(_wide_chain(), src)
    out = tmp_path / "out.onnx"
    onnxprune.prune(src, ratio=0.5, round_to=1).save(out)
    size = (tmp_path / "out.onnx.data").stat().st_size
    onnxprune.prune(src, ratio=0.5, round_to=1).save(out)
    assert (tmp_path / "out.onnx.data").stat().st_size == size


def test_missing_external_data_file_is_named(tmp_path):
    src = tmp_path / "ext.onnx"
    _save_external(_wide_chain(), src)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="'ext.onnx.data'") as excinfo:
        load_model(src)
    one_line_error(excinfo)
    with pytest.raises(ModelLoadError, match="ext.onnx.data"):
        onnxprune.prune(src)


# --- files that are not models --------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as excinfo:
        load_model(tmp_path / "nope.onnx")
    assert "nope.onnx" in one_line_error(excinfo)


def test_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a file") as excinfo:
        load_model(tmp_path)
    one_line_error(excinfo)


def test_text_file_is_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a protobuf\nsecond line\n")
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(path)
    assert "notes.onnx" in one_line_error(excinfo)


def test_truncated_protobuf(tmp_path):
    data = reference_path("vgg").read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(path)
    assert "half.onnx" in one_line_error(excinfo)


def test_reference_model_loads_unchanged():
    path = reference_path("mlp")
    before = path.read_bytes()
    model = load_model(path)
    assert model.SerializeToString() == onnx.load(str(path)).SerializeToString()
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "indices, axis, reads",
    [
        (np.array(-1), 0, "b"),  # h_n[-1] of a stacked LSTM: the last part, index 0 there
        (np.array([0, 1]), 0, "a"),
        (np.array([1, 2]), 0, "cat_out"),  # spans both parts: unchanged
        (np.array(0), 1, "cat_out"),  # another axis than the Concat's: unchanged
    ],
)
def test_a_gather_of_one_concat_part_reads_that_part(indices, axis, reads):
    b = graphs.Builder(7)
    cat = b.node("Concat", "cat", ["a", b.rand("b", 1, 3, 4)], axis=0)
    gather = b.node("Gather", "pick", [cat, b.const("i", indices)], axis=axis)
    model = b.model([b.node("Relu", "act", [gather])], inputs=[("a", (2, 3, 4))])
    graph = normalize(model)
    assert next(n for n in graph.nodes if n.name == "pick").inputs[0].name == reads
    feeds = {"a": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}
    assert_outputs_close(model, export(graph), feeds, atol=0.0)
