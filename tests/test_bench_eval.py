"""`onnxprune bench` with --eval: file sizes, parameters and scores of deployment variants.

Real ONNX Runtime on the bundled digits VGG and its int8 quantization; scores are checked against
a direct numpy evaluation of the same outputs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import data_path, reference_path, run_model
from onnx import TensorProto, helper

from onnxprune.calib.data import Dataset
from onnxprune.cli import main
from onnxprune.compare.sweep import pyplot
from onnxprune.deploy.quantize import quantize
from onnxprune.measure.cost import count
from onnxprune.measure.latency import benchmark, model_bytes

FAST = ["--repeats", "3", "--warmup", "1", "--min-time", "0"]
TEST = data_path("vgg", "test")


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list:
    """The float VGG and its static int8 quantization, as files."""
    folder = tmp_path_factory.mktemp("variants")
    float_model = onnx.load(reference_path("vgg"))
    with np.load(data_path("vgg")) as data:
        calib = Dataset({"input": data["input"][:64]})
    paths = [folder / "vgg.onnx", folder / "vgg.int8.onnx"]
    onnx.save(float_model, paths[0])
    onnx.save(quantize(float_model, "int8", data=calib), paths[1])
    return paths


def test_table_and_json_carry_size_params_and_scores(variants, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", *map(str, variants), "--eval", str(TEST), "--json", str(out), *FAST]
    assert main(args) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0].split()
    for column in ("params", "size", "accuracy", "agreement", "rel-L2", "p90"):
        assert column in header
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["vgg.onnx", "vgg.int8.onnx"]
    for row, path in zip(rows, variants, strict=True):
        assert row["file_bytes"] == path.stat().st_size
        assert row["params"] == count(onnx.load(path)).params
    with np.load(TEST) as data:
        x, labels = data["input"], data["labels"]
    ref, int8 = (run_model(onnx.load(p), {"input": x})["logits"] for p in variants)
    assert rows[0]["accuracy"] == pytest.approx(np.mean(ref.argmax(1) == labels), abs=1e-12)
    assert rows[1]["accuracy"] == pytest.approx(np.mean(int8.argmax(1) == labels), abs=1e-12)
    assert rows[0]["agreement"] == 1.0 and rows[0]["rel_l2"] == 0.0
    agreement = np.mean(int8.argmax(1) == ref.argmax(1))
    assert rows[1]["agreement"] == pytest.approx(agreement, abs=1e-12)
    rel = np.linalg.norm(int8.astype(np.float64) - ref) / np.linalg.norm(ref.astype(np.float64))
    assert rows[1]["rel_l2"] == pytest.approx(rel, rel=1e-6)
    assert 0 < rows[1]["rel_l2"] < 0.5  # int8 is close to, and not identical with, the float


def test_without_labels_agreement_is_scored_and_accuracy_is_not(variants, tmp_path):
    with np.load(TEST) as data:
        unlabelled = Dataset({"input": data["input"][:50]})
    result = benchmark(list(map(str, variants)), repeats=2, warmup=0, min_time=0,
                       evaluation=unlabelled)  # fmt: skip
    assert [r.accuracy for r in result.rows] == [None, None]
    assert result.rows[0].agreement == 1.0
    assert "accuracy" not in result.format_table().splitlines()[0]


def test_file_size_counts_external_data_once(tmp_path):
    model = onnx.load(reference_path("vgg"))
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    data = tmp_path / "ext.data"
    assert model_bytes(path) == path.stat().st_size + data.stat().st_size
    assert data.stat().st_size > path.stat().st_size  # the weights really are outside


def test_plot_needs_eval_data(variants, capsys):
    assert main(["bench", str(variants[0]), "--plot", "x.png", *FAST]) == 2
    assert "--eval" in capsys.readouterr().err


def test_plot_is_written_or_its_absence_explained(variants, tmp_path, capsys):
    plot = tmp_path / "bench.png"
    args = ["bench", *map(str, variants), "--eval", str(TEST), "--plot", str(plot), *FAST]
    assert main(args) == 0
    if pyplot() is None:
        assert "matplotlib" in capsys.readouterr().err and not plot.exists()
    else:
        assert plot.stat().st_size > 0


def test_a_model_that_cannot_read_the_data_is_refused(variants, capsys):
    mlp = reference_path("mlp")
    assert main(["bench", str(variants[0]), str(mlp), "--eval", str(TEST), *FAST]) == 1
    assert "'mlp.onnx' cannot run on the evaluation data" in capsys.readouterr().err


def test_a_model_with_another_output_shape_is_refused(variants, tmp_path, capsys):
    model = onnx.load(variants[0])
    logits = model.graph.output[0].name
    model.graph.initializer.extend(
        [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in [("lo", 0), ("hi", 5)]]
    )
    model.graph.node.append(helper.make_node("Slice", [logits, "lo", "hi", "one"], ["first5"]))
    model.graph.initializer.append(helper.make_tensor("one", TensorProto.INT64, [1], [1]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("first5", TensorProto.FLOAT, None))
    path = tmp_path / "five.onnx"
    onnx.save(model, path)
    assert main(["bench", str(variants[0]), str(path), "--eval", str(TEST), *FAST]) == 1
    assert "(540, 5)" in capsys.readouterr().err
