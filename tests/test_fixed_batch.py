"""Models whose batch dim is fixed (torch.onnx.export without dynamic_axes, most YOLO exports):
every stage feeds them the batch they accept, with no extra flags, and computes what it computes
for the same weights with a dynamic batch."""

from __future__ import annotations

import json

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close, run_model

import onnxprune
from onnxprune.calib.data import InputSpec, batch_for, input_specs, load_data
from onnxprune.cli import main
from onnxprune.errors import DataError
from onnxprune.measure.verify import run


@pytest.fixture
def files(tmp_path):
    """The batch-1 chain, its dynamic twin, and 40 calibration samples."""
    fixed, dynamic = tmp_path / "fixed.onnx", tmp_path / "dynamic.onnx"
    onnx.save(graphs.conv_chain(batch=1), fixed)
    onnx.save(graphs.conv_chain(), dynamic)
    data = tmp_path / "calib.npz"
    rng = np.random.default_rng(3)
    np.savez(data, x=rng.standard_normal((40, 3, 8, 8)).astype(np.float32))
    return {"fixed": fixed, "dynamic": dynamic, "data": data, "dir": tmp_path}


def test_the_accepted_batch_is_the_fixed_one_else_the_wanted_one():
    assert batch_for([(1, 3, 8, 8)], 32) == 1
    assert batch_for([("N", 3, 8, 8), (4, 2)], 32) == 4
    assert batch_for([("N", 3, 8, 8), (None, 2)], 32) == 32
    assert batch_for([s.shape for s in input_specs(graphs.conv_chain(batch=1))], 32) == 1


@pytest.mark.parametrize("batch", [1, 2])
def test_run_feeds_a_fixed_batch_model_in_its_batches(files, batch):
    feeds = graphs.random_input(graphs.conv_chain(), n=5)  # with batch 2: 2 + 2 + 1 (+ a copy)
    got = run(graphs.conv_chain(batch=batch), feeds)  # ORT alone refuses 5 samples
    want = run_model(files["dynamic"], feeds)["c3_out"]
    np.testing.assert_allclose(got["c3_out"], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_data_for_a_fixed_batch_fills_whole_batches():
    specs = (InputSpec("x", (2, 3, 8, 8), np.dtype(np.float32)),)
    arrays = {"x": np.zeros((5, 3, 8, 8), np.float32)}
    data = load_data(arrays, specs)
    assert len(data) == 4 and "first 4 (fixed batch 2)" in data.source
    with pytest.raises(DataError, match="1 samples, but the model's inputs fix the batch to 2"):
        load_data({"x": arrays["x"][:1]}, specs)


@pytest.mark.parametrize("method", ["magnitude", "id", "taylor"])
def test_prune_matches_the_dynamic_twin(files, method):
    data = str(files["data"])
    fixed = onnxprune.prune(files["fixed"], method=method, ratio=0.5, data=data, round_to=1)
    dynamic = onnxprune.prune(files["dynamic"], method=method, ratio=0.5, data=data, round_to=1)
    assert fixed.report.verification.samples == 40
    assert fixed.report.macs == dynamic.report.macs
    assert {k: list(p.keep) for k, p in fixed.plans.items()} == {
        k: list(p.keep) for k, p in dynamic.plans.items()
    }
    deviation = [o.rel_l2 for o in dynamic.report.verification.outputs]
    assert [o.rel_l2 for o in fixed.report.verification.outputs] == pytest.approx(deviation)
    assert input_specs(fixed.model)[0].shape == (1, 3, 8, 8)
    feeds = graphs.random_input(fixed.model, n=1)
    assert_outputs_close(dynamic.model, fixed.model, feeds, atol=1e-6)


@pytest.mark.parametrize("method", ["magnitude", "id"])
def test_cli_prune_without_extra_flags(files, capsys, method):
    out = files["dir"] / f"{method}.onnx"
    args = [str(files["fixed"]), "--method", method, "--ratio", "0", "-o", str(out)]
    args += ["--data", str(files["data"])] if method == "id" else []
    assert main(args) == 0
    feeds = graphs.random_input(onnx.load(files["fixed"]), n=1)
    assert_outputs_close(files["fixed"], out, feeds, atol=1e-6)
    assert "max |Δ| 0 " in capsys.readouterr().out


def test_cli_bench_times_the_fixed_batch_with_a_note(files, capsys):
    args = ["bench", str(files["fixed"]), "--batch", "1,32", "--repeats", "2", "--min-time", "0"]
    assert main([*args, "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["batch"] for row in result["rows"]] == [1]
    assert result["settings"]["note"] == (
        "the model fixes its batch to 1: timed at 1 instead of [1, 32]"
    )


def test_cli_sweep_evaluates_a_fixed_batch_model(files, capsys):
    out = files["dir"] / "sweep"
    data = str(files["data"])
    args = ["sweep", str(files["fixed"]), "--methods", "id,magnitude", "--targets", "0.5"]
    assert main([*args, "--data", data, "--eval", data, "--out", str(out), "--repeats", "2"]) == 0
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert len(cells) == 2 and not any(c["error"] for c in cells)
    assert all(0 < c["rel_l2"] < 1 and c["speedup"] for c in cells)
