"""Elimination–compensation, per channel and per weight: closed forms against brute force in ORT."""

from __future__ import annotations

import json

import graphs
import numpy as np
import onnx
import pytest
from conftest import data_path, reference_path, run_model
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.calib.gather import gather, gather_weights
from onnxprune.calib.jacobian import EXACT_LIMIT
from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.errors import UsageError
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import export, normalize
from onnxprune.graph.sparsify import layer_weights, sparsify, weight_layers
from onnxprune.methods.biascomp import bias_shift, channel_importance
from onnxprune.methods.sparse import importance, independent_shift, joint_shift
from onnxprune.options import parse_jacobian


def _mlp(w1, b1, w2, b2, *more, act: str | None = "Relu") -> onnx.ModelProto:
    """x → fc1 → act → fc2 (→ fc3 with `more` = (w3, b3), linear) → y, every Gemm transB=1."""
    layers = [(w1, b1), (w2, b2)] + ([tuple(more)] if more else [])
    inits, nodes, x = [], [], "x"
    for index, (w, b) in enumerate(layers, 1):
        inits += [
            numpy_helper.from_array(np.asarray(w, np.float32), f"w{index}"),
            numpy_helper.from_array(np.asarray(b, np.float32), f"b{index}"),
        ]
        out = "y" if index == len(layers) else f"h{index}"
        nodes.append(
            helper.make_node(
                "Gemm", [x, f"w{index}", f"b{index}"], [out], name=f"fc{index}", transB=1
            )
        )
        x = out
        if index == 1 and act:
            nodes.append(helper.make_node(act, [out], ["a"], name="act"))
            x = "a"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w1.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", layers[-1][0].shape[0]])],
        inits,
    )
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
    calibration = gather(
        graph,
        (group,),
        {group.name: group.channels},
        frozenset({"jacobian"}),
        Dataset({"x": x}),
        PruneConfig(method="biascomp", jacobian=jacobian),
    )
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
        np.testing.assert_allclose(
            bias_shift(site, weight, np.array([j])), best_shift, rtol=1e-4, atol=1e-6
        )


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
    np.testing.assert_allclose(
        run_model(result.model, {"x": x})["y"],
        run_model(model, {"x": x})["y"],
        atol=1e-4,
        rtol=1e-5,
    )


def test_zero_jacobian_falls_back_to_the_plain_mean(tiny):
    model, w2, hidden, x = tiny
    site, weight = _hidden_stats(model, x)
    dead = site.__class__(np.zeros_like(site.s0), site.s1 * 0, site.s2 * 0, site.mean)
    assert np.all(channel_importance(dead, weight) == 0)
    np.testing.assert_allclose(
        bias_shift(dead, weight, np.array([1])),
        w2[:, 1] * hidden[:, 1].mean(),
        rtol=1e-4,
        atol=1e-6,
    )


def test_probe_estimate_approaches_the_exact_jacobian(tiny):
    model, _, _, x = tiny
    exact, _ = _hidden_stats(model, x)
    probed, _ = _hidden_stats(model, x, jacobian="probe:64")
    np.testing.assert_allclose(probed.s0, exact.s0, rtol=0.35)


def test_jacobian_option_is_validated():
    assert parse_jacobian("probe:8") == ("probe", 8)
    with pytest.raises(UsageError, match="probe:N"):
        parse_jacobian("probe:x")


# ---- per weight (--granularity weight) and the joint solve -------------------------------------


def _weight_stats(model, x, *, joint=False):
    """Layers, canonical weights and Jacobian statistics of every weight layer of `model`."""
    graph = normalize(model)
    layers = weight_layers(graph)
    config = PruneConfig(method="biascomp", granularity="weight", sparsity=0.5, joint=joint)
    stats, _, _ = gather_weights(graph, layers, frozenset({"jacobian"}), Dataset({"x": x}), config)
    return {layer.name: layer for layer in layers}, layer_weights(graph, layers), stats


