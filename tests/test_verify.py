"""Verification as a user meets it: numbers on held-out data, loud warnings, gates that fail."""

from __future__ import annotations

import json
from pathlib import Path

import graphs
import numpy as np
import onnx
import pytest
from conftest import data_path, reference_path, run_model

import onnxprune
import onnxprune.calib.stats as stats_module
import onnxprune.graph.analyze
import onnxprune.measure.verify as verify_module
from onnxprune.calib.data import Dataset
from onnxprune.calib.split import split_for_verification
from onnxprune.cli import main
from onnxprune.errors import ModelRunError, RejectedError
from onnxprune.graph.load import normalize
from onnxprune.measure.verify import OutputDeviation, Verification, deviation_warning, shortfalls

# vgg, magnitude, 30 % of the channels, no correction: the run a new user tried first
FAR_OFF = ["--method", "magnitude", "--ratio", "0.3"]


def _vgg_calib() -> dict[str, np.ndarray]:
    with np.load(data_path("vgg")) as data:
        return {"input": data["input"]}


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("onnxprune: warning: ")]


# --- numbers --------------------------------------------------------------------------------------


def test_reported_deviation_is_measured_on_exactly_the_held_out_samples():
    """Recomputed by numpy on the held-out indices: rel-L2, max |Δ| and top-1 agreement."""
    calib = _vgg_calib()
    result = onnxprune.prune(reference_path("vgg"), method="magnitude", ratio=0.3, data=calib)
    held = split_for_verification(
        Dataset(calib), share=0.125, samples=64, seed=0, fitted=False
    ).held_out
    feeds = {"input": calib["input"][held]}
    ref = run_model(onnx.load(str(reference_path("vgg"))), feeds)["logits"].astype(np.float64)
    got = run_model(result.model, feeds)["logits"].astype(np.float64)
    check = result.report.verification
    (out,) = check.outputs
    assert check.samples == len(held) == 64 and check.independent
    assert out.rel_l2 == pytest.approx(np.linalg.norm(got - ref) / np.linalg.norm(ref), rel=1e-6)
    assert out.max_abs == pytest.approx(np.abs(got - ref).max(), rel=1e-6)
    assert out.top1_agreement == np.mean(got.argmax(1) == ref.argmax(1))
    assert check.agreement == out.top1_agreement and check.rel_l2 == out.rel_l2


def test_with_a_statistics_pass_the_original_is_not_run_again(monkeypatch):
    """id runs the original once, tapped, for its statistics; the same session computes its
    outputs on the held-out samples, and verification reads them: `run_original` is never
    called, and the numbers are those of a fresh run of the input file (the normalized graph
    computes the same function, up to float32 rounding)."""
    calls = []
    real = verify_module.run_original
    monkeypatch.setattr(verify_module, "run_original", lambda *a: calls.append(a) or real(*a))
    calib = _vgg_calib()
    options = {"compensate": "none", "recalibrate": False}
    result = onnxprune.prune(reference_path("vgg"), method="id", ratio=0.3, data=calib, **options)
    assert calls == []
    held = split_for_verification(
        Dataset(calib), share=0.125, samples=64, seed=0, fitted=True
    ).held_out
    feeds = {"input": calib["input"][held]}
    ref = run_model(onnx.load(str(reference_path("vgg"))), feeds)["logits"].astype(np.float64)
    got = run_model(result.model, feeds)["logits"].astype(np.float64)
    (out,) = result.report.verification.outputs
    assert out.rel_l2 == pytest.approx(np.linalg.norm(got - ref) / np.linalg.norm(ref), rel=1e-5)
    assert out.max_abs == pytest.approx(np.abs(got - ref).max(), rel=1e-5)
    assert out.top1_agreement == np.mean(got.argmax(1) == ref.argmax(1))
    onnxprune.prune(reference_path("vgg"), method="magnitude", ratio=0.3, data=calib)
    assert len(calls) == 1  # no statistics pass: the original runs for verification


@pytest.mark.parametrize("first", [0, 5])
def test_statistics_pass_outputs_are_the_models_and_reuse_its_runs(monkeypatch, first):
    """`collect_all`'s outputs on reference feeds equal a plain run of the model. Reference
    samples that open the statistics stream (verification on fit samples) are read from its
    runs, with no further run; others run after it."""
    calls = []
    real = stats_module.tap_runs
    monkeypatch.setattr(stats_module, "tap_runs", lambda *a: calls.append(a) or real(*a))
    model = graphs.conv_chain()
    feeds = graphs.random_input(model, n=12)
    batches = [{k: v[i : i + 4]} for k, v in feeds.items() for i in range(0, 12, 4)]
    reference = {k: v[first : first + 6] for k, v in feeds.items()}
    group = onnxprune.graph.analyze.analyze(normalize(model))[0]
    taps = [(group.taps[0], group.channels)]
    found = stats_module.collect_all(model, taps, {}, batches, reference=reference)
    assert len(calls) == (1 if first == 0 else 2)
    want = run_model(model, reference)
    assert found.outputs.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(found.outputs[name], value)


