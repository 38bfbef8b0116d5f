"""Attention heads: removed heads reconstructed from every feature of the kept heads.

A head group (`ChannelGroup.head_dim` = D > 1, graph/attention.py) has H channels of D features
each at its tap, the out projection's input. Treating a head's features as positions gives a
correction with one coefficient per kept head; but the out projection reads each of the D
features through its own row, so any (k·D) × (H·D) map from the kept heads' features folds into
it just as exactly (graph/rewrite.py). `select_heads` picks the heads greedily by that
reconstruction's error and `feature_corrections` gives its least-squares map (affine with an
intercept), from the feature-level statistics of the tap (`GroupStats.features`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from onnxprune.graph.groups import Tap
from onnxprune.methods.linalg import least_squares_map, reconstruction_error
from onnxprune.plan import Correction, GroupStats, TapStats


def feature_tap(tap: Tap, head_dim: int) -> Tap:
    """The head tap seen feature by feature (one channel per feature of every head)."""
    return Tap(tap.tensor, tap.axis, tap.offset * head_dim, tap.spatial // head_dim)


def head_features(heads: np.ndarray, head_dim: int) -> np.ndarray:
    """The feature indices of `heads` (ascending when `heads` is)."""
    heads = np.asarray(heads, dtype=np.intp)
    return (heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def select_heads(
    taps: Iterable[TapStats], keep: int, head_dim: int, *, intercept: bool
) -> np.ndarray:
    """`keep` heads chosen one at a time, each the one whose addition leaves the smallest
    least-squares error of all features (summed over the taps, each relative to its energy)."""
    taps = list(taps)
    heads = taps[0].gram.shape[0] // head_dim
    chosen: list[int] = []
    for _ in range(keep):
        rest = [h for h in range(heads) if h not in chosen]
        errors = [_error(taps, np.array(sorted([*chosen, h])), head_dim, intercept) for h in rest]
        chosen.append(rest[int(np.argmin(errors))])
    return np.array(sorted(chosen), dtype=np.intp)


def feature_corrections(
    stats: GroupStats, keep: np.ndarray, head_dim: int, *, intercept: bool
) -> dict[str, Correction]:
    """Per tap key, the least-squares map from the kept heads' features to all features."""
    out = {}
    for key, tap in stats.features.items():
        M, c = _fit(tap, head_features(keep, head_dim), intercept)
        out[key] = Correction(M, c if intercept else None)
    return out


def _fit(tap: TapStats, features: np.ndarray, intercept: bool) -> tuple[np.ndarray, np.ndarray]:
    return least_squares_map(tap.gram, tap.mean, tap.n, features, intercept=intercept)


def _error(taps: list[TapStats], heads: np.ndarray, head_dim: int, intercept: bool) -> float:
    features = head_features(heads, head_dim)
    total = 0.0
    for tap in taps:
        M, c = _fit(tap, features, intercept)
        c = c if intercept else None
        total += reconstruction_error(tap.gram, tap.mean, tap.n, features, M, c) ** 2
    return total
