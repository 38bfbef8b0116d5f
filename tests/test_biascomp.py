"""Elimination–compensation per channel: the closed forms against brute-force least squares."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run_model
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.calib.gather import gather
from onnxprune.calib.jacobian import parse_jacobian
from onnxprune.config import PruneConfig
from onnxprune.errors import UsageError
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import normalize
from onnxprune.methods.biascomp import bias_shift, channel_importance


def _mlp(w1, b1, w2, b2) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n)
             for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((6, 3)), rng.standard_normal(6)
    w2, b2 = rng.standard_normal((2, 6)), rng.standard_normal(2)
    x = rng.standard_normal((200, 3)).astype(np.float32)
    return _mlp(w1, b1, w2, b2), w2, np.maximum(x @ w1.T + b1, 0), x


def _hidden_stats(model, x, jacobian="exact"):
    graph = normalize(model)
    group = next(g for g in analyze(graph) if g.prunable)
    calibration = gather(graph, (group,), {group.name: group.channels}, frozenset({"jacobian"}),
                         Dataset({"x": x}), PruneConfig(method="biascomp", jacobian=jacobian))
    return calibration.stats[group.name].consumers["fc2"]


def test_closed_forms_equal_brute_force_least_squares(tiny):
    """fc2 feeds the output, so ∂f/∂z = I: removing hidden unit j and refitting the bias by least
    squares leaves exactly I_j, at exactly the predicted shift."""
    model, w2, hidden, x = tiny
    site, weight = _hidden_stats(model, x)
    importance = channel_importance(site, weight)
    for j in range(hidden.shape[1]):
        change = -np.outer(hidden[:, j], w2[:, j])  # output change without compensation
        best_shift = -change.mean(axis=0)  # least-squares optimal constant
        residual = np.sum((change + best_shift) ** 2)
        np.testing.assert_allclose(importance[j], residual, rtol=1e-4)
        np.testing.assert_allclose(bias_shift(site, weight, np.array([j])), best_shift,
                                   rtol=1e-4, atol=1e-6)


def test_shifts_of_several_removed_units_add_up_to_the_joint_optimum(tiny):
    model, w2, hidden, x = tiny
    site, weight = _hidden_stats(model, x)
    removed = np.array([0, 2, 5])
    joint = (hidden[:, removed] @ w2[:, removed].T).mean(axis=0)  # joint least-squares shift
    np.testing.assert_allclose(bias_shift(site, weight, removed), joint, rtol=1e-4, atol=1e-6)
    parts = sum(bias_shift(site, weight, np.array([j])) for j in removed)
    np.testing.assert_allclose(parts, joint, rtol=1e-4, atol=1e-6)


def test_constant_unit_is_removed_with_no_output_change():
    rng = np.random.default_rng(1)
    w1, b1 = rng.standard_normal((6, 3)), rng.standard_normal(6)
    w1[4], b1[4] = 0.0, 2.5  # relu(0·x + 2.5) = 2.5 on every input
    w2 = rng.standard_normal((2, 6))
    w2[:, 4] *= 50  # large weight: magnitude would keep it, compensation removes it exactly
    model = _mlp(w1, b1, w2, rng.standard_normal(2))
    x = rng.standard_normal((100, 3)).astype(np.float32)
    result = onnxprune.prune(model, method="biascomp", ratio=1 / 6, data={"x": x}, round_to=1)
    assert 4 not in result.plans[result.groups[0].name].keep
    np.testing.assert_allclose(run_model(result.model, {"x": x})["y"],
                               run_model(model, {"x": x})["y"], atol=1e-4)


def test_zero_jacobian_falls_back_to_the_plain_mean(tiny):
    model, w2, hidden, x = tiny
    site, weight = _hidden_stats(model, x)
    dead = site.__class__(np.zeros_like(site.s0), site.s1 * 0, site.s2 * 0, site.mean)
    assert np.all(channel_importance(dead, weight) == 0)
    np.testing.assert_allclose(bias_shift(dead, weight, np.array([1])),
                               w2[:, 1] * hidden[:, 1].mean(), rtol=1e-4, atol=1e-6)


def test_probe_estimate_approaches_the_exact_jacobian(tiny):
    model, _, _, x = tiny
    exact, _ = _hidden_stats(model, x)
    probed, _ = _hidden_stats(model, x, jacobian="probe:64")
    np.testing.assert_allclose(probed.s0, exact.s0, rtol=0.35)


def test_jacobian_option_is_validated():
    assert parse_jacobian("probe:8") == ("probe", 8)
    with pytest.raises(UsageError, match="probe:N"):
        parse_jacobian("probe:x")
