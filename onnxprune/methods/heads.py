"""Attention heads: removed heads reconstructed from the kept heads, by a map chosen on held-out
calibration samples.

A head group (`ChannelGroup.head_dim` = D > 1, graph/attention.py) has H channels of D features
each at its tap, the out projection's input. The out projection reads each of the D features
through its own row, so any (k·D) × (H·D) map from the kept heads' features folds into it
exactly (graph/rewrite.py). Three families of such maps, from the feature-level statistics of the
tap (`GroupStats.features`), affine with an intercept:

- "full": every removed feature from every kept feature, ridge regression (k·D per feature);
- "heads": each removed head as a combination of the kept heads, M = T ⊗ I_D (k per head), the
  least-squares T of the heads' features treated as positions; ridge as well;
- "none": selection only (with the intercept, removed features replaced by their means).

The full map has D² times the parameters of T: on a few images of a large ViT it fits the
calibration tokens almost exactly and fails on any other image. So the family and its ridge are
chosen by two-fold cross-validation: fitted on the even calibration samples and judged on the
odd ones, and the other way round (`TapStats.folds`), summed; the heads are chosen greedily by the
same held-out error, and the chosen map is refitted on all samples (docs/METHODS.md §4.6).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from onnxprune.graph.groups import Tap
from onnxprune.plan import Correction, GroupStats, TapStats

FAMILIES = ("none", "heads", "full")  # by number of parameters: ties go to the smaller
RIDGES = (1e-10, *np.logspace(-4, 1, 11))  # relative to the mean diagonal of the kept Gram


@dataclass(frozen=True)
class HeadMap:
    """A map family, its relative ridge, and its error: squared relative errors summed over
    the taps, held out (two-fold) or, where the data have no two folds, in-sample."""

    family: str
    ridge: float
    error: float
    held_out: bool = True

    def info(self) -> dict[str, float]:
        """For the report: `map_<family>` = the ridge, and `cv_err` (held-out rel. error)."""
        return {f"map_{self.family}": self.ridge, "cv_err": float(np.sqrt(self.error))}


def feature_tap(tap: Tap, head_dim: int) -> Tap:
    """The head tap seen feature by feature (one channel per feature of every head)."""
    return Tap(tap.tensor, tap.axis, tap.offset * head_dim, tap.spatial // head_dim)


def head_features(heads: np.ndarray, head_dim: int) -> np.ndarray:
    """The feature indices of `heads` (ascending when `heads` is)."""
    heads = np.asarray(heads, dtype=np.intp)
    return (heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def select_heads(
    taps: Iterable[TapStats], keep: int, head_dim: int, *, intercept: bool
) -> tuple[np.ndarray, HeadMap]:
    """`keep` heads chosen one at a time, each the one whose addition leaves the smallest
    held-out error of the best map (summed over the taps, each relative to its energy), and
    that map. Where a tap has no two folds, the in-sample error of least squares decides."""
    splits = [_Split.of(tap, head_dim, intercept) for tap in taps]
    heads = splits[0].heads
    if keep >= heads:
        return np.arange(heads), HeadMap("full", RIDGES[0], 0.0)
    chosen: list[int] = []
    best = None
    for _ in range(keep):
        rest = [h for h in range(heads) if h not in chosen]
        scored = [_best_map(splits, sorted([*chosen, h])) for h in rest]
        pick = int(np.argmin([m.error for m in scored]))
        chosen.append(rest[pick])
        best = scored[pick]
    return np.array(sorted(chosen), dtype=np.intp), best


def channel_map(tap: TapStats, keep: np.ndarray, *, intercept: bool) -> HeadMap:
    """For a group of single channels (an FFN's neurons, `--cv-maps`): the map from the kept
    channels, ridge or none (means only), of least two-fold held-out error, as for heads (with
    one feature per channel the "heads" family is the "full" one)."""
    choice = _best_map([_Split.of(tap, 1, intercept)], sorted(int(i) for i in keep))
    return replace(choice, family="full") if choice.family == "heads" else choice


def feature_corrections(
    stats: GroupStats, keep: np.ndarray, head_dim: int, choice: HeadMap, *, intercept: bool
) -> dict[str, Correction]:
    """Per tap key, `choice`'s map from the kept heads' features to all features, fitted on
    every calibration sample."""
    out = {}
    for key, tap in stats.features.items():
        M, c = fit_map(tap, keep, head_dim, choice.family, choice.ridge, intercept=intercept)
        out[key] = Correction(M, c if intercept else None)
    return out


def fit_map(
    tap: TapStats, keep: np.ndarray, head_dim: int, family: str, ridge: float, *, intercept: bool
) -> tuple[np.ndarray, np.ndarray]:
    """M (k·D, H·D; kept features map to themselves) and c of one family and relative ridge,
    fitted on the tap's statistics (centred with `intercept`)."""
    mean = tap.mean
    A = tap.gram / max(tap.n, 1) - np.outer(mean, mean) if intercept else tap.gram
    keep = np.sort(np.asarray(keep, dtype=np.intp))
    heads = A.shape[0] // head_dim
    removed = np.setdiff1d(np.arange(heads), keep)
    S, R = head_features(keep, head_dim), head_features(removed, head_dim)
    M = np.zeros((S.size, A.shape[0]))
    M[:, S] = np.eye(S.size)
    if family == "full":
        M[:, R] = _ridge_solve(A[np.ix_(S, S)], A[np.ix_(S, R)], ridge)
    elif family == "heads":
        a = head_gram(A, head_dim)
        T = _ridge_solve(a[np.ix_(keep, keep)], a[np.ix_(keep, removed)], ridge)
        M[:, R] = np.kron(T, np.eye(head_dim))
    c = mean - M.T @ mean[S] if intercept else np.zeros(A.shape[0])
    c[S] = 0.0
    return M, c


def head_gram(A: np.ndarray, head_dim: int) -> np.ndarray:
    """The heads' Gram with their features as positions: a[h, g] = Σ_d A[(h, d), (g, d)]."""
    heads = A.shape[0] // head_dim
    return np.einsum("idjd->ij", A.reshape(heads, head_dim, heads, head_dim))


def cv_errors(
    fit: np.ndarray, judge: np.ndarray, S: np.ndarray, R: np.ndarray
) -> tuple[np.ndarray, float]:
    """Squared residual on `judge` of the ridge maps fitted on `fit`, for every ridge in
    RIDGES, and of no map (the ridge → ∞ limit): ‖Z_R − Z_S M‖² = tr(E_RR) − 2 tr(MᵀE_SR) +
    tr(MᵀE_SS M), with M = (F_SS + λI)⁻¹ F_SR from one eigendecomposition F_SS = V diag(e) Vᵀ."""
    none = float(judge[R, R].sum())  # tr J_RR
    e, V = np.linalg.eigh(fit[np.ix_(S, S)])
    P = V.T @ fit[np.ix_(S, R)]
    cross = np.sum(P * (V.T @ judge[np.ix_(S, R)]), axis=1)
    quad = (V.T @ judge[np.ix_(S, S)] @ V) * (P @ P.T)
    scale = max(float(np.sum(e)), 0.0) / max(S.size, 1)
    errors = []
    for ridge in RIDGES:
        d = 1.0 / np.maximum(e + ridge * scale, 1e-300)
        errors.append(none - 2.0 * float(d @ cross) + float(d @ quad @ d))
    return np.maximum(np.array(errors), 0.0), none


@dataclass(frozen=True, eq=False)
class _Split:
    """One tap's (fit, judge) pairs of matrices, of features and of heads: the fit fold's Gram
    (centred on its mean with an intercept) and the judged fold's second moment about the fit
    fold's mean (so an affine map's residual is a plain quadratic form); and the energy errors
    are relative to. Two pairs (even → odd samples, odd → even) where the tap has two folds;
    otherwise one, all samples judged on themselves (`held_out` False)."""

    pairs: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]
    energy: float
    head_dim: int
    heads: int
    held_out: bool

    @classmethod
    def of(cls, tap: TapStats, head_dim: int, intercept: bool) -> _Split:
        held_out = len(tap.folds) == 2 and all(f.n for f in tap.folds)
        parts = [tap.folds, tap.folds[::-1]] if held_out else [(tap, tap)]
        pairs = []
        for a, b in parts:
            shift = a.mean if intercept else np.zeros_like(a.mean)
            fit = a.gram - a.n * np.outer(shift, shift)
            judge = _moment_about(b, shift)
            pairs.append((fit, judge, head_gram(fit, head_dim), head_gram(judge, head_dim)))
        energy = float(np.trace(tap.gram))
        return cls(tuple(pairs), energy, head_dim, tap.gram.shape[0] // head_dim, held_out)


def _moment_about(tap: TapStats, shift: np.ndarray) -> np.ndarray:
    """Σ (z − shift)(z − shift)ᵀ over the tap's rows."""
    s = tap.sum
    return tap.gram - np.outer(s, shift) - np.outer(shift, s) + tap.n * np.outer(shift, shift)


def _best_map(splits: Sequence[_Split], kept: list[int]) -> HeadMap:
    """The family and ridge of least held-out error for the heads `kept`; least squares with
    its in-sample error where a tap has no two folds."""
    keep = np.asarray(kept, dtype=np.intp)
    removed = np.setdiff1d(np.arange(splits[0].heads), keep)
    D = splits[0].head_dim
    S, R = head_features(keep, D), head_features(removed, D)
    totals = {"none": 0.0, "heads": np.zeros(len(RIDGES)), "full": np.zeros(len(RIDGES))}
    for split in splits:
        scale = 1.0 / max(split.energy, 1e-300)
        for fit, judge, fit_h, judge_h in split.pairs:
            full, none = cv_errors(fit, judge, S, R)
            heads, _ = cv_errors(fit_h, judge_h, keep, removed)
            totals["none"] += none * scale
            totals["heads"] = totals["heads"] + heads * scale
            totals["full"] = totals["full"] + full * scale
    if not all(split.held_out for split in splits):
        return HeadMap("full", RIDGES[0], float(totals["full"][0]), held_out=False)
    candidates = [HeadMap("none", float("inf"), totals["none"])]
    for family in FAMILIES[1:]:  # large ridges first: ties go to the stronger penalty
        for i in reversed(range(len(RIDGES))):
            candidates.append(HeadMap(family, float(RIDGES[i]), float(totals[family][i])))
    return min(candidates, key=lambda m: m.error)


def _ridge_solve(A_SS: np.ndarray, A_SR: np.ndarray, ridge: float) -> np.ndarray:
    """(A_SS + λI)⁻¹ A_SR, λ = `ridge` × the mean diagonal of A_SS (as in `cv_errors`)."""
    import scipy.linalg  # lazy, like every scipy import

    lam = ridge * max(float(np.trace(A_SS)), 0.0) / max(A_SS.shape[0], 1)
    ridged = A_SS + lam * np.eye(A_SS.shape[0])
    try:
        return scipy.linalg.solve(ridged, A_SR, assume_a="pos")
    except (np.linalg.LinAlgError, ValueError):
        return np.linalg.lstsq(ridged, A_SR, rcond=None)[0]
