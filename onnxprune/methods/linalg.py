"""Numerical core for interpolative-decomposition (ID) pruning and least-squares compensation.

A group of m channels has calibration activations Z (N × m, rows = samples × positions) that we
never keep: only n, the channel means μ and the Gram G = ZᵀZ (float64) are streamed. A plan keeps
channels S (|S| = k) and approximates every channel as a ≈ Mᵀ a_S + c (DESIGN.md §3).

Errors are always relative Frobenius norms ‖Z − (Z_S M + 1cᵀ)‖_F / ‖Z‖_F (not squared), so the
ID error, the least-squares error and the Eckart–Young bound can be compared directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "IDResult",
    "id_error_curve",
    "interpolative_from_blocks",
    "interpolative_from_gram",
    "least_squares_map",
    "optimal_rank_error",
    "rank_for_error",
    "reconstruction_error",
    "selection_map",
]


@dataclass(frozen=True, eq=False)
class IDResult:
    """A rank-k interpolative decomposition Z ≈ Z[:, keep] @ T + 1 cᵀ.

    Attributes:
        keep: (k,) kept channel ids, ascending; row i of T belongs to channel keep[i].
        order: (m,) greedy pivot order; order[:k] is the kept set in the order it was chosen.
        T: (k, m) interpolation matrix with T[:, keep] == I exactly.
        c: (m,) intercept (zeros unless the intercept variant was asked for; c[keep] == 0).
        error: relative Frobenius error ‖Z − Z_S T − 1cᵀ‖_F / ‖Z‖_F of this T.
        proxy: |r_{k+1,k+1} / r_11| of the pivoted factor (0 when k == m), the paper's cheap score.
    """

    keep: np.ndarray
    order: np.ndarray
    T: np.ndarray
    c: np.ndarray
    error: float
    proxy: float


def interpolative_from_gram(
    G: np.ndarray,
    k: int,
    *,
    ridge: float = 1e-10,
    intercept: bool = False,
    mean: np.ndarray | None = None,
    n: int | None = None,
) -> IDResult:
    """Rank-k ID from the Gram: greedy column pivoting on Z done as pivoted Cholesky of G.

    A ridge of `ridge`·trace/m is added before factoring so that rank-deficient G still yields k
    pivots and a solvable R11; T is then the (ridge-regularised) least-squares fit of every channel
    on the kept ones. With `intercept`, pivoting runs on the centred Gram G − n μμᵀ (needs `mean`
    and `n`) and c = μ − Tᵀ μ_S, which reconstructs constant channels exactly.
    """
    fac = _factor_gram(G, ridge=ridge, intercept=intercept, mean=mean, n=n)
    X = _interp_block(fac.R, k)
    keep, T = _assemble(fac.order, k, X)
    c = _intercept(fac.mean, keep, T) if intercept else np.zeros(fac.m)
    error = _error_of(fac, keep, T)
    return IDResult(keep, fac.order.copy(), T, c, error, _proxy(fac.R, k))


def interpolative_from_blocks(blocks: Iterable[np.ndarray], k: int) -> IDResult:
    """Rank-k ID by blocked QR (the paper's TSQR path): R of each row block, stacked and
    re-reduced, then one column-pivoted QR of the stacked R (LAPACK geqp3).

    Better conditioned than the Gram path (no squaring), at the cost of seeing the data.
    """
    import scipy.linalg  # lazy, like every scipy import: it costs ~0.3 s of each CLI start

    R = _stacked_r(blocks)
    R, perm = scipy.linalg.qr(R, mode="r", pivoting=True)
    m = R.shape[1]
    R = np.vstack([R, np.zeros((max(m - R.shape[0], 0), m))])  # square, for N < m
    X = _interp_block(R, k)
    keep, T = _assemble(np.asarray(perm, dtype=np.intp), k, X)
    resid = R[:, :k] @ X - R[:, k:]
    total = float(np.sum(R * R))
    error = float(np.sqrt(np.sum(resid * resid) / total)) if total > 0 else 0.0
    return IDResult(keep, np.asarray(perm, dtype=np.intp), T, np.zeros(m), error, _proxy(R, k))


def id_error_curve(
    G: np.ndarray,
    *,
    ridge: float = 1e-10,
    intercept: bool = False,
    mean: np.ndarray | None = None,
    n: int | None = None,
) -> np.ndarray:
    """Relative ID error for every k = 0..m (length m+1) from one pivoted factorisation.

    e_k² = Σ_{i≥k} (‖R[i, i:]‖² − ridge) / trace G: the Schur-complement traces along the pivot
    order. Non-increasing by construction; used to allocate ranks across layers. Exceeds the
    error of the returned T by O(ridge·‖T‖²) in e², which is visible (~1e-5) only at ranks where
    the true error is ~0 on rank-deficient data.
    """
    return _curve(_factor_gram(G, ridge=ridge, intercept=intercept, mean=mean, n=n))


def rank_for_error(
    G: np.ndarray,
    epsilon: float,
    *,
    ridge: float = 1e-10,
    intercept: bool = False,
    mean: np.ndarray | None = None,
    n: int | None = None,
) -> int:
    """Smallest k whose ID meets ‖Z − Z_S T‖_F ≤ ε ‖Z‖_F (paper Def. 2.1, Frobenius form).

    The candidate comes from the cheap error curve of one factorisation; it is then certified
    with the actual error of the T that `interpolative_from_gram` would return, moving k up until
    it passes and down while k−1 also passes.
    """
    fac = _factor_gram(G, ridge=ridge, intercept=intercept, mean=mean, n=n)
    curve = _curve(fac)
    k = int(np.argmax(curve <= epsilon)) if np.any(curve <= epsilon) else fac.m

    def err(j: int) -> float:
        keep, T = _assemble(fac.order, j, _interp_block(fac.R, j))
        return _error_of(fac, keep, T)

    while k < fac.m and err(k) > epsilon:
        k += 1
    while k > 0 and err(k - 1) <= epsilon:
        k -= 1
    return k


def least_squares_map(
    G: np.ndarray,
    mean: np.ndarray,
    n: int,
    keep: np.ndarray,
    *,
    intercept: bool,
    ridge: float = 1e-10,
) -> tuple[np.ndarray, np.ndarray]:
    """Best linear (or affine, with `intercept`) reconstruction of all channels from `keep`.

    Solves G_SS M = G_S· (c = 0), or with the centred Gram C = G/n − μμᵀ: C_SS M = C_S· and
    c = μ − Mᵀ μ_S. The ridge (relative to trace/m, as in the ID) keeps G_SS invertible; kept
    channels map to themselves exactly. Returns M (k, m; rows in ascending `keep` order) and c.
    """
    G = np.asarray(G, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    keep = np.sort(np.asarray(keep, dtype=np.intp))
    m = G.shape[0]
    A = G[keep] / n - np.outer(mean[keep], mean) if intercept else G[keep]  # the kept rows
    trace = float(np.trace(G)) / n - float(mean @ mean) if intercept else float(np.trace(G))
    lam = ridge * max(trace, 0.0) / max(m, 1)
    ASS = A[:, keep] + lam * np.eye(keep.size)
    import scipy.linalg

    removed = np.setdiff1d(np.arange(m), keep)  # the kept columns are I: solved for the rest
    ASR = A[:, removed]
    M = np.zeros((keep.size, m))
    M[:, keep] = np.eye(keep.size)
    try:
        M[:, removed] = scipy.linalg.solve(ASS, ASR, assume_a="pos")
    except (np.linalg.LinAlgError, ValueError):
        M[:, removed] = np.linalg.lstsq(ASS, ASR, rcond=None)[0]
    c = _intercept(mean, keep, M) if intercept else np.zeros(m)
    return M, c


def reconstruction_error(
    G: np.ndarray,
    mean: np.ndarray,
    n: int,
    keep: np.ndarray,
    M: np.ndarray,
    c: np.ndarray | None,
) -> float:
    """Relative error ‖Z − (Z_S M + 1cᵀ)‖_F / ‖Z‖_F computed from (G, μ, n) alone.

    With B = I − E_S M: ‖Z B − 1cᵀ‖² = tr(Bᵀ G B) − 2 cᵀ Bᵀ s + n ‖c‖², s = n μ. Cancellation
    limits the accuracy to about sqrt(eps) ≈ 1e-8 relative. `M` rows follow ascending `keep`.
    """
    G = np.asarray(G, dtype=np.float64)
    keep = np.sort(np.asarray(keep, dtype=np.intp))
    total = float(np.trace(G))
    if total <= 0:
        return 0.0
    B = np.eye(G.shape[0])
    B[keep] -= M
    live = np.any(B != 0, axis=0)  # a kept channel mapped to itself leaves a zero column of B
    B = B[:, live]  # (the other columns add exact zeros: m² per removed channel, not m³)
    sq = float(np.sum(B * (G @ B)))
    if c is not None:
        s = n * np.asarray(mean, dtype=np.float64)
        sq += -2.0 * float(c[live] @ (B.T @ s)) + n * float(c @ c)
    return float(np.sqrt(max(sq, 0.0) / total))


def optimal_rank_error(G: np.ndarray, k: int) -> float:
    """Eckart–Young bound sqrt(Σ_{i>k} λ_i / Σ λ_i): no rank-k (hence no k-column) fit beats it."""
    lam = np.clip(np.linalg.eigvalsh(np.asarray(G, dtype=np.float64))[::-1], 0.0, None)
    total = float(lam.sum())
    return float(np.sqrt(lam[k:].sum() / total)) if total > 0 else 0.0


def selection_map(m: int, keep: np.ndarray) -> np.ndarray:
    """Plain selection M (k, m) of zeros and ones: M[i, keep[i]] = 1, rows in ascending order."""
    keep = np.sort(np.asarray(keep, dtype=np.intp))
    M = np.zeros((keep.size, m))
    M[np.arange(keep.size), keep] = 1.0
    return M


# --------------------------------------------------------------------------------------------
# internals


@dataclass(frozen=True, eq=False)
class _Factor:
    """Pivoted Cholesky A_ΠΠ = RᵀR of the (centred) ridged Gram, plus what errors need."""

    R: np.ndarray  # (m, m) upper triangular, in pivot order
    order: np.ndarray  # (m,) pivot order Π
    A: np.ndarray  # the un-ridged (centred) Gram the factor is of
    lam: float  # ridge added to the diagonal
    total: float  # trace of the uncentred G: the ‖Z‖_F² that errors are relative to
    mean: np.ndarray  # channel means (zeros if not given)

    @property
    def m(self) -> int:
        return self.R.shape[0]


def _factor_gram(
    G: np.ndarray, *, ridge: float, intercept: bool, mean: np.ndarray | None, n: int | None
) -> _Factor:
    G = np.asarray(G, dtype=np.float64)
    G = 0.5 * (G + G.T)
    m = G.shape[0]
    if intercept and (mean is None or n is None):
        raise ValueError("intercept=True needs 'mean' and 'n'.")
    mu = np.zeros(m) if mean is None else np.asarray(mean, dtype=np.float64)
    A = G - n * np.outer(mu, mu) if intercept else G
    lam = ridge * max(float(np.trace(A)), 0.0) / max(m, 1)
    ridged = A.copy()
    ridged.flat[:: m + 1] += lam
    R, order = _pivoted_cholesky(ridged)
    return _Factor(R, order, A, lam, float(np.trace(G)), mu)


def _pivoted_cholesky(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full greedy diagonal pivoting A_ΠΠ = RᵀR; LAPACK pstrf, numpy when pstrf stops early."""
    from scipy.linalg import lapack

    m = A.shape[0]
    if m == 0:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.intp)
    c, piv, rank, info = lapack.dpstrf(A, tol=-1.0, lower=0)
    if info < 0 or rank < m:
        return _pivoted_cholesky_numpy(A)
    for j in range(m - 1):  # the lower triangle still holds A's; column by column, in place
        c[j + 1 :, j] = 0.0  # (c is Fortran-ordered: 6 ms at 3072 channels, np.triu 280 ms)
    return c, (piv - 1).astype(np.intp)


