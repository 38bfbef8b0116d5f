"""Attention-head maps chosen by two-fold cross-validation (methods/heads.py), against brute
force on raw activations: the fold statistics, the held-out errors of every family and ridge,
the first greedy step, ridge → least squares, and the choice on scarce and on plentiful data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxprune.calib.stats import TapAccumulator
from onnxprune.methods.heads import RIDGES, fit_map, head_features, select_heads
from onnxprune.plan import TapStats


def _stats(z: np.ndarray) -> TapStats:
    """Statistics of (samples, tokens, features) with even/odd sample folds, fed in uneven
    batches, as the calibration pass streams them."""
    acc = TapAccumulator(z.shape[-1], folds=2)
    for start, stop in ((0, 3), (3, 3), (3, 8), (8, len(z))):
        acc.add(z[start:stop].reshape(-1, z.shape[-1]), samples=stop - start)
    return acc.result()


def _rows(z: np.ndarray) -> np.ndarray:
    return z.reshape(-1, z.shape[-1]).astype(np.float64)


def test_fold_statistics_are_those_of_the_even_and_the_odd_samples():
    z = np.random.default_rng(0).standard_normal((11, 4, 5)).astype(np.float32)
    stats = _stats(z)
    for fold, part in zip(stats.folds, (z[0::2], z[1::2]), strict=True):
        rows = _rows(part)
        assert fold.n == rows.shape[0]
        np.testing.assert_allclose(fold.gram, rows.T @ rows, rtol=1e-12)
        np.testing.assert_allclose(fold.sum, rows.sum(axis=0), rtol=1e-12, atol=1e-12)
    rows = _rows(z)
    assert stats.n == rows.shape[0]
    np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=1e-12)


def _brute_map(rows: np.ndarray, keep, D: int, family: str, ridge: float, intercept: bool):
    """The family's ridge fit from raw rows: (M over removed features, c, mean shift)."""
    heads = rows.shape[1] // D
    removed = [h for h in range(heads) if h not in keep]
    S, R = head_features(np.array(keep), D), head_features(np.array(removed), D)
    mu = rows.mean(axis=0) if intercept else np.zeros(rows.shape[1])
    x = rows - mu
    if family == "none":
        return np.zeros((S.size, R.size)), mu
    if family == "full":
        X, Y = x[:, S], x[:, R]
    else:  # heads: the features of a head are positions of one channel
        X = x[:, S].reshape(-1, len(keep), D).transpose(0, 2, 1).reshape(-1, len(keep))
        Y = x[:, R].reshape(-1, len(removed), D).transpose(0, 2, 1).reshape(-1, len(removed))
    A = X.T @ X
    lam = ridge * np.trace(A) / A.shape[0]
    W = np.linalg.solve(A + lam * np.eye(A.shape[0]), X.T @ Y)
    return (W if family == "full" else np.kron(W, np.eye(D))), mu


def _brute_cv(z: np.ndarray, keep, D: int, family: str, ridge: float, intercept: bool) -> float:
    """Held-out squared error, fitted on the even samples and judged on the odd and the other
    way round, relative to the energy of all samples."""
    heads = z.shape[-1] // D
    removed = [h for h in range(heads) if h not in keep]
    S, R = head_features(np.array(keep), D), head_features(np.array(removed), D)
    total = 0.0
    for a, b in ((z[0::2], z[1::2]), (z[1::2], z[0::2])):
        M, mu = _brute_map(_rows(a), keep, D, family, ridge, intercept)
        rb = _rows(b) - mu
        total += float(np.sum((rb[:, R] - rb[:, S] @ M) ** 2))
    return total / float(np.sum(_rows(z) ** 2))


