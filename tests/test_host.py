"""`--round-to auto` / `--target`: ORT's NCHWc channel block from CPU flags, and its plumbing."""

from __future__ import annotations

import os
import platform

import onnx
import pytest
from conftest import reference_path

import onnxprune.measure.host as host
from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.measure.host import host_block_size, nchwc_block_size, round_to_for

SKYLAKE_X = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f avx512dq avx512cd
bugs\t\t: spectre_v1
"""
HASWELL = "flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2\n"
SSE_ONLY = "flags\t\t: fpu vme sse sse2 ssse3 lm\n"
# A flag that merely starts with 'avx512' (here without avx512f itself) is not AVX-512F.
AVX512_PREFIX_ONLY = "flags\t\t: sse2 avx avx2 avx512_bf16 avx512fp16x\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


@pytest.mark.parametrize(
    "machine, cpuinfo, block",
    [
        ("x86_64", SKYLAKE_X, 16),
        ("AMD64", SKYLAKE_X, 16),
        ("x86_64", HASWELL, 8),
        ("x86_64", SSE_ONLY, 8),
        ("x86_64", AVX512_PREFIX_ONLY, 8),
        ("x86_64", "", 8),
        ("aarch64", GRAVITON, 1),
        ("aarch64", SKYLAKE_X, 1),  # the flags of another architecture do not count
    ],
)
def test_block_size_from_flags(machine, cpuinfo, block):
    assert nchwc_block_size(machine, cpuinfo) == block


@pytest.mark.parametrize(
    "round_to, target, step",
    [
        (None, None, 16),
        (4, None, 4),
        (1, None, 1),
        (None, "cpu-avx2", 8),
        ("auto", "cpu-avx2", 8),
        ("auto", "cpu-avx512", 16),
        (None, "arm-neon", 1),
        (None, "arm-neon-nchwc", 16),
        (None, "cuda", 8),
    ],
)
def test_round_to_for_explicit_values_and_targets(round_to, target, step):
    assert round_to_for(round_to, target) == step


def test_auto_is_the_host_block(monkeypatch):
    monkeypatch.setattr(host, "host_block_size", lambda: 8)
    assert round_to_for("auto", None) == 8


def test_a_number_and_a_target_together_are_refused():
    with pytest.raises(UsageError, match="both set the rounding"):
        round_to_for(8, "cpu-avx512")


@pytest.mark.skipif(platform.machine().lower() not in host.X86_64, reason="x86-64 only")
def test_host_reads_the_flags_file_and_refuses_without_it(tmp_path):
    flags = tmp_path / "cpuinfo"
    flags.write_text(HASWELL)
    assert host_block_size(flags) == 8
    flags.write_text(SKYLAKE_X)
    assert host_block_size(flags) == 16
    with pytest.raises(UsageError, match="--target"):
        host_block_size(tmp_path / "missing")


# VGG conv widths 32, 32, 64, 64, 96, 96; ratio 0.3 keeps 23, 45, 68 before rounding.
@pytest.mark.parametrize(
    "flags, widths",
    [
        (["--round-to", "1"], [23, 23, 45, 45, 68, 68]),
        (["--target", "cpu-avx2"], [24, 24, 48, 48, 72, 72]),
        (["--round-to", "auto", "--target", "cpu-avx512"], [16, 16, 48, 48, 64, 64]),
        ([], [16, 16, 48, 48, 64, 64]),
    ],
)
def test_cli_rounds_kept_widths_to_the_target_block(tmp_path, flags, widths):
    out = tmp_path / "vgg.pruned.onnx"
    args = [str(reference_path("vgg")), "--method", "magnitude", "--ratio", "0.3"]
    assert main([*args, "--no-verify", "-o", str(out), *flags]) == 0
    convs = [i.dims[0] for i in onnx.load(out).graph.initializer if len(i.dims) == 4]
    assert convs == widths


def test_cli_refuses_a_bad_round_to(capsys):
    assert main([str(reference_path("vgg")), "--round-to", "0"]) == 2
    assert "positive integer or 'auto'" in capsys.readouterr().err


def _ort_block(tmp_path) -> int:
    """The channel block this ONNX Runtime really uses: the width its optimizer pads a 36-channel
    Conv filter to (48 = block 16, 40 = block 8; unpadded 36: no NCHWc, block 1)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((36, 36, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 36, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    width = max(i.dims[0] for i in optimized.graph.initializer if len(i.dims) == 4)
    return {48: 16, 40: 8, 36: 1}[width]


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/cpuinfo")
def test_auto_agrees_with_the_block_onnxruntime_pads_to_on_this_host(tmp_path):
    if os.environ.get("ONNXPRUNE_TEST_ORT") == "disable_all":
        pytest.skip("reads the NCHWc layout ORT's optimiser makes, which this run switches off")
    assert host_block_size() == _ort_block(tmp_path)


@pytest.mark.parametrize(
    "flags, step", [([], 16), (["--target", "cpu-avx2"], 8), (["--round-to", "4"], 4)]
)
def test_sweep_and_sensitivity_pass_the_rounding_to_every_cell(flags, step):
    from onnxprune.cli import build_parser
    from onnxprune.cli.sweep import prune_options

    for command in ("sweep", "sensitivity"):
        argv = [command, "m.onnx", "--method" + ("s" if command == "sweep" else ""), "id"]
        args = build_parser().parse_args([*argv, "--eval", "t.npz", *flags])
        assert prune_options(args)["round_to"] == step