def _pivoted_cholesky_numpy(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left-looking greedy pivoted Cholesky for semidefinite A, never stopping early.

    Pivots at or below LAPACK's tolerance m·eps·max(diag) are treated as exact zeros: the row is
    zeroed, so later solves see an exactly singular R11 and fall back to least squares.
    """
    m = A.shape[0]
    A = A.copy()
    order = np.arange(m)
    R = np.zeros((m, m))
    d = np.diag(A).copy()
    tol = m * np.finfo(np.float64).eps * max(float(d.max()), 0.0)
    for i in range(m):
        p = i + int(np.argmax(d[i:]))
        for arr in (order, d):
            arr[[i, p]] = arr[[p, i]]
        A[[i, p]] = A[[p, i]]
        A[:, [i, p]] = A[:, [p, i]]
        R[:, [i, p]] = R[:, [p, i]]
        if d[i] <= tol:
            continue
        R[i, i] = np.sqrt(d[i])
        R[i, i + 1 :] = (A[i, i + 1 :] - R[:i, i] @ R[:i, i + 1 :]) / R[i, i]
        d[i + 1 :] -= R[i, i + 1 :] ** 2
    return R, order


def _interp_block(R: np.ndarray, k: int) -> np.ndarray:
    """X = R11⁻¹ R12 (k × (m−k)): least-squares fit of the other columns on the first k.

    Uses least squares when R11 is (numerically) singular, e.g. k beyond the rank with ridge 0.
    """
    R11, R12 = R[:k, :k], R[:k, k:]
    diag = np.abs(np.diag(R11))
    if k == 0 or R12.size == 0:
        return np.zeros((k, R.shape[1] - k))
    if diag.min() > R.shape[1] * np.finfo(np.float64).eps * diag.max():
        import scipy.linalg

        return scipy.linalg.solve_triangular(R11, R12)
    return np.linalg.lstsq(R11, R12, rcond=None)[0]


def _assemble(order: np.ndarray, k: int, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map T_perm = [I_k | X] (pivot order) to channel order with rows in ascending keep."""
    m = order.size
    T = np.empty((k, m))
    T[:, order[:k]] = np.eye(k)
    T[:, order[k:]] = X
    rows = np.argsort(order[:k], kind="stable")
    return order[:k][rows].astype(np.intp), T[rows]


def _intercept(mean: np.ndarray, keep: np.ndarray, M: np.ndarray) -> np.ndarray:
    c = mean - M.T @ mean[keep]
    c[keep] = 0.0
    return c


def _error_of(fac: _Factor, keep: np.ndarray, T: np.ndarray) -> float:
    """Relative error of (keep, T) on the Gram the factor came from: ‖Z_r − Z_S T_r‖² expanded.

    With the intercept, A is the centred Gram: its residual is exactly that of c = μ − Tᵀμ_S.
    """
    if fac.total <= 0:
        return 0.0
    rest = np.setdiff1d(np.arange(fac.m), keep)
    Tr = T[:, rest]
    ASr = fac.A[np.ix_(keep, rest)]
    sq = float(np.sum(np.diag(fac.A)[rest]) - 2 * np.sum(Tr * ASr))
    sq += float(np.sum(Tr * (fac.A[np.ix_(keep, keep)] @ Tr)))
    return float(np.sqrt(max(sq, 0.0) / fac.total))


def _curve(fac: _Factor) -> np.ndarray:
    rows = np.maximum(np.sum(fac.R * fac.R, axis=1) - fac.lam, 0.0)
    tail = np.concatenate([np.cumsum(rows[::-1])[::-1], [0.0]])
    if fac.total <= 0:
        return np.zeros(fac.m + 1)
    return np.sqrt(np.minimum(tail / fac.total, 1.0))


def _proxy(R: np.ndarray, k: int) -> float:
    m = R.shape[1]
    if k >= m or R[0, 0] == 0:
        return 0.0
    return float(abs(R[k, k] / R[0, 0]))


def _stacked_r(blocks: Iterable[np.ndarray]) -> np.ndarray:
    """R of the row-stacked blocks (ZᵀZ = Σ R_bᵀR_b), re-reducing whenever the stack grows."""
    stack: list[np.ndarray] = []
    rows = 0
    m = None
    for block in blocks:
        b = np.asarray(block, dtype=np.float64)
        m = b.shape[1]
        stack.append(np.linalg.qr(b, mode="r"))
        rows += stack[-1].shape[0]
        if rows > 4 * m:
            stack = [np.linalg.qr(np.vstack(stack), mode="r")]
            rows = stack[0].shape[0]
    if m is None:
        raise ValueError("interpolative_from_blocks got no blocks.")
    return np.vstack(stack)
