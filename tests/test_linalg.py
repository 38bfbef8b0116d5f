"""The ID / least-squares core against brute force on explicit activations Z."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxprune.methods import linalg
from onnxprune.methods.linalg import (
    id_error_curve,
    interpolative_from_blocks,
    interpolative_from_gram,
    least_squares_map,
    optimal_rank_error,
    rank_for_error,
    reconstruction_error,
    selection_map,
)


def _stats(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    return Z.T @ Z, Z.mean(axis=0), Z.shape[0]


def _direct_error(Z: np.ndarray, keep: np.ndarray, M: np.ndarray, c: np.ndarray | None = None):
    approx = Z[:, keep] @ M + (0.0 if c is None else c)
    return np.linalg.norm(Z - approx) / np.linalg.norm(Z)


def _blocks(Z: np.ndarray, size: int) -> list[np.ndarray]:
    return [Z[i : i + size] for i in range(0, Z.shape[0], size)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture
def Z() -> np.ndarray:
    """N=500, m=12, condition ~30: well separated pivots, yet every k has a nonzero error."""
    rng = np.random.default_rng(0)
    mix = np.linalg.qr(rng.standard_normal((12, 12)))[0] @ np.diag(np.geomspace(1.0, 1 / 30, 12))
    return rng.standard_normal((500, 12)) @ mix.T + 0.1 * rng.standard_normal((500, 12))


@pytest.fixture
def Z_lowrank() -> np.ndarray:
    """m=10, rank 6: duplicates (one rescaled) and exact linear combinations of base columns."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((300, 6)) * np.array([5.0, 1.0, 0.2, 3.0, 1.0, 0.5])
    extra = np.column_stack(
        [base[:, 0], 2.0 * base[:, 3], base[:, 1] - 0.5 * base[:, 2], base @ rng.standard_normal(6)]
    )
    return np.column_stack([base[:, :3], extra[:, :2], base[:, 3:], extra[:, 2:]])


