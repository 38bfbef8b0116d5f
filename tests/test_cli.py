"""The command line, in process: exit codes, one-line errors, no partial output, reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import graphs
import numpy as np
import onnx
import pytest
from conftest import ROOT, data_path, file_hash, reference_path

from onnxprune.cli import main
from onnxprune.errors import ModelLoadError


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert lines[0].startswith("onnxprune: error: "), lines[0]
    assert "Traceback" not in err
    assert all(line.startswith("hint: ") for line in lines[1:]), lines
    return lines[0]


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "vgg.onnx"
    path.write_bytes(reference_path("vgg").read_bytes())
    return path


def _fails(
    capsys, args: list[str], code: int, *, source: Path | None, output: Path, contains: str = ""
) -> str:
    digest = file_hash(source) if source is not None and source.is_file() else None
    assert main(args) == code
    captured = capsys.readouterr()
    line = _one_line_error(captured.err)
    assert contains in line
    assert not output.exists(), "a failed run left an output file"
    assert not list(output.parent.glob(f".{output.name}*")), "a temp file was left behind"
    if digest is not None:
        assert file_hash(source) == digest
    return line


# --- failures ------------------------------------------------------------------------------------


def test_missing_path(capsys, tmp_path):
    out = tmp_path / "out.onnx"
    _fails(
        capsys,
        [str(tmp_path / "nope.onnx"), "-o", str(out)],
        1,
        source=None,
        output=out,
        contains="nope.onnx",
    )


def test_directory(capsys, tmp_path):
    out = tmp_path / "out.onnx"
    _fails(
        capsys,
        [str(tmp_path), "-o", str(out)],
        1,
        source=None,
        output=out,
        contains="is not a file",
    )


def test_not_onnx(capsys, tmp_path):
    src = tmp_path / "readme.onnx"
    src.write_text("hello\nworld\n")
    out = tmp_path / "out.onnx"
    _fails(capsys, [str(src), "-o", str(out)], 1, source=src, output=out, contains="readme.onnx")


def test_truncated_protobuf(capsys, tmp_path):
    data = reference_path("resnet").read_bytes()
    src = tmp_path / "half.onnx"
    src.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.onnx"
    _fails(capsys, [str(src), "-o", str(out)], 1, source=src, output=out, contains="half.onnx")


def test_opset_above_the_range(capsys, tmp_path):
    src = tmp_path / "new.onnx"
    onnx.save_model(graphs.conv_chain(opset=29), str(src))
    out = tmp_path / "out.onnx"
    _fails(capsys, [str(src), "-o", str(out)], 1, source=src, output=out, contains="opset 29")


def test_an_older_opset_is_converted_and_said_so(capsys, tmp_path):
    src = tmp_path / "old.onnx"
    onnx.save_model(graphs.conv_chain(opset=9), str(src))
    digest, out = file_hash(src), tmp_path / "out.onnx"
    assert main([str(src), "--method", "magnitude", "--ratio", "0.5", "-o", str(out)]) == 0
    assert "converted from opset 9 to opset 11" in capsys.readouterr().out
    assert onnx.load(str(out)).opset_import[0].version == 11
    assert file_hash(src) == digest


def test_nothing_prunable_fails_unless_allow_noop(capsys, tmp_path):
    src = tmp_path / "gemm.onnx"
    onnx.save_model(graphs.single_gemm(), str(src))
    out = tmp_path / "out.onnx"
    _fails(
        capsys, [str(src), "-o", str(out)], 1, source=src, output=out, contains="nothing to prune"
    )
    assert main([str(src), "-o", str(out), "--allow-noop"]) == 0
    assert out.is_file()
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize("ratio", ["1.5", "-0.1"])
def test_ratio_out_of_range_is_usage(capsys, model, ratio):
    out = model.with_name("out.onnx")
    _fails(
        capsys,
        [str(model), "--ratio", ratio, "-o", str(out)],
        2,
        source=model,
        output=out,
        contains=f"got {float(ratio)}",
    )


def test_output_equal_to_input_is_usage(capsys, model):
    digest = file_hash(model)
    assert main([str(model), "-o", str(model)]) == 2
    _one_line_error(capsys.readouterr().err)
    assert file_hash(model) == digest


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, named",
    [
        (
            {
                "image": np.zeros((4, 1, 32, 32), np.float32),
                "other": np.zeros((4, 1, 32, 32), np.float32),
            },
            "'input'",
        ),
        ({"input": np.zeros((4, 1, 28, 28), np.float32)}, "'input'"),
        ({"input": np.zeros((4, 1, 32, 32), np.int32)}, "'input'"),
        ({"input": np.full((4, 1, 32, 32), np.nan, np.float32)}, "NaN"),
    ],
    ids=["name", "shape", "dtype", "nan"],
)
def test_calibration_data_that_does_not_fit(capsys, model, tmp_path, arrays, named):
    data = _npz(tmp_path, **arrays)
    out = tmp_path / "out.onnx"
    _fails(
        capsys,
        [str(model), "--method", "id", "--data", str(data), "-o", str(out)],
        1,
        source=model,
        output=out,
        contains=named,
    )


def test_missing_external_data(capsys, tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save_model(
        graphs.conv_chain(),
        str(src),
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    (tmp_path / "ext.onnx.data").unlink()
    out = tmp_path / "out.onnx"
    _fails(capsys, [str(src), "-o", str(out)], 1, source=src, output=out, contains="ext.onnx.data")


def test_debug_reraises(tmp_path):
    with pytest.raises(ModelLoadError):
        main(["--debug", str(tmp_path / "nope.onnx")])


def test_bad_recipe_value_is_an_error_not_a_traceback(capsys, model, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"/features/features.0/features.0.0/Conv": 1.5}))
    out = tmp_path / "out.onnx"
    _fails(
        capsys,
        [str(model), "--recipe", str(recipe), "-o", str(out)],
        2,
        source=model,
        output=out,
        contains="recipe",
    )


def test_non_numeric_recipe_value_is_a_one_line_error(capsys, model, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"/features/features.0/features.0.0/Conv": "half"}))
    out = tmp_path / "out.onnx"
    _fails(
        capsys,
        [str(model), "--recipe", str(recipe), "-o", str(out)],
        2,
        source=model,
        output=out,
        contains="recipe",
    )


# --- success --------------------------------------------------------------------------------------


def test_exact_borders_adds_the_border_maps_after_padded_consumers(tmp_path, model):
    common = [
        str(model),
        "--compensate",
        "lsq",
        "--ratio",
        "0.5",
        "--round-to",
        "1",
        "--data",
        str(data_path("vgg")),
        "--no-verify",
    ]
    assert main([*common, "-o", str(tmp_path / "plain.onnx")]) == 0
    assert main([*common, "--exact-borders", "-o", str(tmp_path / "exact.onnx")]) == 0
    ops = {
        name: [n.op_type for n in onnx.load(str(tmp_path / name)).graph.node]
        for name in ("plain.onnx", "exact.onnx")
    }
    assert ops["exact.onnx"].count("Add") > ops["plain.onnx"].count("Add")


def test_default_output_beside_the_input(capsys, model):
    digest = file_hash(model)
    assert main([str(model), "--round-to", "1"]) == 0
    out = model.with_name("vgg.pruned.onnx")
    assert out.is_file()
    onnx.checker.check_model(str(out), full_check=True)
    captured = capsys.readouterr()
    assert f"written: {out}" in captured.out
    assert file_hash(model) == digest
    assert sorted(p.name for p in model.parent.iterdir()) == ["vgg.onnx", "vgg.pruned.onnx"]


def test_report_file(capsys, model, tmp_path):
    report = tmp_path / "report.json"
    out = tmp_path / "small.onnx"
    assert (
        main(
            [
                str(model),
                "-o",
                str(out),
                "--report",
                str(report),
                "--method",
                "id",
                "--data",
                str(data_path("vgg")),
                "--calib-samples",
                "64",
            ]
        )
        == 0
    )
    data = json.loads(report.read_text())
    assert data["method"] == "id"
    assert len(data["groups"]) == 8
    assert data["params"][1] < data["params"][0] and data["macs"][1] < data["macs"][0]
    assert data["verification"]["checker"].startswith("passed")
    assert data["verification"]["outputs"][0]["name"] == "logits"
    assert out.is_file()


def test_report_to_stdout_is_pure_json(capsys, model, tmp_path):
    out = tmp_path / "small.onnx"
    assert main([str(model), "-o", str(out), "--report", "-"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert {"groups", "params", "macs", "verification"} <= set(data)
    assert "written:" in captured.err


def _kept(capsys, model: Path, tmp_path: Path, *args: str) -> dict[str, int]:
    out = tmp_path / "small.onnx"
    assert main([str(model), "-o", str(out), "--report", "-", "--round-to", "1", *args]) == 0
    return {g["name"]: g["kept"] for g in json.loads(capsys.readouterr().out)["groups"]}


CONV0 = "/features/features.0/features.0.0/Conv"  # 32 channels
CONV1 = "/features/features.1/features.1.0/Conv"  # 32 channels
FC = "/classifier/classifier.1/Gemm"  # 128 features


def test_layer_ratio_exclude_and_recipe_take_effect(capsys, model, tmp_path):
    kept = _kept(
        capsys,
        model,
        tmp_path,
        "--ratio",
        "0.5",
        "--layer-ratio",
        "features=0.25",
        "--layer-ratio",
        r"features\.1\b=0.75",
        "--exclude",
        "classifier",
    )
    assert kept[CONV0] == 24  # features=0.25
    assert kept[CONV1] == 8  # the later, more specific pattern wins
    assert kept[FC] == 128  # excluded
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({CONV0: 0.125, FC: 0.75}))
    kept = _kept(capsys, model, tmp_path, "--ratio", "0.5", "--recipe", str(recipe))
    assert (kept[CONV0], kept[CONV1], kept[FC]) == (28, 16, 32)


def test_module_entry_point_help():
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "onnxprune", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0
    assert "usage: onnxprune" in proc.stdout and "exit codes" in proc.stdout


def test_missed_target_warns_and_exits_4_with_the_model_written(capsys, tmp_path):
    """ResNet's residual streams are left whole without --prune-residual, so it cannot reach
    15 % of its MACs: the model is written, the miss is one warning line, and the exit code
    says so; a target it can reach exits 0."""
    src, out = reference_path("resnet"), tmp_path / "small.onnx"
    assert main([str(src), "--target-macs", "0.15", "--no-verify", "-o", str(out)]) == 4
    err = capsys.readouterr().err
    assert out.is_file()
    assert [line for line in err.splitlines() if "target macs 0.150 missed" in line] == [
        next(line for line in err.splitlines() if line.startswith("onnxprune: warning: target"))
    ]
    assert main([str(src), "--target-macs", "0.5", "--no-verify", "-o", str(out)]) == 0
    assert "missed" not in capsys.readouterr().err