def test_shortfalls_name_each_output_and_bound_and_spare_the_boundary():
    outputs = (OutputDeviation("a", 1.0, 0.5, 0.9), OutputDeviation("b", 2.0, 0.7, None))
    check = Verification("passed", 10, "d", outputs)
    assert check.rel_l2 == 0.7 and check.agreement == 0.9
    assert shortfalls(check, min_agreement=0.9, max_rel_l2=0.5) == ("output 'b': rel-L2 0.7 > 0.5",)
    assert shortfalls(check, min_agreement=0.95, max_rel_l2=None) == (
        "output 'a': top-1 agreement 90.0 % < 95 %",
    )
    assert shortfalls(check, min_agreement=None, max_rel_l2=None) == ()
    regressor = Verification("passed", 10, "d", (OutputDeviation("y", 1.0, 0.1, None),))
    assert "cannot be checked" in shortfalls(regressor, min_agreement=0.5, max_rel_l2=None)[0]
    assert deviation_warning(regressor) is None


# --- the command line -----------------------------------------------------------------------------


@pytest.fixture
def vgg(tmp_path) -> Path:
    path = tmp_path / "vgg.onnx"
    path.write_bytes(reference_path("vgg").read_bytes())
    return path


def test_a_far_off_result_warns_on_stderr_and_in_the_report(capsys, vgg, tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    args = [str(vgg), *FAR_OFF, "--data", str(data_path("vgg")), "-o", str(out)]
    assert main([*args, "--report", str(report)]) == 0
    (warning,) = _warnings(capsys.readouterr().err)
    assert "never saw" in warning and "top-1 agreement" in warning and "< 90 %" in warning
    data = json.loads(report.read_text())
    assert data["warnings"] == [warning.removeprefix("onnxprune: warning: ")]
    check = data["verification"]
    assert check["agreement"] < 0.9 and check["independent"] and "held out" in check["split"]
    assert out.is_file()


def test_min_agreement_rejects_it_with_exit_3_and_writes_nothing(capsys, vgg, tmp_path):
    out = tmp_path / "small.onnx"
    args = [str(vgg), *FAR_OFF, "--data", str(data_path("vgg")), "-o", str(out)]
    assert main([*args, "--min-agreement", "0.9"]) == 3
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("onnxprune: error: ")]
    assert "verification failed" in line and "< 90 %" in line and "Traceback" not in err
    assert not list(tmp_path.glob("small*")) and not list(tmp_path.glob(".small*"))


def test_keep_rejected_writes_it_under_a_rejected_name_and_still_exits_3(capsys, vgg, tmp_path):
    out = tmp_path / "small.onnx"
    args = [str(vgg), *FAR_OFF, "--data", str(data_path("vgg")), "-o", str(out)]
    assert main([*args, "--max-deviation", "0.5", "--keep-rejected"]) == 3
    assert not out.exists()
    kept = tmp_path / "small.rejected.onnx"
    onnx.checker.check_model(onnx.load(str(kept)), full_check=True)
    captured = capsys.readouterr()
    assert "rel-L2" in captured.err and f"written (rejected): {kept}" in captured.out


def test_a_gate_the_result_meets_passes(capsys, vgg, tmp_path):
    out = tmp_path / "small.onnx"
    args = [str(vgg), "--method", "id", "--ratio", "0.3", "--data", str(data_path("vgg"))]
    assert main([*args, "-o", str(out), "--min-agreement", "0.9", "--max-deviation", "0.5"]) == 0
    assert out.is_file() and not _warnings(capsys.readouterr().err)


def test_the_api_raises_the_rejection_with_the_result_attached():
    with pytest.raises(RejectedError) as excinfo:
        onnxprune.prune(reference_path("vgg"), method="magnitude", ratio=0.3,
                        data=_vgg_calib(), min_agreement=0.9)  # fmt: skip
    assert excinfo.value.result.report.verification.agreement < 0.9