@pytest.mark.parametrize("intercept", [False, True])
def test_first_choice_is_the_best_head_family_and_ridge_by_brute_force(intercept):
    """keep = 1 is one greedy step: the head, family and ridge of least held-out error over all
    of them, and that error, computed from raw activations; the map is refitted on all rows."""
    rng = np.random.default_rng(1)
    D, heads = 2, 3
    z = rng.standard_normal((10, 3, heads * D)) + 0.5
    z[..., 4:6] = 0.8 * z[..., 0:2] + 0.3 * rng.standard_normal((10, 3, 2))
    keep, choice = select_heads([_stats(z)], 1, D, intercept=intercept)
    options = [("none", np.inf)] + [(f, r) for f in ("heads", "full") for r in RIDGES]
    scores = {
        (h, f, r): _brute_cv(z, [h], D, f, r, intercept)
        for h, (f, r) in itertools.product(range(heads), options)
    }
    best = min(scores, key=scores.get)
    assert (int(keep[0]), choice.family, choice.ridge) == best
    assert choice.held_out
    np.testing.assert_allclose(choice.error, scores[best], rtol=1e-6)
    M, c = fit_map(_stats(z), keep, D, choice.family, choice.ridge, intercept=intercept)
    expected, mu = _brute_map(_rows(z), list(keep), D, choice.family, choice.ridge, intercept)
    R = head_features(np.setdiff1d(np.arange(heads), keep), D)
    np.testing.assert_allclose(M[:, R], expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(M[:, head_features(keep, D)], np.eye(D))
    np.testing.assert_allclose(c[R], mu[R] - expected.T @ mu[head_features(keep, D)], atol=1e-10)


@pytest.mark.parametrize("family", ["full", "heads"])
def test_ridge_tends_to_least_squares(family):
    rng = np.random.default_rng(2)
    D, heads = 3, 4
    z = rng.standard_normal((12, 5, heads * D))
    stats, keep = _stats(z), np.array([0, 2])
    plain, _ = _brute_map(_rows(z), [0, 2], D, family, 0.0, False)
    R = head_features(np.array([1, 3]), D)
    gaps = [
        np.abs(fit_map(stats, keep, D, family, r, intercept=False)[0][:, R] - plain).max()
        for r in (1e-2, 1e-4, 1e-6, 1e-10)
    ]
    assert all(a > b for a, b in itertools.pairwise(gaps))
    assert gaps[-1] < 1e-8 * np.abs(plain).max()


def _mixed_heads(samples: int, tokens: int, D: int, mixing, noise: float, seed: int):
    """4 heads: 0–2 random, head 3 = mixing(heads 0, 1) + noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((samples, tokens, 4, D))
    z[:, :, 3] = mixing(z[:, :, 0], z[:, :, 1]) + noise * rng.standard_normal((samples, tokens, D))
    return z.reshape(samples, tokens, 4 * D)


def test_scarce_data_pick_the_head_combination_plentiful_data_the_full_map():
    """Head 3 is a combination of heads 0 and 1 plus noise. From 8 samples of 3 tokens (12 rows
    per fold for 48 kept features) the full map overfits and the combination T ⊗ I wins; where
    head 3 mixes the features within the heads (not a combination of whole heads) and rows are
    plentiful, the full map wins."""
    D = 16
    scarce = _mixed_heads(8, 3, D, lambda a, b: 0.7 * a - 0.5 * b, 0.3, seed=3)
    _, choice = select_heads([_stats(scarce)], 3, D, intercept=True)
    assert choice.family == "heads"
    Q = np.random.default_rng(4).standard_normal((D, D)) / np.sqrt(D)
    plenty = _mixed_heads(64, 16, D, lambda a, b: a @ Q + 0.5 * b, 0.3, seed=5)
    keep, choice = select_heads([_stats(plenty)], 3, D, intercept=True)
    assert choice.family == "full" and 2 in keep  # head 2 is the one nothing reconstructs


def test_without_two_folds_least_squares_decides_in_sample():
    z = np.random.default_rng(6).standard_normal((1, 40, 6))
    acc = TapAccumulator(6, folds=2)
    acc.add(z.reshape(-1, 6), samples=1)  # one sample: the odd fold is empty
    _, choice = select_heads([acc.result()], 2, 2, intercept=False)
    assert (choice.family, choice.ridge, choice.held_out) == ("full", RIDGES[0], False)


def test_folds_keep_each_sample_whole_when_rows_interleave_samples():
    """nn.MultiheadAttention's head features are (tokens·batch, E) rows, token-major: the rows of
    one sample are not contiguous on the first axis, so a run's rows stay in one fold (runs
    alternate) and no sample's tokens are split between the folds."""
    from onnx import TensorProto, helper

    from onnxprune.calib.stats import collect_all
    from onnxprune.graph.groups import Tap

    tokens, width = 3, 4
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["t", "shape"], ["rows"]),
        helper.make_node("Relu", ["rows"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "token_major",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", tokens, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(1).standard_normal((6, tokens, width)).astype(np.float32)
    tap = Tap("rows", 1, 0)
    batches = [{"x": x[i : i + 2]} for i in (0, 2, 4)]
    stats = collect_all(model, [(tap, width)], {}, batches, folded={tap}).stats[tap]
    grams = [_rows(x[i : i + 1]).T @ _rows(x[i : i + 1]) for i in range(len(x))]
    splits = [
        subset
        for size in range(1, len(x))
        for subset in itertools.combinations(range(len(x)), size)
        if np.allclose(stats.folds[0].gram, sum(grams[i] for i in subset), rtol=1e-6, atol=1e-9)
        and np.allclose(
            stats.folds[1].gram,
            sum(grams[i] for i in range(len(x)) if i not in subset),
            rtol=1e-6,
            atol=1e-9,
        )
    ]
    assert splits, "a fold holds only some of a sample's tokens"
