"""`--cv-maps`: a single-tap channel group's ID map (ridge, or means only) chosen by two-fold
cross-validation, checked against brute force on the raw rows."""

from __future__ import annotations

import numpy as np

from onnxprune.calib.stats import TapAccumulator
from onnxprune.graph.groups import ChannelGroup, Tap
from onnxprune.methods.heads import RIDGES
from onnxprune.methods.id import InterpolativeDecomposition
from onnxprune.plan import GroupStats

TAP = Tap("z", -1, 0)


def _stats(rows: np.ndarray, folds: int):
    acc = TapAccumulator(rows.shape[1], folds=folds)
    acc.add(rows, samples=rows.shape[0])  # one row per sample: folds are even / odd rows
    return acc.result()


def _ridge_map(rows: np.ndarray, S: np.ndarray, R: np.ndarray, ridge: float):
    """Brute force: the affine ridge map from columns S to columns R fitted on `rows`."""
    mean = rows.mean(axis=0)
    Z = rows - mean
    A = Z.T @ Z
    lam = ridge * np.trace(A[np.ix_(S, S)]) / S.size
    W = np.linalg.solve(A[np.ix_(S, S)] + lam * np.eye(S.size), A[np.ix_(S, R)])
    return W, mean[R] - W.T @ mean[S]


def _held_out(rows: np.ndarray, S: np.ndarray, R: np.ndarray, ridge: float) -> float:
    """Squared error of the two-fold ridge maps (even → odd, odd → even), as the CV sums it."""
    error = 0.0
    for fit, judge in ((rows[0::2], rows[1::2]), (rows[1::2], rows[0::2])):
        W, c = _ridge_map(fit, S, R, ridge)
        error += float(np.sum((judge[:, R] - judge[:, S] @ W - c) ** 2))
    return error


def test_chosen_ridge_is_the_brute_force_best_and_refit_on_all_rows() -> None:
    rng = np.random.default_rng(0)
    m, k, n = 24, 12, 40  # few samples for the map's k parameters per channel: ridge helps
    basis = rng.standard_normal((6, m))
    rows = rng.standard_normal((n, 6)) @ basis + 0.5 * rng.standard_normal((n, m)) + 1.0
    group = ChannelGroup(name="g", channels=m, producers=("p",), taps=(TAP,))
    method = InterpolativeDecomposition(intercept=True)
    plain = method.plan(group, GroupStats(taps={TAP.key: _stats(rows, 0)}), k)
    plan = method.plan(group, GroupStats(taps={TAP.key: _stats(rows, 2)}), k)
    S = np.sort(plain.keep)
    np.testing.assert_array_equal(plan.keep, S)  # the selection is ID's
    R = np.setdiff1d(np.arange(m), S)
    errors = {ridge: _held_out(rows, S, R, ridge) for ridge in RIDGES}
    errors[float("inf")] = sum(  # no map: the removed channels' means of the fit fold
        float(np.sum((judge[:, R] - fit[:, R].mean(axis=0)) ** 2))
        for fit, judge in ((rows[0::2], rows[1::2]), (rows[1::2], rows[0::2]))
    )
    best = min(errors, key=errors.get)
    assert errors[best] < errors[RIDGES[0]]  # the case is one where least squares overfits
    chosen = plan.info.get("map_full", plan.info.get("map_none"))
    assert np.isclose(chosen, best)
    energy = float(np.trace(rows.T @ rows))
    assert np.isclose(plan.info["cv_err"], np.sqrt(errors[best] / energy), rtol=1e-6)
    W, c = _ridge_map(rows, S, R, best)  # refitted on every row
    correction = plan.corrections[TAP.key]
    scale = np.abs(W).max()
    np.testing.assert_allclose(correction.M[:, R], W, rtol=1e-6, atol=1e-9 * scale)
    np.testing.assert_allclose(correction.M[:, S], np.eye(k), atol=1e-12)
    np.testing.assert_allclose(correction.c[R], c, rtol=1e-6, atol=1e-9 * np.abs(c).max())


def test_without_folds_the_map_is_ids() -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((200, 10)) @ rng.standard_normal((10, 16))
    group = ChannelGroup(name="g", channels=16, producers=("p",), taps=(TAP,))
    plan = InterpolativeDecomposition(intercept=True).plan(
        group, GroupStats(taps={TAP.key: _stats(rows, 0)}), 8
    )
    assert "cv_err" not in plan.info
