"""Per-weight (unstructured) pruning: score every weight, choose which to zero, shift the biases.

Elimination–compensation (Ballini et al., 2026; METHODS.md §2.1) scores weight w_ij of output
unit i and input feature j by the output change left after the best shift of b_i,

    I_ij = w_ij² (S2_ij − S1_ij² / S0_i),    δ_i = Σ_{j removed} w_ij S1_ij / S0_i,

in squared-output units, so one global ranking across layers is natural (`local` ranks each
layer apart). Units with S0_i = 0 do not reach the output: I = 0 and δ = w·mean(a). The baselines
remove without any shift: magnitude |w|, Wanda |w_ij|·‖X_j‖₂ (Sun et al. 2023: X stacks the
layer's input over every sample and position — every token of a transformer), first-order
Taylor |w·∂L/∂w| (gradient magnitude) and seeded random; `--compensate bias` gives any of them
elimination–compensation's shift for the weights it chose. With `joint`, the shifts of all
layers' units come from M δ = c (§2.4) instead.

Scopes of the ranking: global, per layer, per output row (Wanda's: every unit loses the same
share), or N:M (N of every M consecutive weights of a row kept, the 2:4 pattern of sparse
tensor cores; for a Conv, a row runs over (in, kh, kw) flattened).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from onnxprune.errors import UsageError
from onnxprune.options import parse_pattern

WEIGHT_NEEDS = {
    "biascomp": frozenset({"jacobian"}),
    "taylor": frozenset({"grad"}),
    "wanda": frozenset({"norms"}),
}


def weight_needs(method: str, compensate: str) -> frozenset[str]:
    """What a per-weight run gathers: the method's statistics, plus the Jacobian sums where
    elimination–compensation's shift is applied (biascomp, or `compensate` = "bias")."""
    needs = WEIGHT_NEEDS.get(method, frozenset())
    return needs | {"jacobian"} if compensate == "bias" else needs


def weight_scores(
    method: str,
    weights: Mapping[str, np.ndarray],
    stats: Mapping[str, object],
    grads: Mapping[str, np.ndarray],
    *,
    norms: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Importance of every weight of every layer (higher = keep), in the weight's shape.
    `norms` (Wanda's) holds ‖X_j‖₂ per layer in the shape of a weight row (in, …)."""
    if method == "biascomp":
        return {name: importance(w, stats[name]) for name, w in weights.items()}
    if method == "magnitude":
        return {name: np.abs(w) for name, w in weights.items()}
    if method == "wanda":
        if norms is None:
            raise UsageError("wanda scores need the input norms of every layer")
        return {name: np.abs(w) * norms[name][None] for name, w in weights.items()}
    if method == "taylor":
        return {name: np.abs(w * grads[name]) for name, w in weights.items()}
    rng = np.random.default_rng(seed)
    return {name: rng.random(w.shape) for name, w in weights.items()}


def importance(weight: np.ndarray, site) -> np.ndarray:
    """I = W² (S2 − S1²/S0): the output change left after the optimal shift of each bias."""
    s0 = _per_row(site.s0, weight)
    live = s0 > 0
    residual = np.where(live, site.s2 - site.s1**2 / np.where(live, s0, 1.0), 0.0)
    return weight**2 * np.maximum(residual, 0.0)


def independent_shift(weight: np.ndarray, site, removed: np.ndarray) -> np.ndarray:
    """δ_i = Σ_{j removed} w_ij S1_ij / S0_i, the plain mean w_ij·mean(a_j) where S0_i = 0."""
    s0 = _per_row(site.s0, weight)
    live = s0 > 0
    expected = np.where(live, site.s1 / np.where(live, s0, 1.0), site.mean[None])
    return np.where(removed, weight * expected, 0.0).reshape(len(weight), -1).sum(axis=1)


def joint_shift(weight: np.ndarray, site, removed: np.ndarray) -> np.ndarray:
    """δ solving M δ = c with c_i = Σ_kf T_ikf (W∘R)_kf: the jointly optimal shift of all of a
    layer's biases. Units with S0_i = 0 do not reach the output on the data; they keep the
    plain-mean shift, as in the independent form (M is singular there)."""
    joint = site.joint
    if joint is None:
        raise UsageError("the joint bias solve needs joint statistics (pass joint=True)")
    lost = np.where(removed, weight, 0.0).reshape(-1)
    c = joint.t.reshape(len(weight), -1) @ lost
    shift = independent_shift(weight, site, removed)
    live = np.asarray(site.s0) > 0
    if np.any(live):
        shift[live] = np.linalg.lstsq(joint.m[np.ix_(live, live)], c[live], rcond=1e-10)[0]
    return shift


def choose_removed(
    scores: Mapping[str, np.ndarray], sparsity: float, *, scope: str = "global"
) -> dict[str, np.ndarray]:
    """Boolean masks of the weights to zero, lowest scores first (ties go to the earlier
    weight): `sparsity` of all scores together ("global"), of each layer's ("layer"), of each
    output row's ("row"), or M − N of every M consecutive weights of a row ("N:M")."""
    if scope == "global":
        flat = np.concatenate([s.reshape(-1) for s in scores.values()])
        mask = _lowest(flat[None], sparsity)[0]
        out, start = {}, 0
        for name, s in scores.items():
            out[name] = mask[start : start + s.size].reshape(s.shape)
            start += s.size
        return out
    if scope == "layer":
        return {
            name: _lowest(s.reshape(1, -1), sparsity).reshape(s.shape) for name, s in scores.items()
        }
    blocks = parse_pattern(scope)
    return {name: _blockwise(name, s, sparsity, blocks) for name, s in scores.items()}


def _blockwise(
    name: str, scores: np.ndarray, sparsity: float, blocks: tuple[int, int] | None
) -> np.ndarray:
    """Per output row: `sparsity` of the row (blocks None), or M − N of every M in a row."""
    rows = scores.reshape(len(scores), -1)
    if blocks is None:
        return _lowest(rows, sparsity).reshape(scores.shape)
    kept, size = blocks
    if rows.shape[1] % size:
        raise UsageError(
            f"--pattern {kept}:{size}: layer '{name}' has rows of {rows.shape[1]} weights, "
            f"not a multiple of {size}",
            hint="use --pattern row",
        )
    groups = rows.reshape(-1, size)
    return _lowest(groups, 1 - kept / size).reshape(scores.shape)


def _lowest(values: np.ndarray, fraction: float) -> np.ndarray:
    """Per row of the 2-D `values`: the round(fraction · row length) lowest entries."""
    count = int(round(fraction * values.shape[1]))
    order = np.argsort(values, axis=1, kind="stable")[:, :count]
    mask = np.zeros(values.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def bias_shifts(
    weights: Mapping[str, np.ndarray],
    stats: Mapping[str, object],
    removed: Mapping[str, np.ndarray],
    *,
    joint: bool = False,
) -> dict[str, np.ndarray]:
    """The bias shift of every layer for its removed weights (independent or joint solve)."""
    solve = joint_shift if joint else independent_shift
    return {name: solve(weights[name], stats[name], removed[name]) for name in weights}


def _per_row(s0: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """S0 broadcast against a weight of shape (out, *features)."""
    return np.asarray(s0).reshape(-1, *([1] * (weight.ndim - 1)))