def _qr_interp(Z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's reference: geqp3 on Z, T = [I | R11⁻¹R12] Πᵀ, rows by ascending channel."""
    R, P = scipy.linalg.qr(Z, mode="r", pivoting=True)
    Tp = np.hstack([np.eye(k), np.linalg.solve(R[:k, :k], R[:k, k:])])
    T = np.empty_like(Tp)
    T[:, P] = Tp
    rows = np.argsort(P[:k])
    return P[:k][rows], T[rows]


# -- agreement between the two ID paths and geqp3 ---------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 6, 11, 12])
def test_gram_blocks_and_geqp3_agree(Z: np.ndarray, k: int) -> None:
    G, _, _ = _stats(Z)
    a = interpolative_from_gram(G, k)
    b = interpolative_from_blocks(_blocks(Z, 37), k)
    keep_ref, T_ref = _qr_interp(Z, k)
    P_ref = scipy.linalg.qr(Z, mode="r", pivoting=True)[1]
    for res in (a, b):
        np.testing.assert_array_equal(res.keep, keep_ref)
        np.testing.assert_array_equal(res.order[:k], P_ref[:k])
        assert _rel(res.T, T_ref) < 1e-6
        assert res.T.shape == (k, 12)
        assert res.error == pytest.approx(b.error, rel=1e-6, abs=1e-9)
        assert res.proxy == pytest.approx(b.proxy, rel=1e-6, abs=1e-9)
    assert _rel(a.T, b.T) < 1e-6


def test_keep_is_ascending_and_rows_follow_it(Z: np.ndarray) -> None:
    res = interpolative_from_gram(_stats(Z)[0], 5)
    assert np.all(np.diff(res.keep) > 0)
    np.testing.assert_array_equal(res.T[:, res.keep], np.eye(5))
    np.testing.assert_array_equal(np.sort(res.order[:5]), res.keep)
    np.testing.assert_array_equal(np.sort(res.order), np.arange(12))


def test_blocks_reduce_and_tiny_blocks(Z: np.ndarray) -> None:
    """Blocks smaller than m (R is short) and many re-reductions give the same ID."""
    ref = interpolative_from_blocks([Z], 7)
    small = interpolative_from_blocks(_blocks(Z, 5), 7)
    np.testing.assert_array_equal(small.keep, ref.keep)
    assert _rel(small.T, ref.T) < 1e-10
    with pytest.raises(ValueError):
        interpolative_from_blocks([], 3)


# -- rank-deficient data ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["gram", "gram-noridge", "blocks"])
@pytest.mark.parametrize("extra", [0, 2])
def test_rank_deficient_is_exact(Z_lowrank: np.ndarray, path: str, extra: int) -> None:
    k = 6 + extra
    if path == "blocks":
        res = interpolative_from_blocks(_blocks(Z_lowrank, 37), k)
    else:
        ridge = 0.0 if path == "gram-noridge" else 1e-10
        res = interpolative_from_gram(_stats(Z_lowrank)[0], k, ridge=ridge)
    assert res.keep.size == k and len(set(res.keep.tolist())) == k
    np.testing.assert_array_equal(res.T[:, res.keep], np.eye(k))
    assert _direct_error(Z_lowrank, res.keep, res.T) < 1e-8
    assert res.error < 1e-7


def test_rank_deficient_below_rank_matches_direct(Z_lowrank: np.ndarray) -> None:
    G = _stats(Z_lowrank)[0]
    curve = id_error_curve(G)
    for k in range(11):
        res = interpolative_from_gram(G, k)
        direct = _direct_error(Z_lowrank, res.keep, res.T)
        assert res.error == pytest.approx(direct, rel=1e-6, abs=1e-7)
        # the curve carries an O(ridge·‖T‖²) bias in e², i.e. ~1e-5 where the error is ~0
        assert curve[k] == pytest.approx(direct, rel=1e-6, abs=1e-4)


def test_numpy_pivoted_cholesky_matches_pstrf(Z: np.ndarray) -> None:
    G = _stats(Z)[0]
    R1, p1 = linalg._pivoted_cholesky(G)
    R2, p2 = linalg._pivoted_cholesky_numpy(G)
    np.testing.assert_array_equal(p1, p2)
    assert _rel(R2, R1) < 1e-12
    np.testing.assert_allclose(R1.T @ R1, G[np.ix_(p1, p1)], rtol=1e-12, atol=1e-9)


# -- errors, curve, rank selection ------------------------------------------------------------


def test_error_estimate_and_curve_equal_direct(Z: np.ndarray) -> None:
    G = _stats(Z)[0]
    curve = id_error_curve(G)
    assert curve.shape == (13,)
    assert curve[0] == pytest.approx(1.0) and curve[12] == 0.0
    for k in range(13):
        res = interpolative_from_gram(G, k)
        direct = _direct_error(Z, res.keep, res.T)
        assert res.error == pytest.approx(direct, rel=1e-8, abs=1e-12)
        assert curve[k] == pytest.approx(direct, rel=1e-7, abs=1e-12)
        R = scipy.linalg.qr(Z, mode="r", pivoting=True)[0]
        assert res.error == pytest.approx(np.linalg.norm(R[k:, k:]) / np.linalg.norm(R), rel=1e-7)


@pytest.mark.parametrize("eps", [0.9, 0.5, 0.3, 0.1, 0.05, 0.02])
def test_rank_for_error_is_smallest(Z: np.ndarray, eps: float) -> None:
    G = _stats(Z)[0]
    k = rank_for_error(G, eps)
    res = interpolative_from_gram(G, k)
    assert _direct_error(Z, res.keep, res.T) <= eps
    if k > 0:
        worse = interpolative_from_gram(G, k - 1)
        assert _direct_error(Z, worse.keep, worse.T) > eps


def test_rank_for_error_edges(Z: np.ndarray, Z_lowrank: np.ndarray) -> None:
    assert rank_for_error(_stats(Z)[0], 1.0) == 0
    assert rank_for_error(_stats(Z)[0], 0.0) == 12
    assert rank_for_error(_stats(Z_lowrank)[0], 1e-6) == 6


def test_optimal_rank_error_bounds_id(Z: np.ndarray) -> None:
    G = _stats(Z)[0]
    s = np.linalg.svd(Z, compute_uv=False)
    for k in range(13):
        opt = optimal_rank_error(G, k)
        assert opt == pytest.approx(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2)), rel=1e-9)
        assert opt <= interpolative_from_gram(G, k).error + 1e-12


# -- least squares compensation ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_least_squares_map_equals_lstsq(Z: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    keep = rng.choice(12, size=int(rng.integers(1, 12)), replace=False)  # unsorted on purpose
    G, mean, n = _stats(Z)
    Zs = Z[:, np.sort(keep)]
    M, c = least_squares_map(G, mean, n, keep, intercept=False)
    assert _rel(M, np.linalg.lstsq(Zs, Z, rcond=None)[0]) < 1e-8
    np.testing.assert_array_equal(c, 0.0)
    Mi, ci = least_squares_map(G, mean, n, keep, intercept=True)
    sol = np.linalg.lstsq(np.column_stack([Zs, np.ones(n)]), Z, rcond=None)[0]
    assert _rel(Mi, sol[:-1]) < 1e-8
    np.testing.assert_allclose(ci, sol[-1], atol=1e-9)
    for MM, cc in ((M, c), (Mi, ci)):
        np.testing.assert_array_equal(MM[:, np.sort(keep)], np.eye(keep.size))
        np.testing.assert_array_equal(cc[keep], 0.0)
        direct = _direct_error(Z, np.sort(keep), MM, cc)
        assert reconstruction_error(G, mean, n, keep, MM, cc) == pytest.approx(direct, rel=1e-8)
    assert _direct_error(Z, np.sort(keep), Mi, ci) <= _direct_error(Z, np.sort(keep), M, c)


