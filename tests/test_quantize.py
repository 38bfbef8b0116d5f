"""Quantization through ONNX Runtime's tool: the weight grid, the kept float parts, the CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import data_path, file_hash, reference_path, run_model
from onnx import numpy_helper

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.cli import main
from onnxprune.deploy.quantize import quantize
from onnxprune.errors import NothingToPruneError, UsageError
from onnxprune.measure.cost import count

VGG = reference_path("vgg")


def _calibration(n: int = 128) -> Dataset:
    with np.load(data_path("vgg")) as data:
        return Dataset({"input": data["input"][:n]})


def _test_split() -> tuple[np.ndarray, np.ndarray]:
    with np.load(data_path("vgg", "test")) as data:
        return data["input"], data["labels"]


@pytest.fixture(scope="module")
def vgg_int8() -> onnx.ModelProto:
    return quantize(onnx.load(VGG), "int8", data=_calibration())


def test_int8_weights_lie_on_a_symmetric_per_channel_grid(vgg_int8):
    """Each output channel c: scale_c = max|w_c| / 127 and |w − dq(q(w))| ≤ scale_c / 2."""
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(VGG).graph.initializer}
    inits = {i.name: numpy_helper.to_array(i) for i in vgg_int8.graph.initializer}
    checked = 0
    for node in vgg_int8.graph.node:
        name = node.input[0].removesuffix("_quantized")
        if node.op_type != "DequantizeLinear" or name not in original:
            continue
        w = original[name]
        if w.ndim < 2:
            continue  # biases are int32 on the input×weight scale, not this grid
        q, scale, zero = (inits[i] for i in node.input)
        assert q.dtype == np.int8 and not np.any(zero)
        rows = np.abs(w.reshape(len(w), -1)).max(axis=1)
        np.testing.assert_allclose(scale, rows / 127.0, rtol=1e-6)
        shape = (-1,) + (1,) * (w.ndim - 1)
        error = np.abs(w - q.astype(np.float64) * scale.reshape(shape))
        assert np.all(error <= scale.reshape(shape) / 2 * (1 + 1e-6))
        checked += 1
    assert checked == 8  # the 6 convs and 2 Gemms of the digits VGG


def test_int8_keeps_the_float_models_predictions(vgg_int8):
    x, labels = _test_split()
    float_top = run_model(VGG, {"input": x})["logits"].argmax(1)
    int8_top = run_model(vgg_int8, {"input": x})["logits"].argmax(1)
    assert np.mean(int8_top == float_top) >= 0.97
    assert np.mean(int8_top == labels) >= np.mean(float_top == labels) - 0.01


def test_excluded_nodes_stay_float():
    model = onnx.load(VGG)
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    quantized = quantize(model, "int8", data=_calibration(32), exclude=[f"^{first.name}$"])
    conv = next(n for n in quantized.graph.node if n.name == first.name)
    assert conv.input[1] == first.input[1]  # the float weight, no DequantizeLinear before it
    others = [n for n in quantized.graph.node if n.op_type == "Conv" and n.name != first.name]
    assert others and all(n.input[1].endswith("_DequantizeLinear_Output") for n in others)


def test_float_ends_keep_the_first_conv_and_the_last_gemm_float():
    model = onnx.load(VGG)
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    quantized = quantize(model, "int8", data=_calibration(32), float_ends=True)
    nodes = {n.name: n for n in quantized.graph.node}
    for end in (weighted[0], weighted[-1]):
        assert nodes[end.name].input[1] == end.input[1]  # float weight, no DequantizeLinear
    middle = [nodes[n.name].input[1] for n in weighted[1:-1]]
    assert middle and all(w.endswith("_DequantizeLinear_Output") for w in middle)


def test_fp16_halves_weights_and_keeps_float32_io():
    model = onnx.load(VGG)
    half = quantize(model, "fp16")
    onnx.checker.check_model(half, full_check=True)  # topologically sorted, types consistent
    weights = [i for i in half.graph.initializer if len(i.dims) > 1]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    for value in (*half.graph.input, *half.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x, _ = _test_split()
    ref, got = run_model(model, {"input": x[:64]})["logits"], run_model(half, {"input": x[:64]})
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got["logits"], ref, atol=5e-3 * scale)  # fp16 has 11 bits


def test_dynamic_quantizes_matmuls_without_data():
    model = onnx.load(reference_path("mlp"))
    quantized = quantize(model, "int8-dynamic")
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("MatMulInteger") == sum(
        n.op_type in ("MatMul", "Gemm") for n in model.graph.node
    )
    with np.load(data_path("mlp", "test")) as data:
        x = data["input"]
    agree = run_model(quantized, {"input": x})["logits"].argmax(1)
    assert np.mean(agree == run_model(model, {"input": x})["logits"].argmax(1)) >= 0.97


def test_static_int8_needs_data_and_modes_are_checked():
    with pytest.raises(UsageError, match="give --data"):
        quantize(onnx.load(VGG), "int8")
    with pytest.raises(UsageError, match="unknown quantization"):
        quantize(onnx.load(VGG), "int4", data=_calibration(8))


def test_cli_writes_and_verifies_and_leaves_the_input(tmp_path, capsys, copy_model):
    source = copy_model("vgg")
    before = file_hash(source)
    out = tmp_path / "vgg.int8.onnx"
    args = ["quantize", str(source), "--data", str(data_path("vgg")), "-o", str(out)]
    assert main([*args, "--calib-samples", "64"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert out.is_file() and file_hash(source) == before
    assert main(["quantize", str(source), "--quantize-exclude", "(", "-o", str(out)]) == 2
    assert "not a regex" in capsys.readouterr().err


def test_prune_then_quantize_is_verified_on_held_out_samples(tmp_path):
    """--quantize int8 calibrates on the fit split; verification compares the int8 model."""
    data = data_path("vgg")
    result = onnxprune.prune(
        VGG, method="id", ratio=0.25, data=str(data), quantize="int8", calib_samples=128
    )
    ops = {n.op_type for n in result.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    check = result.report.verification
    assert check.independent and check.agreement >= 0.95
    assert result.report.file_size[1] < result.report.file_size[0] / 3
    with pytest.raises(UsageError, match="unknown quantization"):
        onnxprune.prune(VGG, method="magnitude", ratio=0.25, quantize="int3")


def test_int8_after_a_data_free_method_still_needs_data():
    with pytest.raises(UsageError, match="calibration data"):
        onnxprune.prune(VGG, method="magnitude", ratio=0.25, quantize="int8")


def test_quantized_weights_count_as_parameters(vgg_int8):
    """The int8 weights and int32 biases are the model's parameters (scales and zero points are
    float/int8 extras of ≤ 2 per channel)."""
    before, after = count(onnx.load(VGG)), count(vgg_int8)
    assert before.params <= after.params <= before.params * 1.02


def test_a_quantized_model_is_refused_with_the_reason(vgg_int8, tmp_path, capsys):
    """Its weights come out of DequantizeLinear: no group, and instead of "nothing to prune"
    the one-line error says the model is quantized and what to do; nothing is written."""
    analysis = onnxprune.analyze(vgg_int8)
    assert analysis.groups == () and len(analysis.quantized) == 8  # 6 convs, 2 Gemms
    with pytest.raises(NothingToPruneError, match="the model is quantized: 8 "):
        onnxprune.prune(vgg_int8, method="id", ratio=0.5, data=_calibration(16))
    source, target = tmp_path / "int8.onnx", tmp_path / "pruned.onnx"
    onnx.save(vgg_int8, source)
    before = file_hash(source)
    assert main([str(source), "--method", "magnitude", "--ratio", "0.5", "-o", str(target)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "quantized" in line and "prune the float model" in line
    assert not target.exists() and file_hash(source) == before
    assert main(["analyze", str(source)]) == 0
    assert "the model is quantized: 8 " in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["fixed batch", "no sample axis"])
def test_int8_calibrates_a_model_that_takes_one_sample_per_run(kind, tmp_path, capsys):
    """A fixed-batch-1 export is fed batches of one, and so is a model whose input has no
    sample axis (a detector's image, the data's samples in front); the written model takes its
    input as the original declares it, and stays close to it."""
    from graphs import conv_chain
    from test_unbatched import unbatched_chain

    model = conv_chain(batch=1) if kind == "fixed batch" else unbatched_chain()
    images = np.random.default_rng(9).standard_normal((24, 3, 8, 8)).astype(np.float32)
    path, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "q.onnx"
    onnx.save(model, path)
    np.savez(data, x=images)
    assert main(["quantize", str(path), "--data", str(data), "-o", str(out)]) == 0
    assert "rel-L2" in capsys.readouterr().out
    quantized = onnx.load(out)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in quantized.graph.node}
    assert quantized.graph.input[0].type == model.graph.input[0].type
    x = images[:1] if kind == "fixed batch" else images[0]
    (want,), (got,) = (run_model(m, {"x": x}).values() for m in (model, quantized))
    assert np.linalg.norm(got - want) <= 0.05 * np.linalg.norm(want)
