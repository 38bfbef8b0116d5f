"""Per-weight pruning of transformer Linear layers: Wanda scores, per-row and N:M scopes, and
elimination–compensation's bias shift on 3-D (batch × tokens × features) activations, against
brute force in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import data_path, reference_path, run_model
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.calib.gather import gather_weights
from onnxprune.calib.norms import squared_feature_sums
from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.errors import NothingToPruneError, UsageError
from onnxprune.graph.load import normalize
from onnxprune.graph.sparsify import WeightLayer, layer_weights, weight_layers
from onnxprune.methods.sparse import choose_removed, independent_shift

TOKENS, FEATURES, UNITS = 5, 8, 6


def _linear_3d(weights, biases, *, relu: bool = False) -> onnx.ModelProto:
    """x (n, TOKENS, FEATURES) → MatMul + Add per layer (Relu between with `relu`) → y: the
    Linear layers of a transformer as torch exports them, weights stored (in, out)."""
    inits, nodes, x = [], [], "x"
    for index, (w, b) in enumerate(zip(weights, biases, strict=True), 1):
        inits += [
            numpy_helper.from_array(np.asarray(w, np.float32).T.copy(), f"w{index}"),
            numpy_helper.from_array(np.asarray(b, np.float32), f"b{index}"),
        ]
        out = "y" if index == len(weights) else f"h{index}"
        nodes += [
            helper.make_node("MatMul", [x, f"w{index}"], [f"z{index}"], name=f"fc{index}"),
            helper.make_node("Add", [f"z{index}", f"b{index}"], [out], name=f"add{index}"),
        ]
        x = out
        if relu and index < len(weights):
            nodes.append(helper.make_node("Relu", [out], [f"r{index}"], name=f"relu{index}"))
            x = f"r{index}"
    width = np.shape(weights[-1])[0]
    graph = helper.make_graph(
        nodes,
        "linear3d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", TOKENS, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", TOKENS, width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _tokens(n: int = 40, seed: int = 0) -> np.ndarray:
    """Tokens with unequal feature scales and nonzero means (as after LayerNorm's γ and β)."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.3, 3.0, FEATURES)
    return (rng.standard_normal((n, TOKENS, FEATURES)) * scale + 0.8).astype(np.float32)


@pytest.fixture
def single():
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((UNITS, FEATURES)), rng.standard_normal(UNITS)
    return _linear_3d([w], [b]), w, b, _tokens()


def _stored(model: onnx.ModelProto, prefix: str) -> np.ndarray:
    return next(
        numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith(prefix)
    )


def _added_bias(model: onnx.ModelProto) -> np.ndarray:
    """The constant the Add after fc1 adds (shifted biases are renamed)."""
    add = next(n for n in model.graph.node if n.op_type == "Add")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return next(inits[name] for name in add.input if name in inits)


def _prune(model, x, **options) -> onnx.ModelProto:
    options = {"granularity": "weight", "data": {"x": x}, "verify": False, **options}
    return onnxprune.prune(model, **options).model


def test_wanda_removes_the_lowest_weight_times_token_norm_of_every_row(single):
    """|W_ij|·‖X_j‖₂, the norm over every token of every sample, ranked within each row."""
    model, w, _, x = single
    pruned = _prune(model, x, method="wanda", sparsity=0.5)
    norms = np.sqrt((x.astype(np.float64) ** 2).reshape(-1, FEATURES).sum(axis=0))
    expected = np.zeros(w.shape, bool)
    for i, row in enumerate(np.abs(w) * norms):
        expected[i, np.argsort(row)[: FEATURES // 2]] = True
    np.testing.assert_array_equal(_stored(pruned, "w1").T == 0, expected)
    magnitude = _prune(model, x, method="magnitude", sparsity=0.5, pattern="row")
    assert np.any((_stored(magnitude, "w1").T == 0) != expected)  # the norms changed the choice


def test_compensation_is_the_least_squares_shift_over_all_tokens(single):
    """One Linear layer (the output itself, G = 1): rows are independent, and each unit's shift
    must be the constant that best fits the removed weights' contribution over every token of
    every sample — brute force: least squares on the uncompensated model's output change."""
    model, _, b, x = single
    base = run_model(model, {"x": x})["y"].astype(np.float64)
    plain = _prune(model, x, method="wanda", sparsity=0.5)
    shifted = _prune(model, x, method="wanda", sparsity=0.5, compensate="bias", jacobian="exact")
    np.testing.assert_array_equal(_stored(plain, "w1"), _stored(shifted, "w1"))
    lost = (base - run_model(plain, {"x": x})["y"]).reshape(-1, UNITS)
    optimum = lost.mean(axis=0)  # argmin_δ Σ_tokens (lost − δ)², unit by unit
    shift = _added_bias(shifted).astype(np.float64) - b
    np.testing.assert_allclose(shift, optimum, rtol=1e-4, atol=1e-5 * np.abs(optimum).max())
    left = base - run_model(shifted, {"x": x})["y"]
    np.testing.assert_allclose(
        np.sum(left**2), np.sum((lost - optimum) ** 2), rtol=1e-3
    )  # the residual is the least-squares minimum


def test_hidden_layer_shift_is_the_least_squares_optimum_through_the_next_layer():
    """Two linear Linear layers on 3-D tokens: a row of the first layer loses two weights; its
    bias shift must minimise the output error summed over every token (J = W2, exact)."""
    rng = np.random.default_rng(4)
    w1, b1 = rng.standard_normal((UNITS, FEATURES)), rng.standard_normal(UNITS)
    w2, b2 = rng.standard_normal((3, UNITS)), rng.standard_normal(3)
    model, x = _linear_3d([w1, w2], [b1, b2]), _tokens(seed=5)
    config = PruneConfig(method="biascomp", granularity="weight", sparsity=0.5, jacobian="exact")
    graph = normalize(model)
    layers = weight_layers(graph)
    stats, _, _ = gather_weights(graph, layers, frozenset({"jacobian"}), Dataset({"x": x}), config)
    weights = layer_weights(graph, layers)
    removed = np.zeros((UNITS, FEATURES), bool)
    removed[2, [1, 6]] = True
    delta = independent_shift(weights["fc1"], stats["fc1"], removed)[2]
    lost = x.astype(np.float64) @ np.where(removed, w1, 0.0).T @ w2.T  # (n, tokens, 3)
    direction = w2[:, 2]  # the output change per unit shift of b1[2], at every token
    best = np.sum(lost.reshape(-1, 3) @ direction) / (lost.size / 3 * direction @ direction)
    np.testing.assert_allclose(delta, best, rtol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"method": "wanda", "compensate": "bias", "jacobian": "exact"},
        {"method": "biascomp", "pattern": "row", "jacobian": "exact"},
        {"method": "magnitude"},
    ],
)
def test_sparsity_0_keeps_the_model_exactly(single, options):
    model, _, _, x = single
    pruned = _prune(model, x, sparsity=0.0, **options)
    np.testing.assert_array_equal(run_model(pruned, {"x": x})["y"], run_model(model, {"x": x})["y"])


def test_row_scope_and_n_m_pattern_counts(single):
    model, _, _, x = single
    for method in ("wanda", "magnitude", "biascomp"):
        rows = _prune(model, x, method=method, sparsity=0.25, pattern="row", jacobian="exact")
        assert np.all(np.sum(_stored(rows, "w1").T == 0, axis=1) == FEATURES // 4)
        blocks = _prune(model, x, method=method, pattern="2:4", jacobian="exact")
        zeros = (_stored(blocks, "w1").T == 0).reshape(UNITS, -1, 4)
        assert np.all(zeros.sum(axis=2) == 2)


def test_n_m_keeps_the_highest_scores_of_each_block():
    scores = {"fc": np.array([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.2, 0.9]])}
    mask = choose_removed(scores, 0.5, scope="2:4")["fc"]
    np.testing.assert_array_equal(mask, [[False, True, False, True, False, True, True, False]])
    with pytest.raises(UsageError, match="rows of 8 weights, not a multiple of 3"):
        choose_removed(scores, 1 / 3, scope="2:3")


def test_conv_patch_norms_equal_a_brute_force_im2col():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 7, 6))
    layer = WeightLayer(
        "c", "Conv", "w", "x", "z", 1, (4, 3, 3, 2), conv=((3, 2), (2, 1), (1, 0, 2, 1), (1, 2))
    )
    padded = np.pad(x, ((0, 0), (0, 0), (1, 2), (0, 1)))
    expected = np.zeros((3, 3, 2))
    for oy in range((padded.shape[2] - 3) // 2 + 1):
        for ox in range(padded.shape[3] - 2):  # kernel width 2, dilation 2: span 3
            for dy, dx in np.ndindex(3, 2):
                expected[:, dy, dx] += np.sum(padded[:, :, 2 * oy + dy, ox + 2 * dx] ** 2, axis=0)
    np.testing.assert_allclose(squared_feature_sums(x, layer), expected, rtol=1e-12)


def test_wanda_with_n_m_and_shift_end_to_end_on_the_digits_mlp(tmp_path):
    out = tmp_path / "mlp.wanda.onnx"
    args = ["--method", "wanda", "--granularity", "weight", "--pattern", "2:4"]
    args += ["--compensate", "bias", "--jacobian", "probe:4"]
    code = main(
        [str(reference_path("mlp")), *args, "--data", str(data_path("mlp")), "-o", str(out)]
    )
    assert code == 0
    graph = normalize(onnx.load(str(out)))
    for w in layer_weights(graph, weight_layers(graph)).values():  # (out, in): rows of inputs
        assert np.all((w.reshape(len(w), -1, 4) == 0).sum(axis=2) == 2)
    with np.load(data_path("mlp", "test")) as test:
        logits = run_model(out, {"input": test["input"]})["logits"]
        accuracy = float(np.mean(logits.argmax(axis=1) == test["labels"]))
    assert accuracy > 0.9  # 97.8 % before; half of every layer's weights removed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "wanda", "--ratio", "0.5"], "--granularity weight --sparsity"),
        (["--granularity", "weight", "--pattern", "2:4", "--sparsity", "0.3"], "removes 0.5"),
        (["--granularity", "weight", "--sparsity", "0.5", "--pattern", "4:2"], "0 < N < M"),
        (
            ["--granularity", "weight", "--sparsity", "0.5", "--pattern", "row", "--local"],
            "give one",
        ),
        (["--pattern", "row"], "--pattern is for --granularity weight"),
        (["--granularity", "weight", "--pattern", "2:4", "--steps", "2"], "drop --steps"),
        (["--granularity", "weight", "--sparsity", "0.5", "--compensate", "lsq"], "lsq"),
        (["--granularity", "weight", "--pattern", "1:3", "--method", "wanda"], "multiple of 3"),
    ],
)
def test_bad_wanda_options_are_one_line_errors(tmp_path, capsys, args, message):
    model = [str(reference_path("mlp")), "--data", str(data_path("mlp"))]
    code = main([*model, "-o", str(tmp_path / "out.onnx"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and len(err) <= 2 and message in err[0], err
    assert not (tmp_path / "out.onnx").exists()


def test_exclude_keeps_matching_layers_dense_and_the_rest_reach_the_sparsity():
    rng = np.random.default_rng(6)
    w1, w2 = rng.standard_normal((UNITS, FEATURES)), rng.standard_normal((4, UNITS))
    model = _linear_3d([w1, w2], [np.zeros(UNITS), np.zeros(4)], relu=True)
    pruned = _prune(model, _tokens(), method="wanda", sparsity=0.5, exclude=("^fc2$",))
    assert np.count_nonzero(_stored(pruned, "w2")) == w2.size
    assert np.count_nonzero(_stored(pruned, "w1")) == w1.size // 2
    with pytest.raises(NothingToPruneError, match="that --exclude leaves"):
        _prune(model, _tokens(), method="wanda", sparsity=0.5, exclude=("fc",))
