"""Pruning within attention heads: value dimensions by PCA or ID, query/key dimensions by a
change of basis. Every head of a group keeps the same number of its D query/key dims and of its
D value dims (the head Reshapes need one width each).

Values. Head h outputs O_h = P_h V_h (P_h the softmax of its scores), linear in V_h: for a
D × k map R_h, O_h R_h = P_h (V_h R_h), so narrowing V_h to V_h R_h (W_v,h ← W_v,h R_h, same for
the bias) narrows O_h alike, and if O ≈ (O R) M + 1cᵀ (R the block-diagonal of the R_h) then
folding M into the out projection's rows (W_o ← M W_o, bias += cᵀ W_o) is the whole
correction (P_h's rows sum to 1, so the intercept passes through it too). `value_dims` takes
R_h = the leading eigenvectors of head h's centred output Gram ("pca": the best rank-k
reconstruction of the head alone) or k columns of the identity chosen by ID ("id": kept
features), then M, c as the least-squares map from every head's kept dims to all features
(the out projection reads them all, so any such map folds as exactly).

Queries and keys. The scores q kᵀ are unchanged by q → q M, k → k M⁻ᵀ for any invertible M (an
orthogonal R is the case M⁻ᵀ = M). Keeping k columns of both makes q kᵀ ≈ q Π kᵀ with Π = A Bᵀ
of rank k. The softmax runs over keys, so an error constant along a query's row of scores costs
nothing: only k − k̄ (k̄ the keys' mean) matters. Treating queries and keys as independent, the
expected squared score error is ‖Σ_q^½ (I − Π) C_k^½‖_F² (Σ_q = E[qᵀq], C_k the keys'
covariance), which Eckart–Young minimises over rank-k Π by the truncated SVD
Σ_q^½ C_k^½ = U S Vᵀ: A = Σ_q^-½ U_k S_k^½, B = C_k^-½ V_k S_k^½ (pseudo-inverse roots). At
k = D, Π is the identity on the data's span, so the scores are exact up to per-query constants.
The 1/√D scale of the scores stays the original D's: the products keep their size.
"""

from __future__ import annotations

import numpy as np

from onnxprune.methods.linalg import (
    interpolative_from_gram,
    least_squares_map,
    reconstruction_error,
)
from onnxprune.plan import QueryKeyBasis, TapStats, ValueDims


def value_dims(
    tap: TapStats, heads: int, keep: int, *, basis: str = "pca", intercept: bool = True
) -> ValueDims:
    """`keep` dims per head of the head outputs at `tap` (H·D features, head-major): by ID of
    each head's Gram (`basis` "id": kept features) or its principal directions ("pca", the
    best rank-k reconstruction of each head alone), then
    the least-squares map from every head's kept dims to all features."""
    dim = tap.gram.shape[0] // heads
    maps = np.stack([_value_basis(tap, slice(h * dim, (h + 1) * dim), keep, basis, intercept)
                     for h in range(heads)])  # fmt: skip
    B = np.zeros((heads * dim, heads * keep))
    for h in range(heads):
        B[h * dim : (h + 1) * dim, h * keep : (h + 1) * keep] = maps[h]
    gram = np.block([[B.T @ tap.gram @ B, B.T @ tap.gram], [tap.gram @ B, tap.gram]])
    mean = np.concatenate([B.T @ tap.mean, tap.mean])
    kept = np.arange(heads * keep)
    M, c = least_squares_map(gram, mean, tap.n, kept, intercept=intercept)
    c = c if intercept else None
    error = reconstruction_error(gram, mean, tap.n, kept, M, c)  # relative to both parts
    error *= np.sqrt(np.trace(gram) / max(np.trace(tap.gram), 1e-300))
    out = slice(heads * keep, None)
    return ValueDims(maps, M[:, out], None if c is None else c[out], float(error))


def _value_basis(tap: TapStats, block: slice, keep: int, basis: str, intercept: bool) -> np.ndarray:
    """The D × `keep` map of one head's values: columns of the identity (ID's selection) or
    the leading eigenvectors of the head's (centred, with `intercept`) Gram."""
    gram, mean = tap.gram[block, block], tap.mean[block]
    if basis == "id":
        found = interpolative_from_gram(gram, keep, intercept=intercept, mean=mean, n=tap.n)
        return np.eye(len(mean))[:, np.sort(found.keep)]
    spread = gram / max(tap.n, 1) - (np.outer(mean, mean) if intercept else 0.0)
    return np.linalg.eigh(spread)[1][:, ::-1][:, :keep]


def query_key_basis(queries: TapStats, keys: TapStats, heads: int, keep: int) -> QueryKeyBasis:
    """The score-preserving rank-`keep` maps of every head from the query and key statistics
    (H·D features each, head-major)."""
    dim = queries.gram.shape[0] // heads
    maps, errors = [], []
    for h in range(heads):
        block = slice(h * dim, (h + 1) * dim)
        second = queries.gram[block, block] / max(queries.n, 1)
        mean = keys.mean[block]
        covariance = keys.gram[block, block] / max(keys.n, 1) - np.outer(mean, mean)
        A, B, error = _truncated_pair(second, covariance, keep)
        maps.append((A, B))
        errors.append(error)
    A, B = (np.stack(m) for m in zip(*maps, strict=True))
    return QueryKeyBasis(A, B, float(np.mean(errors)))


def _truncated_pair(
    second: np.ndarray, covariance: np.ndarray, keep: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """A, B (D × keep) with Σ_q^½ A Bᵀ C_k^½ the best rank-`keep` approximation of Σ_q^½ C_k^½."""
    q_root, q_inverse = _roots(second)
    k_root, k_inverse = _roots(covariance)
    U, s, Vt = np.linalg.svd(q_root @ k_root)
    scale = np.sqrt(s[:keep])
    A = q_inverse @ U[:, :keep] * scale
    B = k_inverse @ Vt[:keep].T * scale
    total = float(np.sum(s**2))
    error = float(np.sqrt(np.sum(s[keep:] ** 2) / total)) if total > 0 else 0.0
    return A, B, error


def _roots(S: np.ndarray, rcond: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """S^½ and the pseudo-inverse of S^½ of a symmetric positive semidefinite S (eigenvalues
    below `rcond`·max count as zero: directions the data never takes)."""
    w, V = np.linalg.eigh((S + S.T) / 2)
    w = np.clip(w, 0.0, None)
    live = w > rcond * max(float(w.max()), 1e-300)
    root = np.sqrt(w)
    inverse = np.where(live, 1.0 / np.where(live, root, 1.0), 0.0)
    return (V * root) @ V.T, (V * inverse) @ V.T