def _edited(model, changes) -> onnx.ModelProto:
    """A copy of `model` with initializer entries changed: [(name, index, value), …]."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    for init in copy.graph.initializer:
        value = numpy_helper.to_array(init).copy()
        hits = [(index, v) for name, index, v in changes if name == init.name]
        for index, v in hits:
            value[index] = v
        if hits:
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return copy


def _outputs(model, x) -> np.ndarray:
    return run_model(model, {"x": x})["y"].astype(np.float64)


@pytest.fixture
def linear():
    """A linear 3 → 4 → 2 net: first order is exact, so the closed forms must match ORT."""
    rng = np.random.default_rng(2)
    w1, b1, w2, b2 = (rng.standard_normal(s) for s in ((4, 3), 4, (2, 4), 2))
    x = (rng.standard_normal((150, 3)) + 0.7).astype(np.float32)
    return _mlp(w1, b1, w2, b2, act=None), x


def _bias_directions(model, x, bias: str, units: int) -> np.ndarray:
    """J (units, outputs): the output change per unit shift of each bias entry (linear net)."""
    base = _outputs(model, x[:1])[0]
    return np.stack([_outputs(_shifted(model, bias, i), x[:1])[0] - base for i in range(units)])


def _shifted(model, bias, unit):
    value = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == bias)
    return _edited(model, [(bias, unit, value[unit] + 1.0)])


@pytest.mark.parametrize(("layer", "weight", "bias"), [("fc1", "w1", "b1"), ("fc2", "w2", "b2")])
def test_per_weight_closed_forms_equal_brute_force_in_ort(linear, layer, weight, bias):
    """Zero each weight in ORT, refit its own bias by least squares: the residual is I_ij and
    the fitted shift is δ_ij, in a hidden layer (J = W2) and the output layer (J = I)."""
    model, x = linear
    _, weights, stats = _weight_stats(model, x)
    w, site = weights[layer], stats[layer]
    directions = _bias_directions(model, x, bias, w.shape[0])
    scores, base = importance(w, site), _outputs(model, x)
    for i, j in np.ndindex(*w.shape):
        change = _outputs(_edited(model, [(weight, (i, j), 0.0)]), x) - base
        shift = -np.sum(change @ directions[i]) / (len(x) * directions[i] @ directions[i])
        residual = np.sum((change + shift * directions[i]) ** 2)
        removed = np.zeros(w.shape, bool)
        removed[i, j] = True
        np.testing.assert_allclose(scores[i, j], residual, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(independent_shift(w, site, removed)[i], shift, rtol=1e-3)


def test_shifts_in_one_row_add_up_and_the_joint_solve_is_the_least_squares_optimum(linear):
    model, x = linear
    _, weights, stats = _weight_stats(model, x, joint=True)
    w, site = weights["fc1"], stats["fc1"]
    directions = _bias_directions(model, x, "b1", 4)
    base = _outputs(model, x)
    row = np.zeros(w.shape, bool)
    row[1, [0, 2]] = True  # two weights of unit 1: one shift, the sum of the two
    change = _outputs(_edited(model, [("w1", (1, 0), 0.0), ("w1", (1, 2), 0.0)]), x) - base
    best = -np.sum(change @ directions[1]) / (len(x) * directions[1] @ directions[1])
    singles = [
        independent_shift(w, site, np.eye(1, 12, k, dtype=bool).reshape(4, 3))[1] for k in (3, 5)
    ]
    np.testing.assert_allclose(sum(singles), best, rtol=1e-3)
    np.testing.assert_allclose(independent_shift(w, site, row)[1], best, rtol=1e-3)
    spread = np.zeros(w.shape, bool)
    spread[[0, 1, 3], [1, 0, 2]] = True  # three rows: their shifts interact through W2
    changes = [("w1", (i, j), 0.0) for i, j in zip(*np.nonzero(spread), strict=True)]
    change = _outputs(_edited(model, changes), x) - base
    stacked = np.tile(directions.T, (len(x), 1))  # (samples·outputs, units)
    optimum = np.linalg.lstsq(stacked, -change.reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(joint_shift(w, site, spread), optimum, rtol=1e-3, atol=1e-6)

    def residual(shift):
        return np.sum((change + shift @ directions) ** 2)

    assert residual(joint_shift(w, site, spread)) < residual(independent_shift(w, site, spread))


def test_constant_input_unit_is_removed_per_weight_with_no_output_change():
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((4, 3))
    w1[:, 1] = 20 + 30 * np.abs(w1[:, 1])  # large: magnitude keeps them; every unit stays active
    model = _mlp(w1, rng.standard_normal(4), rng.standard_normal((2, 4)), rng.standard_normal(2))
    x = rng.standard_normal((100, 3)).astype(np.float32)
    x[:, 1] = 1.5
    result = onnxprune.prune(
        model, method="biascomp", granularity="weight", sparsity=4 / 20, data={"x": x}
    )
    w1_after = next(
        numpy_helper.to_array(i) for i in result.model.graph.initializer if i.name.startswith("w1")
    )
    assert np.all(w1_after[:, 1] == 0) and np.count_nonzero(w1_after) == 8
    np.testing.assert_allclose(_outputs(result.model, x), _outputs(model, x), atol=1e-4, rtol=1e-5)
    plain = onnxprune.prune(model, method="magnitude", granularity="weight", sparsity=4 / 20)
    assert np.max(np.abs(_outputs(plain.model, x) - _outputs(model, x))) > 1.0


@pytest.mark.parametrize("method", ["biascomp", "random"])
def test_steps_reach_the_exact_sparsity_and_keep_earlier_removals(linear, method):
    model, x = linear
    result = onnxprune.prune(
        model, method=method, granularity="weight", sparsity=0.6, steps=3, data={"x": x}
    )
    weights = [numpy_helper.to_array(i) for i in result.model.graph.initializer if len(i.dims) == 2]
    assert sum(int(np.sum(w == 0)) for w in weights) == round(0.6 * 20)
    first = onnxprune.prune(
        model, method=method, granularity="weight", sparsity=1 - 0.4 ** (1 / 3), data={"x": x}
    )
    zero_first = {
        i.name.split("__")[0]: numpy_helper.to_array(i) == 0
        for i in first.model.graph.initializer
        if len(i.dims) == 2
    }
    zero_final = {
        i.name.split("__")[0]: numpy_helper.to_array(i) == 0
        for i in result.model.graph.initializer
        if len(i.dims) == 2
    }
    assert all(np.all(zero_final[n][zero_first[n]]) for n in zero_first)


def test_per_weight_zero_jacobian_falls_back_to_the_plain_mean(linear):
    model, x = linear
    dead = _edited(model, [("w2", (slice(None), 2), 0.0)])  # fc1 unit 2 no longer reaches y
    _, weights, stats = _weight_stats(dead, x, joint=True)
    w, site = weights["fc1"], stats["fc1"]
    assert site.s0[2] == 0 and np.all(importance(w, site)[2] == 0)
    removed = np.zeros(w.shape, bool)
    removed[2] = True
    removed[0, 1] = True
    for solve in (independent_shift, joint_shift):  # M is singular there: the joint solve too
        shift = solve(w, site, removed)
        np.testing.assert_allclose(shift[2], w[2] @ x.mean(axis=0), rtol=1e-5)
        assert np.all(np.isfinite(shift))


def test_conv_output_layer_closed_forms_equal_brute_force():
    """A Conv whose output is the model output: every position is its own output component,
    so the per-position form is exact, zero-padded borders included."""
    b = graphs.Builder(5)
    model = b.model([b.conv("conv", "x", 2, 3, bias=False)], shape=("N", 2, 5, 5))
    x = np.random.default_rng(5).standard_normal((20, 2, 5, 5)).astype(np.float32) + 0.5
    _, weights, stats = _weight_stats(model, x)
    w, site = weights["conv"], stats["conv"]
    scores = importance(w, site)
    base = run_model(model, {"x": x})["conv_out"].astype(np.float64)
    for index in [(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 2, 1)]:
        change = run_model(_edited(model, [("conv.w", index, 0.0)]), {"x": x})["conv_out"] - base
        shift = -change[:, index[0]].mean()
        removed = np.zeros(w.shape, bool)
        removed[index] = True
        np.testing.assert_allclose(
            scores[index], np.sum((change[:, index[0]] + shift) ** 2), rtol=1e-3
        )
        np.testing.assert_allclose(independent_shift(w, site, removed)[index[0]], shift, rtol=1e-3)
    result = onnxprune.prune(
        model, method="biascomp", granularity="weight", sparsity=0.5, data={"x": x}
    )  # the missing bias is created
    assert any(n.op_type == "Conv" and len(n.input) == 3 for n in result.model.graph.node)


def test_gemm_without_bias_with_alpha_and_untransposed_weight_gets_a_new_bias():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 4)).astype(np.float32)  # transB = 0, (in, out); square
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", alpha=2.0)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    x[:, 2] = -0.5  # constant input: its 4 weights go, the created bias absorbs 2·w·(−0.5)
    _, weights, _ = _weight_stats(model, x)
    np.testing.assert_allclose(weights["fc"], 2.0 * w.T)
    result = onnxprune.prune(
        model, method="biascomp", granularity="weight", sparsity=4 / 16, data={"x": x}
    )
    assert len(result.model.graph.node[0].input) == 3
    np.testing.assert_allclose(_outputs(result.model, x), _outputs(model, x), atol=1e-5, rtol=1e-5)


def test_matmul_bias_shift_goes_into_its_add_or_a_new_add():
    model = graphs.matmul_chain()
    graph = normalize(model)
    layers = weight_layers(graph)
    assert [layer.name for layer in layers] == ["m1", "m2"]
    shifts = {"m1": np.zeros(12), "m2": np.arange(5.0)}
    x = graphs.random_input(model, 64)
    out = run_model(export(sparsify(graph, layers, {}, shifts)), x)
    np.testing.assert_allclose(
        out["m2_out"], run_model(model, x)["m2_out"] + np.arange(5.0), atol=1e-5, rtol=1e-5
    )
    x["x"][:, 3] = 2.0  # input 3 constant: its m1 weights go, the Add after m1 absorbs them
    result = onnxprune.prune(
        model, method="biascomp", granularity="weight", sparsity=12 / 252, data=x
    )
    assert {n.op_type for n in result.model.graph.node} == {"MatMul", "Add", "Relu"}
    np.testing.assert_allclose(
        run_model(result.model, x)["m2_out"], run_model(model, x)["m2_out"], atol=1e-4, rtol=1e-5
    )


def test_channel_joint_shift_is_the_least_squares_optimum():
    """fc2 (a consumer of fc1's channels) feeds y through fc3, so its biases interact."""
    rng = np.random.default_rng(6)
    shapes = ((6, 3), 6, (5, 6), 5, (2, 5), 2)
    model = _mlp(*(rng.standard_normal(s) for s in shapes))
    x = rng.standard_normal((120, 3)).astype(np.float32)
    graph = normalize(model)
    group = next(g for g in analyze(graph) if g.prunable and "fc2" in g.consumers)
    config = PruneConfig(method="biascomp", joint=True)
    calibration = gather(
        graph, (group,), {group.name: 3}, frozenset({"jacobian"}), Dataset({"x": x}), config
    )
    site, weight = calibration.stats[group.name].consumers["fc2"]
    removed = np.array([1, 4])
    base = _outputs(model, x)
    change = _outputs(_edited(model, [("w2", (slice(None), j), 0.0) for j in removed]), x) - base
    w3 = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "w3")
    directions = w3.T.astype(np.float64)  # fc2 bias → y is linear through fc3
    optimum = np.linalg.lstsq(np.tile(w3, (len(x), 1)), -change.reshape(-1), rcond=None)[0]
    joint = bias_shift(site, weight, removed, joint=True)
    np.testing.assert_allclose(joint, optimum, rtol=1e-3, atol=1e-6)
    # The path fc2 → y is linear, so the per-unit mean shift already cancels the mean output
    # change: it reaches the same optimum in y (the bias solution itself is not unique).
    independent = bias_shift(site, weight, removed)
    best = np.sum((change + joint @ directions) ** 2)
    np.testing.assert_allclose(np.sum((change + independent @ directions) ** 2), best, rtol=1e-6)
    assert best < np.sum((change + (joint + 0.1) @ directions) ** 2)


