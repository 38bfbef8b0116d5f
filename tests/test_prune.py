"""`onnxprune.prune` end to end: valid, smaller models of the same interface; the report says what
happened and why; seeds reproduce; random torch graphs prune into valid ONNX.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import graphs
import numpy as np
import onnx
import pytest
import torch
from conftest import (
    REFERENCE_IDS,
    REFERENCE_MODELS,
    ROOT,
    assert_outputs_close,
    file_hash,
    reference_feeds,
    reference_path,
    run_model,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import onnxprune
from onnxprune.cli import build_parser
from onnxprune.config import PruneConfig
from onnxprune.errors import NothingToPruneError, UsageError


@pytest.mark.parametrize("exporter", ["onnx", "dynamo.onnx"])
def test_intermediate_shapes_are_written_only_where_the_original_had_them(exporter):
    """The legacy export has no value_info, the dynamo one has it for every tensor: the pruned
    model follows its input (ONNX Runtime fuses differently with complete shapes)."""
    original = onnx.load(reference_path("vgg", exporter))
    result = onnxprune.prune(original, method="magnitude", ratio=0.5, verify=False)
    assert bool(result.model.graph.value_info) == bool(original.graph.value_info)
    assert bool(original.graph.value_info) == (exporter == "dynamo.onnx")


@pytest.mark.parametrize("name, exporter", REFERENCE_MODELS, ids=REFERENCE_IDS)
def test_magnitude_half_gives_valid_smaller_model(name, exporter, tmp_path):
    path = tmp_path / reference_path(name, exporter).name
    path.write_bytes(reference_path(name, exporter).read_bytes())
    digest = file_hash(path)
    result = onnxprune.prune(path, method="magnitude", ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    before, after = result.report.macs
    assert after < before and result.report.params[1] < result.report.params[0]
    feeds = reference_feeds(name, 16, "test")
    original, pruned = run_model(path, feeds), run_model(result.model, feeds)
    assert {k: v.shape for k, v in original.items()} == {k: v.shape for k, v in pruned.items()}
    assert [i.name for i in result.model.graph.input] == ["input"]
    result.save(tmp_path / "out.onnx")
    assert file_hash(path) == digest  # the input is never modified
    assert (tmp_path / "out.onnx").read_bytes() == result.model.SerializeToString()
    assert result.report.verification is not None
    assert result.report.verification.checker.startswith("passed")


def test_report_rows_say_why_groups_are_left_alone():
    result = onnxprune.prune(reference_path("resnet"), ratio=0.5, exclude=["blocks.3"])
    rows = {row.name: row for row in result.report.groups}
    fc = rows["/fc/Gemm"]
    assert fc.kept == fc.channels
    assert fc.status == "unprunable: channels reach graph output 'logits'"
    trunk = rows["/stem/stem.0/Conv"]
    assert trunk.kept == trunk.channels and trunk.status.startswith("coupled")
    excluded = rows["/blocks/blocks.3/body/body.0/Conv"]
    assert excluded.status == "excluded" and excluded.kept == excluded.channels
    pruned = rows["/blocks/blocks.0/body/body.0/Conv"]
    assert pruned.status == "pruned" and pruned.kept == 16
    text = result.report.format()
    for row in rows.values():
        assert row.name in text and row.status in text


def test_report_json_round_trips():
    result = onnxprune.prune(
        reference_path("mlp"), method="id", ratio=0.5, data=reference_feeds("mlp", 128)
    )
    data = json.loads(result.report.to_json())
    assert data["method"] == "id"
    assert [g["name"] for g in data["groups"]] == [g.name for g in result.report.groups]
    assert [g["kept"] for g in data["groups"]] == [64, 32, 10]
    assert tuple(data["macs"]) == result.report.macs
    assert tuple(data["params"]) == result.report.params
    assert data["verification"]["outputs"][0]["name"] == "logits"
    assert 0 <= data["groups"][0]["error"] <= 1
    assert json.loads(json.dumps(data)) == data


def test_same_seed_same_weights_for_random_method():
    path = reference_path("vgg")

    def weights(seed: int) -> dict[str, np.ndarray]:
        model = onnxprune.prune(path, method="random", ratio=0.5, seed=seed, verify=False).model
        return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}

    first, again, other = weights(3), weights(3), weights(4)
    assert first.keys() == again.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert first.keys() != other.keys() or any(
        first[n].shape != other[n].shape or not np.array_equal(first[n], other[n]) for n in first
    )


def test_nothing_to_prune_raises_unless_allowed():
    model = graphs.single_gemm()
    with pytest.raises(NothingToPruneError):
        onnxprune.prune(model)
    result = onnxprune.prune(model, allow_noop=True)
    assert result.plans == {}
    assert_outputs_close(model, result.model, graphs.random_input(model), atol=0)


def test_prune_keeps_the_interface_and_metadata():
    model = graphs.conv_chain()
    onnx.helper.set_model_props(model, {"author": "tests"})
    model.producer_name = "handmade"
    result = onnxprune.prune(model, ratio=0.5, round_to=1)
    assert result.model.producer_name == "handmade"
    props = {p.key: p.value for p in result.model.metadata_props}
    assert props["author"] == "tests" and "onnxprune" in props
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert [o.name for o in result.model.graph.output] == ["c3_out"]
    dim = result.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "N"  # the dynamic batch survives


@pytest.mark.parametrize(
    "bad",
    [
        {"ratio": 1.0},
        {"ratio": -0.1},
        {"round_to": 0},
        {"method": "nope"},
        {"compensate": "all"},
        {"colour": 1},
        {"width": onnxprune.WidthRule()},
        {"holdout": 0.6},
        {"holdout": -0.1},
        {"min_agreement": 1.5},
        {"max_deviation": 0.0},
        {"min_agreement": 0.9, "verify": False},
    ],
)
def test_bad_options_raise_usage_error_before_anything_runs(bad):
    with pytest.raises(UsageError):
        onnxprune.prune(graphs.conv_chain(), **bad)


# --- random torch graphs ---------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, kind: str, cin: int, cout: int) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        if kind == "residual":  # two convs: y + c(relu(b(y)))
            self.b = nn.Conv2d(cout, cout, 3, padding=1)
            self.c = nn.Conv2d(cout, cout, 1)
        elif kind == "concat":
            self.b = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.a(x)))
        if self.kind == "residual":
            return torch.relu(y + self.c(torch.relu(self.b(y))))
        if self.kind == "concat":
            return torch.cat([y, torch.relu(self.b(x))], dim=1)
        if self.kind == "pool":
            return nn.functional.max_pool2d(y, 2)
        return y


class RandomNet(nn.Module):
    def __init__(self, kinds: list[str], widths: list[int]) -> None:
        super().__init__()
        blocks, cin = [], 1
        for kind, width in zip(kinds, widths, strict=True):
            blocks.append(Block(kind, cin, width))
            cin = 2 * width if kind == "concat" else width
        self.blocks = nn.Sequential(*blocks)
        size = 8 // 2 ** kinds.count("pool")
        self.fc = nn.Linear(cin * size * size, 5)
        with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is exercised
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.blocks(x), 1))


@settings(
    max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    kinds=st.lists(
        st.sampled_from(["plain", "pool", "residual", "concat"]), min_size=1, max_size=3
    ),
    widths=st.lists(st.integers(2, 12), min_size=3, max_size=3),
    ratio=st.floats(0.0, 0.9, exclude_max=True),
    prune_residual=st.booleans(),
    round_to=st.sampled_from([1, 4]),
)
def test_random_torch_graphs_prune_to_valid_models(kinds, widths, ratio, prune_residual, round_to):
    torch.manual_seed(0)
    net = RandomNet(kinds, widths[: len(kinds)])
    model = graphs.export_torch(net, (2, 1, 8, 8))
    feeds = {"input": np.random.default_rng(0).standard_normal((4, 1, 8, 8), np.float32)}
    options = {"round_to": round_to, "prune_residual": prune_residual, "allow_noop": True}
    result = onnxprune.prune(model, ratio=ratio, **options)
    onnx.checker.check_model(result.model, full_check=True)
    assert run_model(result.model, feeds)["logits"].shape == (4, 5)
    for group in result.groups:
        plan = result.plans.get(group.name)
        if plan is not None:
            assert 1 <= len(plan.keep) <= group.channels
            assert len(set(plan.keep.tolist())) == len(plan.keep)
    identity = onnxprune.prune(model, ratio=0.0, **options)
    assert_outputs_close(model, identity.model, feeds, atol=1e-5)


# --- the API and the report as interfaces ---------------------------------------------------------


@pytest.mark.parametrize(
    "keywords",
    [{"method": "id"}, {"ratio": 0.3}, {"seed": 1}, {"round_to": 1}, {"method": "magnitude"}],
)
def test_a_config_and_option_keywords_together_are_refused(keywords):
    """A keyword next to `config` used to lose silently, even when it contradicted the config."""
    config = onnxprune.PruneConfig(method="magnitude")
    with pytest.raises(UsageError, match="both config and option keywords"):
        onnxprune.prune(graphs.conv_chain(), config=config, **keywords)


def test_a_config_alone_is_used_as_given():
    config = onnxprune.PruneConfig(method="random", width=onnxprune.WidthRule(0.5, round_to=1))
    result = onnxprune.prune(graphs.conv_chain(), config=config)
    assert result.report.method == "random" and result.report.options["round_to"] == 1
    assert [row.kept for row in result.report.groups[:2]] == [4, 3]


def test_the_public_names_are_importable_from_the_package():
    code = (
        "import onnxprune\n"
        "assert callable(onnxprune.compare.sweep) and callable(onnxprune.compare.allocate)\n"
        "from onnxprune import Dataset, PruneConfig, RejectedError, Report, WidthRule\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert {"Dataset", "Report", "WidthRule", "compare"} <= set(onnxprune.__all__)


def test_group_errors_and_the_target_outcome_are_report_fields():
    """err and err/opt used to exist only formatted into the table; the allocations' measured
    deviations only inside a note."""
    result = onnxprune.prune(reference_path("vgg"), method="id", target_macs=0.5,
                             data=reference_feeds("vgg", 256), round_to=1)  # fmt: skip
    pruned = [row for row in result.report.groups if row.status == "pruned"]
    assert pruned and all(0 <= row.error < 1 for row in pruned)
    # Eckart–Young: no selection beats the best rank-k map (None where that optimum is ~0)
    assert all(row.error_ratio is None or row.error_ratio >= 1 - 1e-9 for row in pruned)
    assert all("err" not in row.info for row in pruned)
    target = result.report.target
    assert target.kind == "macs" and not target.missed and target.reached <= 0.5 + 0.01
    assert target.deviations[target.allocation] == min(target.deviations.values())
    data = json.loads(result.report.to_json())
    assert data["groups"][0]["error"] == pruned[0].error
    assert data["target"]["deviations"] == dict(target.deviations)
    assert data["verification"]["rel_l2"] == result.report.verification.rel_l2
    assert data["warnings"] == list(result.report.warnings)


def test_id_defaults_to_intercept_and_recalibration_and_each_switches_off():
    """The defaults chosen on validation data (benchmarks/defaults.py); other methods keep none."""
    assert (PruneConfig(method="id").compensate, PruneConfig(method="id").recalibrate) == (
        "bias",
        True,
    )
    assert PruneConfig(method="id", id_solver="qr").compensate == "none"
    plain = PruneConfig(method="id", compensate="none", recalibrate=False)
    assert (plain.compensate, plain.recalibrate) == ("none", False)
    for method in ("magnitude", "cob", "taylor"):
        config = PruneConfig(method=method)
        assert (config.compensate, config.recalibrate) == ("none", False)
    args = ["prune", "m.onnx", "--method", "id", "--no-recalibrate", "--compensate", "none"]
    parsed = build_parser().parse_args(args)
    assert (parsed.recalibrate, parsed.compensate) == (False, "none")


def test_plain_id_call_is_the_intercept_and_recalibration_run():
    model = graphs.conv_chain()
    feeds = graphs.random_input(model, 64)
    default = onnxprune.prune(model, method="id", ratio=0.5, round_to=1, data=feeds)
    explicit = onnxprune.prune(model, method="id", ratio=0.5, round_to=1, data=feeds,
                               compensate="bias", recalibrate=True)  # fmt: skip
    plain = onnxprune.prune(model, method="id", ratio=0.5, round_to=1, data=feeds,
                            compensate="none", recalibrate=False)  # fmt: skip
    assert default.model.SerializeToString() == explicit.model.SerializeToString()
    assert default.model.SerializeToString() != plain.model.SerializeToString()
    assert any("recalibrated" in note for note in default.report.notes)


def test_planning_runs_every_blas_library_on_one_thread():
    """The planning stage's one-thread BLAS limit covers only libraries loaded when it starts;
    scipy's LAPACK (its own OpenBLAS, imported lazily by the solvers) must be one of them, or
    its threads spin on busy cores. A fresh interpreter, so that nothing loaded scipy before."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import graphs, onnxprune, onnxprune.api as api\n"
        "from threadpoolctl import threadpool_info\n"
        "seen, plan = [], api.make_plans\n"
        "def spy(*args):\n"
        "    seen.extend(i for i in threadpool_info() if i['user_api'] == 'blas')\n"
        "    return plan(*args)\n"
        "api.make_plans = spy\n"
        "model = graphs.conv_chain()\n"
        "onnxprune.prune(model, method='id', ratio=0.5, data=graphs.random_input(model, 16))\n"
        "import scipy.linalg\n"
        "loaded = {i['filepath'] for i in threadpool_info() if i['user_api'] == 'blas'}\n"
        "assert loaded <= {i['filepath'] for i in seen}, (loaded, seen)\n"
        "assert all(i['num_threads'] == 1 for i in seen), seen\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120, cwd=ROOT)


def test_a_float16_model_prunes_with_float32_data():
    """A model converted to float16 (inputs too) takes the usual float32 calibration data, cast
    to its input type; ratio 0 keeps its function and the pruned model stays float16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(graphs.conv_chain(), keep_io_types=False)
    data = graphs.random_input(graphs.conv_chain(), 32)
    assert data["x"].dtype == np.float32
    half = {"x": data["x"].astype(np.float16)}
    same = onnxprune.prune(model, method="id", ratio=0.0, round_to=1, data=data)
    assert_outputs_close(model, same.model, half, atol=2e-3)  # float16 rounding
    pruned = onnxprune.prune(model, method="id", ratio=0.5, round_to=1, data=data).model
    dtypes = {init.data_type for init in pruned.graph.initializer if init.dims}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    assert pruned.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert run_model(pruned, half)["c3_out"].shape == (32, 4, 8, 8)
