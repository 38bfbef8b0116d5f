"""Change-of-basis (CoB) pruning (Ning & Rangaraju 2025; METHODS.md §1).

Per group, an orthogonal Q = blockdiag(Q_S) over the TSRA subspaces S (one block when there is
no TSRA) is read off the tap Gram by PCA: Q_S's rows are the eigenvectors of G_SS in descending
order of eigenvalue. The producers are rotated (W ← QW, b ← Qb; graph/rewrite.py) and, since every
op up to the taps commutes with Q (each op handler's `rotation`), the tap becomes ã = Q a. The
kept rotated channels are the leading principal directions, importance √λ; the consumers get
W ← W Q_Sᵀ through the correction a ≈ Mᵀ ã_S + c with M = Q[S].

Through TSRA / RMSNorm the Gram is uncentred (as the authors' code) and c = 0. On a linear chain
(nothing nonlinear between producer and tap) the PCA is centred and the mean of the dropped
directions goes into the consumer bias: c = μ − Mᵀ M μ, which makes rotation + truncation the
optimal rank-k affine approximation of the tap (Eckart–Young).

Groups that cannot be rotated (a ReLU, BatchNorm affine or MaxPool on the way) fall back, with a
note in the report, to `id`'s plan: channels chosen by interpolative decomposition of the same
Gram, the least-squares map with intercept folded into the consumers (`--threshold` sets the
count there from the channel energies ‖a_j‖₂ = √G_jj), rather than leave them uncorrected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from onnxprune.errors import UsageError
from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import top_k
from onnxprune.methods.id import InterpolativeDecomposition, lsq_corrections
from onnxprune.plan import Correction, GroupStats, Plan, TapStats


def channel_ratio_for_params(fraction: float) -> float:
    """Channel ratio p = 1 − √(1 − P) that removes about P of a conv chain's parameters.

    Parameters of a layer scale as C_in·C_out, so removing p of both sides keeps (1 − p)².
    """
    if not 0.0 <= fraction < 1.0 or math.isnan(fraction):
        raise UsageError(f"'param_ratio' must be in [0, 1); got {fraction}")
    return 1.0 - math.sqrt(1.0 - fraction)


@dataclass(frozen=True)
class ChangeOfBasis:
    """PCA rotation per subspace, folded into producer and consumers; keep the top directions.

    `threshold` (rule, t) replaces the fixed count; `rms_correction` rescales the consumers of a
    group that passes an RMSNorm for the changed divisor (METHODS.md §1.6).
    """

    threshold: tuple[str, float] | None = None
    rms_correction: bool = False
    name: str = "cob"
    needs: frozenset[str] = frozenset({"gram"})

    def plan(self, group: ChannelGroup, stats: GroupStats, keep: int, *, seed: int = 0) -> Plan:
        taps = list(stats.taps.values())
        centred = group.rotatable and not group.invariants
        gram = _pooled(taps, centred)
        if not group.rotatable:  # the report says so (unrotated_note)
            return self._unrotated(group, stats, gram, keep)
        Q, lam = block_pca(gram, group.ranges)
        kept = self._select(np.sqrt(lam), group.ranges, keep)
        scale = self._rms_scale(group, lam, kept)
        corrections = {
            tensor: _correction(Q[kept], tap, centred, scale) for tensor, tap in stats.taps.items()
        }
        info = {"rotated": 1.0, "centred": float(centred)}
        if scale != 1.0:
            info["rms_scale"] = scale
        return Plan(keep=kept, corrections=corrections, rotation=Q, info=info)

    def scores(self, group: ChannelGroup, stats: GroupStats, *, seed: int = 0) -> np.ndarray:
        """Energy of every direction the plan chooses from (the PCA eigenvalues per subspace;
        the channel energies where the group cannot rotate): the share removed is the squared
        relative error of the kept subspace."""
        gram = _pooled(list(stats.taps.values()), group.rotatable and not group.invariants)
        if not group.rotatable:
            return np.clip(np.diag(gram), 0.0, None)
        return np.clip(block_pca(gram, group.ranges)[1], 0.0, None)

    def _select(
        self, importance: np.ndarray, ranges: Sequence[tuple[int, int]], keep: int
    ) -> np.ndarray:
        if self.threshold is not None:
            return threshold_keep(importance, ranges, *self.threshold)
        return fixed_keep(importance, ranges, keep)

    def _unrotated(
        self, group: ChannelGroup, stats: GroupStats, gram: np.ndarray, keep: int
    ) -> Plan:
        """`id`'s plan (intercept on) at the width `keep` or the threshold gives; across TSRA
        subspaces, which ID would not keep ≥ 1 channel each, the energy selection per subspace
        with the least-squares map."""
        importance = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        if self.threshold is not None:
            keep = len(threshold_keep(importance, group.ranges, *self.threshold))
        if len(group.ranges) > 1:
            kept = fixed_keep(importance, group.ranges, keep)
            plan = Plan(keep=kept, corrections=lsq_corrections(stats, kept, intercept=True))
        else:
            plan = InterpolativeDecomposition(intercept=True).plan(group, stats, keep)
        return replace(plan, info={**plan.info, "rotated": 0.0})

    def _rms_scale(self, group: ChannelGroup, lam: np.ndarray, kept: np.ndarray) -> float:
        """√(C_old·E_kept / (C_new·E_all)): undoes the RMS divisor's change after pruning.

        RMSNorm divides by √(Σ h²/C); removing channels changes both the count and the energy
        (only the energy for the norms graph/layernorm.py writes, whose C stays the original).
        The energies are those of the tap (post-TSRA), a proxy for the pre-norm ones; the factor
        is exact when the removed directions carry no energy (TSRA gains are positive).
        """
        kinds = {kind for kind, _ in group.invariants}
        if not self.rms_correction or not kinds & {"rmsnorm", "rmssum"}:
            return 1.0
        total, kept_energy = float(np.sum(lam)), float(np.sum(lam[kept]))
        if total <= 0 or kept_energy <= 0:
            return 1.0
        counts = group.channels / len(kept) if "rmsnorm" in kinds else 1.0
        return math.sqrt(counts * kept_energy / total)


def unrotated_note(groups: Sequence[ChannelGroup], plans: Mapping[str, Plan]) -> tuple[str, ...]:
    """A report note naming the groups cob selected without rotation, and why (the first one)."""
    names = [g for g in groups if g.name in plans and plans[g.name].info.get("rotated") == 0.0]
    if not names:
        return ()
    first = names[0]
    return (
        f"cob: {len(names)} group(s) cannot be rotated and were pruned as by id (interpolative "
        f"decomposition, least-squares map) without rotation, e.g. '{first.name}': "
        f"{first.rotation_block}",
    )


def block_pca(gram: np.ndarray, ranges: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Q (rows: principal directions, block-diagonal on `ranges`) and λ, descending per block."""
    m = gram.shape[0]
    Q, lam = np.zeros((m, m)), np.zeros(m)
    for start, stop in ranges:
        w, V = np.linalg.eigh(gram[start:stop, start:stop])
        order = np.argsort(-w, kind="stable")
        Q[start:stop, start:stop] = V[:, order].T
        lam[start:stop] = np.clip(w[order], 0.0, None)
    return Q, lam