def test_granularity_weight_end_to_end_on_the_digits_mlp(tmp_path, capsys):
    out, report = tmp_path / "mlp.sparse.onnx", tmp_path / "report.json"
    code = main(
        [
            str(reference_path("mlp")),
            "--method",
            "biascomp",
            "--granularity",
            "weight",
            "--sparsity",
            "0.6",
            "--data",
            str(data_path("mlp")),
            "--jacobian",
            "probe:4",
            "-o",
            str(out),
            "--report",
            str(report),
        ]
    )
    assert code == 0
    assert "no faster" in capsys.readouterr().out
    inits = onnx.load(str(out)).graph.initializer
    weights = [numpy_helper.to_array(i) for i in inits if len(i.dims) == 2]
    total = sum(w.size for w in weights)
    assert sum(int(np.sum(w == 0)) for w in weights) == round(0.6 * total)
    data = json.loads(report.read_text())
    assert data["nonzero_weights"][1] == total - round(0.6 * total)
    assert data["zipped_size"][1] < 0.7 * data["zipped_size"][0]
    with np.load(data_path("mlp", "test")) as test:
        logits = run_model(out, {"input": test["input"]})["logits"]
        accuracy = float(np.mean(logits.argmax(axis=1) == test["labels"]))
    assert accuracy > 0.95  # 97.8 % before; 60 % of the weights removed, no fine-tuning


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--granularity", "weight"], "needs --sparsity"),
        (["--granularity", "weight", "--sparsity", "1.5"], "'sparsity' must be in [0, 1)"),
        (["--granularity", "weight", "--sparsity", "0.5", "--method", "id"], "supports biascomp"),
        (["--granularity", "weight", "--sparsity", "0.5", "--compensate", "lsq"], "--compensate"),
        (["--sparsity", "0.5"], "channels use --ratio"),
        (["--method", "magnitude", "--joint"], "--joint is the biascomp"),
        (["--local"], "--local is for --granularity weight"),
        (["--method", "biascomp", "--jacobian", "probe:0"], "probe:N"),
        (["--steps", "2"], "--steps is for --granularity weight"),
        (
            ["--granularity", "weight", "--sparsity", "0.5", "--steps", "0"],
            "'steps' must be at least",
        ),
    ],
)
def test_bad_weight_options_are_one_line_usage_errors(tmp_path, capsys, args, message):
    code = main(
        [
            str(reference_path("mlp")),
            "--data",
            str(data_path("mlp")),
            "-o",
            str(tmp_path / "out.onnx"),
            *args,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out.onnx").exists()


def test_exact_jacobian_is_refused_for_a_wide_output_and_probes_run():
    """Regression: on MiniLM (token states 64 × 384 per sentence) the default exact Jacobian
    ran one backward pass per output component and did not finish in 15 minutes."""
    rng = np.random.default_rng(0)
    wide = EXACT_LIMIT + 1
    model = _mlp(rng.standard_normal((6, 3)), rng.standard_normal(6),
                 rng.standard_normal((wide, 6)), rng.standard_normal(wide))  # fmt: skip
    x = rng.standard_normal((16, 3)).astype(np.float32)
    with pytest.raises(UsageError, match=rf"{wide} for the outputs.*probe:N"):
        _hidden_stats(model, x)
    site, _ = _hidden_stats(model, x, jacobian="probe:2")
    assert site.s0.shape == (wide,) and np.all(np.isfinite(site.s0))