def test_separate_verify_data_is_used_and_named(capsys, vgg, tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    args = [str(vgg), "--method", "id", "--data", str(data_path("vgg")), "-o", str(out)]
    verify = data_path("vgg", "test")
    assert main([*args, "--verify-data", str(verify), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert "separate verification data" in data["verification"]["split"]
    assert str(verify) in data["verification"]["data"]
    assert data["data"].endswith("(512 samples)")  # the fit kept every calibration sample


def test_verify_data_with_verification_off_is_a_usage_error(capsys, vgg, tmp_path):
    args = [str(vgg), "--verify-data", str(data_path("vgg", "test")), "--no-verify"]
    assert main([*args, "-o", str(tmp_path / "small.onnx")]) == 2
    assert "verification is off" in capsys.readouterr().err


def test_random_data_is_not_split_and_the_report_says_so(capsys, vgg, tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    args = [str(vgg), "--method", "id", "--data", "random", "-o", str(out)]
    assert main([*args, "--report", str(report)]) == 0
    check = json.loads(report.read_text())["verification"]
    assert not check["independent"] and "no split (synthetic random data)" in check["split"]


def _gather_model() -> onnx.ModelProto:
    """y = c2(relu(c1(x))) + table[idx]: an index input the data can push out of range."""
    b = graphs.Builder(4)
    conv = b.conv("c2", b.relu("r1", b.conv("c1", "x", 3, 8)), 8, 4)
    index = b.node("Cast", "cast", ["idx"], to=onnx.TensorProto.INT64)
    table = b.node("Gather", "gather", [b.rand("table", 10, 4, 1, 1), index], axis=0)
    return b.model([b.node("Add", "add", [conv, table])],
                   inputs=[("x", ("N", 3, 8, 8)), ("idx", ("N",))])  # fmt: skip


@pytest.mark.parametrize("method", ["magnitude", "id"])  # fails in verification / statistics
def test_the_original_failing_on_the_data_is_the_inputs_problem_exit_1(capsys, tmp_path, method):
    model, source, out = _gather_model(), tmp_path / "g.onnx", tmp_path / "small.onnx"
    onnx.save(model, str(source))
    feeds = graphs.random_input(model, 16)
    feeds["idx"] = np.full(16, 99, np.float32)  # the table has 10 rows
    with pytest.raises(ModelRunError, match="original model"):
        onnxprune.prune(model, method=method, ratio=0.5, round_to=1, data=feeds)
    np.savez(tmp_path / "bad.npz", **feeds)
    args = [str(source), "--method", method, "--ratio", "0.5", "--round-to", "1", "-o", str(out)]
    assert main([*args, "--data", str(tmp_path / "bad.npz")]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("onnxprune: error: ")]
    assert "original model" in line and "verification failed" not in line
    assert not out.exists()


def test_a_missed_mac_target_is_one_warning_line_and_a_report_field(capsys, tmp_path):
    """Without --prune-residual the ResNet's residual streams stay whole: 0.15 is out of reach
    (exit 4: the model is written, the miss is reported)."""
    source, out, report = reference_path("resnet"), tmp_path / "r.onnx", tmp_path / "r.json"
    args = [str(source), "--target-macs", "0.15", "-o", str(out), "--report", str(report)]
    assert main(args) == 4
    (warning,) = [w for w in _warnings(capsys.readouterr().err) if "target" in w]
    assert "target macs 0.150 missed" in warning and "--prune-residual" in warning
    target = json.loads(report.read_text())["target"]
    assert target["missed"] and target["reached"] > 0.25 and target["target"] == 0.15


# --- runs -----------------------------------------------------------------------------------------


class _CountingSession:
    """An ORT session that counts its runs and the samples each took."""

    def __init__(self, session):
        self.session, self.sizes = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, names, feeds):
        self.sizes.append(len(next(iter(feeds.values()))))
        return self.session.run(names, feeds)


def _counting(monkeypatch) -> list[_CountingSession]:
    made, real = [], verify_module.session_for
    monkeypatch.setattr(
        verify_module, "session_for", lambda m: made.append(_CountingSession(real(m))) or made[-1]
    )
    return made


def test_verification_runs_cut_a_dynamic_batch_into_bounded_parts(monkeypatch):
    """`run` takes at most as many samples per run as keep the largest activation (its shape
    inferred, the model stating none) under RUN_TENSOR_BYTES, with the outputs of one run."""
    model = graphs.conv_chain()
    largest = max(
        4 * int(np.prod([d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]))
        for vi in model.graph.value_info
    )
    del model.graph.value_info[:]
    feeds = graphs.random_input(model, n=10)
    monkeypatch.setattr(onnxprune.calib.data, "RUN_TENSOR_BYTES", 3 * largest)
    made = _counting(monkeypatch)
    got = verify_module.run(model, feeds)
    assert made[0].sizes == [3, 3, 3, 1]
    want = run_model(model, feeds)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6 * np.abs(value).max())


def test_verification_runs_outputs_without_samples_on_axis_0_at_once(monkeypatch):
    """Outputs that hold the samples on another axis (a sequence model's (time, batch, …)) do
    not join along axis 0: such a model takes all samples in one run."""
    model = graphs.conv_chain()
    (y,) = model.graph.output
    model.graph.node.append(onnx.helper.make_node("Transpose", [y.name], ["t"], perm=[1, 0, 2, 3]))
    del model.graph.output[:], model.graph.value_info[:]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [4, "N", 8, 8])
    )
    monkeypatch.setattr(onnxprune.calib.data, "RUN_TENSOR_BYTES", 1)
    made = _counting(monkeypatch)
    feeds = graphs.random_input(model, n=6)
    got = verify_module.run(model, feeds)
    assert made[0].sizes == [6]
    np.testing.assert_array_equal(got["t"], run_model(model, feeds)["t"])