def test_reconstruction_error_arbitrary_map(Z: np.ndarray) -> None:
    rng = np.random.default_rng(7)
    Zs = Z + 0.7  # non-zero mean, so the cross term with c matters
    G, mean, n = _stats(Zs)
    keep = np.array([1, 4, 9])
    M, c = rng.standard_normal((3, 12)), rng.standard_normal(12)
    direct = _direct_error(Zs, keep, M, c)
    assert reconstruction_error(G, mean, n, keep, M, c) == pytest.approx(direct, rel=1e-10)
    sel = selection_map(12, keep[::-1])
    assert sel.shape == (3, 12) and sel.sum() == 3
    np.testing.assert_array_equal(Zs[:, keep] @ sel, Zs * np.isin(np.arange(12), keep))
    direct_sel = _direct_error(Zs, keep, sel)
    assert reconstruction_error(G, mean, n, keep, sel, None) == pytest.approx(direct_sel)


def test_id_T_is_the_least_squares_map(Z: np.ndarray) -> None:
    G, mean, n = _stats(Z)
    res = interpolative_from_gram(G, 5)
    M, _ = least_squares_map(G, mean, n, res.keep, intercept=False)
    assert _rel(res.T, M) < 1e-10
    assert reconstruction_error(G, mean, n, res.keep, res.T, res.c) == pytest.approx(res.error)


# -- intercept variant ------------------------------------------------------------------------


def test_intercept_id_matches_centred_qr(Z: np.ndarray) -> None:
    Zo = Z + np.linspace(-2, 2, 12)
    G, mean, n = _stats(Zo)
    for k in (2, 5, 9):
        res = interpolative_from_gram(G, k, intercept=True, mean=mean, n=n)
        keep_ref, T_ref = _qr_interp(Zo - mean, k)
        np.testing.assert_array_equal(res.keep, keep_ref)
        assert _rel(res.T, T_ref) < 1e-6
        np.testing.assert_allclose(res.c, mean - T_ref.T @ mean[keep_ref], atol=1e-8)
        assert res.error == pytest.approx(_direct_error(Zo, res.keep, res.T, res.c), rel=1e-8)
        curve = id_error_curve(G, intercept=True, mean=mean, n=n)
        assert curve[k] == pytest.approx(res.error, rel=1e-6)
    with pytest.raises(ValueError):
        interpolative_from_gram(G, 3, intercept=True)


def test_constant_channel_comes_from_intercept(Z: np.ndarray) -> None:
    Zc = Z.copy()
    Zc[:, 4] = 3.0
    G, mean, n = _stats(Zc)
    res = interpolative_from_gram(G, 11, intercept=True, mean=mean, n=n)
    assert 4 not in res.keep  # zero centred variance: pivoted last
    np.testing.assert_allclose(Zc[:, res.keep] @ res.T[:, 4] + res.c[4], 3.0, rtol=0, atol=1e-9)
    M, c = least_squares_map(G, mean, n, np.array([0, 7]), intercept=True)
    np.testing.assert_allclose(Zc[:, [0, 7]] @ M[:, 4] + c[4], 3.0, rtol=0, atol=1e-9)
    assert rank_for_error(G, 1e-9, intercept=True, mean=mean, n=n) == 11


# -- properties -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_rows=st.integers(1, 30),
    m=st.integers(1, 9),
    rank=st.integers(0, 9),
    data=st.data(),
)
def test_properties(seed: int, n_rows: int, m: int, rank: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    r = min(rank, n_rows, m)
    Z = rng.standard_normal((n_rows, r)) @ rng.standard_normal((r, m))
    Z = Z * np.exp(rng.uniform(-3, 3, m))
    k = data.draw(st.integers(0, m))
    G, mean, n = _stats(Z)
    curve = id_error_curve(G)
    assert curve.shape == (m + 1,)
    assert np.all(np.diff(curve) <= 0)
    assert np.all((curve >= 0) & (curve <= 1))
    for res in (
        interpolative_from_gram(G, k),
        interpolative_from_gram(G, k, intercept=True, mean=mean, n=n),
        interpolative_from_blocks(_blocks(Z, 4), k),
    ):
        assert res.keep.size == k and np.all(np.diff(res.keep) > 0)
        np.testing.assert_array_equal(res.T[:, res.keep], np.eye(k))
        np.testing.assert_array_equal(res.c[res.keep], 0.0)
        assert 0.0 <= res.error <= 1.0 + 1e-12
        assert np.all(np.isfinite(res.T))
        if k >= r and r > 0:
            assert _direct_error(Z, res.keep, res.T, res.c) < 1e-6