def fixed_keep(importance: np.ndarray, ranges: Sequence[tuple[int, int]], keep: int) -> np.ndarray:
    """`keep` channels in all, shared by the subspaces in proportion to their size (≥ 1 each)."""
    sizes = np.array([stop - start for start, stop in ranges])
    removed = len(importance) - max(keep, len(ranges))
    share = removed * sizes / sizes.sum()
    cut = np.floor(share).astype(int)
    for i in np.argsort(-(share - cut), kind="stable")[: removed - int(cut.sum())]:
        cut[i] += 1
    cut = np.minimum(cut, sizes - 1)
    chosen = [
        start + top_k(importance[start:stop], stop - start - c)
        for (start, stop), c in zip(ranges, cut, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def threshold_keep(
    importance: np.ndarray, ranges: Sequence[tuple[int, int]], rule: str, t: float
) -> np.ndarray:
    """Per subspace, drop channels whose importance is below t·max / t·mean / t·median, or
    whose z-score is below t; the most important channel of each subspace always stays."""
    chosen = []
    for start, stop in ranges:
        imp = importance[start:stop]
        if rule == "zscore":
            std = float(imp.std())
            keep = (imp - imp.mean()) >= t * std if std > 0 else np.ones(len(imp), bool)
        else:
            ref = {"max": np.max, "mean": np.mean, "median": np.median}[rule](imp)
            keep = imp >= t * ref
        keep[int(np.argmax(imp))] = True
        chosen.append(start + np.flatnonzero(keep))
    return np.sort(np.concatenate(chosen))


def _pooled(taps: Sequence[TapStats], centred: bool) -> np.ndarray:
    """The (centred) Gram of the taps, each scaled to unit trace when there are several."""
    grams = [t.gram - t.n * np.outer(t.mean, t.mean) if centred else t.gram for t in taps]
    if len(grams) == 1:
        return grams[0]
    return sum(g / max(float(np.trace(g)), 1e-300) for g in grams)


def _correction(M: np.ndarray, tap: TapStats, centred: bool, scale: float) -> Correction:
    """a ≈ Mᵀ ã_S (+ the dropped directions' mean on a linear chain), times the RMS scale."""
    c = tap.mean - M.T @ (M @ tap.mean) if centred else None
    return Correction(M * scale, c)
