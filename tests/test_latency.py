"""The latency benchmark and `onnxprune bench`: well-formed results and one-line errors.

No timing assertions: the machine is noisy, so only structure and consistency are checked.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune.cli as cli
from onnxprune.errors import UsageError
from onnxprune.measure.cost import count
from onnxprune.measure.latency import _cpuinfo_cores, benchmark, physical_cores

FAST = {"warmup": 2, "repeats": 7, "min_time": 0.0}


def _conv_model(channels: int, batch: int | str = "N", hw: tuple = (16, 16)) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((channels, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        f"conv{channels}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, *hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, model in [
        ("big", _conv_model(16)),
        ("small", _conv_model(8)),
        ("dyn", _conv_model(8, hw=("h", "w"))),
        ("fixed", _conv_model(8, 1)),
    ]:
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(model, paths[name])
    (tmp_path / "junk.onnx").write_text("not a model")
    paths["junk"] = tmp_path / "junk.onnx"
    return paths


@pytest.fixture
def main(monkeypatch):
    """`onnxprune.cli.main`; falls back to bench alone while other subcommands are missing."""
    try:
        cli._subcommands()
    except ImportError:
        from onnxprune.cli import bench

        monkeypatch.setattr(cli, "_subcommands", lambda: [bench])
    return cli.main


def test_benchmark_rows_are_well_formed(files):
    result = benchmark([str(files["big"]), str(files["small"])], batches=(1, 3), **FAST)
    assert [(r.model, r.batch) for r in result.rows] == [
        ("big.onnx", 1),
        ("small.onnx", 1),
        ("big.onnx", 3),
        ("small.onnx", 3),
    ]
    for row in result.rows:
        assert row.median_ms > 0 and row.mean_ms > 0 and row.iqr_ms >= 0
        assert row.p90_ms >= row.median_ms
        assert len(row.times_ms) == FAST["repeats"]  # one time per interleaved round
        assert row.throughput == pytest.approx(row.batch * 1000 / row.median_ms)
        assert row.unknown_nodes == 0
    for first, second in (result.rows[:2], result.rows[2:]):
        assert first.speedup == 1.0 and first.ideal_speedup == 1.0
        assert second.speedup == pytest.approx(first.median_ms / second.median_ms)
        assert second.ideal_speedup == pytest.approx(2.0)  # 16 vs 8 output channels
        assert second.params * 2 == first.params
    macs_b1 = count(_conv_model(16)).macs
    assert result.rows[0].macs == macs_b1 and result.rows[2].macs == 3 * macs_b1


def test_result_dict_and_table(files):
    result = benchmark([_conv_model(16), _conv_model(8)], seed=3, **FAST)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["settings"]["threads"] == physical_cores()
    assert data["settings"]["provider"] == "cpu"
    row = data["rows"][1]
    expected = {
        "model",
        "batch",
        "params",
        "file_bytes",
        "macs",
        "median_ms",
        "p90_ms",
        "iqr_ms",
        "mean_ms",
        "throughput",
        "speedup",
        "ideal_speedup",
        "unknown_nodes",
        "times_ms",
        "accuracy",
        "agreement",
        "rel_l2",
        "cosine",
        "retrieval",
        "spearman",
        "provider",
    }
    assert set(row) == expected
    assert row["provider"] == "cpu"
    assert len(row["times_ms"]) == FAST["repeats"]
    table = result.format_table()
    assert "median ms" in table and "1:conv8" in table
    assert str(result.rows[0].times_ms[0]) not in table


def test_min_time_adds_rounds_for_every_model_alike(files):
    result = benchmark([_conv_model(8), _conv_model(8)], warmup=0, repeats=1, min_time=0.05)
    a, b = result.rows
    assert len(a.times_ms) == len(b.times_ms) > 1


def test_cpuinfo_counts_physical_cores_not_hyperthreads():
    """2 sockets × 2 cores × 2 threads: 8 logical CPUs, 4 physical cores."""
    blocks = [
        f"processor\t: {4 * s + 2 * c + t}\nphysical id\t: {s}\ncore id\t\t: {c}\n"
        for s in range(2) for c in range(2) for t in range(2)
    ]  # fmt: skip
    assert _cpuinfo_cores("\n".join(blocks)) == 4
    assert _cpuinfo_cores("processor\t: 0\n") is None
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_explicit_threads_and_cuda_error(files):
    result = benchmark([str(files["small"])], threads=1, **FAST)
    assert result.settings["threads"] == 1
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="CUDAExecutionProvider"):
            benchmark([str(files["small"])], providers=("cuda",), **FAST)
    with pytest.raises(UsageError, match="choose from cpu, cuda, tensorrt, openvino"):
        benchmark([str(files["small"])], providers=("rocm",), **FAST)
    with pytest.raises(UsageError, match="each execution provider once"):
        benchmark([str(files["small"])], providers=("cpu", "cpu"), **FAST)


def test_dynamic_dims_need_input_shape(files):
    with pytest.raises(UsageError, match=r"dynamic dims \['h', 'w'\]; pass --input-shape x:"):
        benchmark([str(files["dyn"])], **FAST)
    result = benchmark([str(files["dyn"])], batches=(2,), input_shapes={"x": (1, 3, 8, 8)}, **FAST)
    assert result.rows[0].macs == 2 * 8 * 8 * 8 * 27


def test_fixed_batch_is_timed_at_its_batch_with_a_note(files):
    result = benchmark([str(files["fixed"]), str(files["small"])], batches=(1, 4), **FAST)
    assert [row.batch for row in result.rows] == [1, 1]
    assert result.rows[0].macs == result.rows[1].macs == 8 * 16 * 16 * 27
    assert "fixes its batch to 1: timed at 1 instead of [1, 4]" in result.format_table()
    assert "note" not in benchmark([str(files["fixed"])], **FAST).settings


def test_models_fixing_different_batches_are_refused(files, tmp_path):
    onnx.save(_conv_model(8, 2), tmp_path / "two.onnx")
    with pytest.raises(UsageError, match="fix different batch sizes"):
        benchmark([str(files["fixed"]), str(tmp_path / "two.onnx")], **FAST)


def test_cli_writes_json(files, tmp_path, main, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            str(files["big"]),
            str(files["small"]),
            "--batch",
            "1,2",
            "--repeats",
            "5",
            "--warmup",
            "1",
            "--min-time",
            "0",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 1, 2, 2]
    assert all(len(r["times_ms"]) == 5 and math.isfinite(r["median_ms"]) for r in data["rows"])
    assert "speedup" in capsys.readouterr().out


def test_cli_json_to_stdout(files, main, capsys):
    code = main(["bench", str(files["small"]), "--repeats", "3", "--min-time", "0", "--json", "-"])
    assert code == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["rows"][0]["model"] == "small.onnx"
    assert "median ms" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.onnx"], "does not exist"),
        (["@junk"], "not a valid ONNX file"),
        (["@dyn"], "dynamic dims"),
        (["@small", "--batch", "1,x"], "--batch '1,x'"),
        (["@small", "--batch", "0"], "--batch '0'"),
        (["@small", "--input-shape", "x=1,3"], "--input-shape 'x=1,3'"),
        (["@small", "--input-shape", "y:1,3,16,16"], "model inputs are ['x']"),
    ],
)
def test_cli_errors_are_one_line(files, main, capsys, args, message):
    argv = ["bench"] + [str(files[a[1:]]) if a.startswith("@") else a for a in args]
    assert main(argv + ["--repeats", "1", "--min-time", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_random_index_inputs_fit_a_two_row_embedding_table():
    """Regression: random int64 inputs were drawn from 0..9, and BERT's token_type_ids index a
    table of 2 rows, so `bench` of any exported BERT failed in ORT's Gather."""
    table = numpy_helper.from_array(np.ones((2, 4), np.float32), "segments")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["segments", "token_type_ids"], ["y"])],
        "bert_segments",
        [helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 4])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = benchmark([model], batches=(4,), **FAST)
    assert result.rows[0].batch == 4 and result.rows[0].median_ms > 0
