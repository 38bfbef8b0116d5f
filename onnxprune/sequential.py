"""Sequential corrections: refit every tap's map on the activations the pruned model produces.

A method fits each correction a ≈ Mᵀ a_S + c (DESIGN.md §3) on the original model's activations,
all groups at once, so the errors of earlier groups reach later taps unanswered. Here the taps are
visited in topological order; at each, the pruned model (every earlier tap already refit and
folded) and the original run up to it, and M, c are refit by least squares from the pruned
model's kept activations ã_S to the original's full activation a — the kept channels too, so the
map also undoes the drift upstream (He et al. 2017, ThiNet, Kwon et al. 2022, OBC's sequential
mode). The selection stays the method's. Only Grams are held: of [ã_S, 1] and of ã_S with a.

Both models run once, cut at the taps (`graph.segments.segment_to`): after a tap is refit the
pruned model is rewritten, which changes only layers after it, so the nodes that ran stay valid.
The fit is ridge-regularised toward the method's own map, λ = RIDGE·tr(C)/k with C the
(centred) Gram of ã_S: where ã_S = a_S (ratio 0, no pruning upstream) the method's map is
recovered exactly, and a rank-deficient ã_S leaves the method's map in its null space.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from onnxprune.calib.stats import tap_rows
from onnxprune.graph.groups import ChannelGroup, Tap, tap_key
from onnxprune.graph.load import export
from onnxprune.graph.rewrite import rewrite
from onnxprune.graph.segments import segment_to, still_read
from onnxprune.methods.heads import head_features
from onnxprune.plan import Correction, Plan
from onnxprune.recalibrate import Held, run_segment

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]
RIDGE = 1e-3  # relative to the mean variance of the kept activations


@dataclass
class Site:
    """One tap to refit: where its channels lie (`tap`, `channels`, in features for a head
    group's map of every feature), the kept ones in the pruned tensor's order, and the sums."""

    group: str
    key: str
    tap: Tap
    channels: int
    keep: np.ndarray
    old: Correction
    sums: dict[str, np.ndarray | float] = field(default_factory=dict)

    def add(self, x: np.ndarray, a: np.ndarray) -> None:
        """Accumulate the rows x = ã_S (pruned) and a (original) of one batch."""
        x, a = (np.ascontiguousarray(v, dtype=np.float64) for v in (x, a))
        for name, value in (
            ("n", x.shape[0]), ("sx", x.sum(0)), ("sa", a.sum(0)), ("xx", x.T @ x),
            ("xa", x.T @ a), ("aa", float(np.sum(a * a))),
        ):  # fmt: skip
            self.sums[name] = self.sums.get(name, 0) + value


def refit(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    plans: Mapping[str, Plan],
    batches: Batches,
    *,
    free_map: bool,
    exact_borders: bool = False,
) -> tuple[dict[str, Plan], tuple[str, ...]]:
    """The plans with every correction refit sequentially, and notes for the report.

    `free_map`: M and c are refit (ID, least-squares compensation); otherwise M stays the
    method's selection and only c is refit (mean-shift compensation). A correction without c
    is refit without one. A correction folded into a recurrence stays (`_sites`)."""
    plans = dict(plans)
    sites, notes = _sites(groups, plans)
    if not sites:
        return plans, notes
    removed = _removed_features(groups, plans, {site.tap.tensor for site in sites})
    model = export(rewrite(graph, groups, plans, exact_borders=exact_borders))
    order = {name: i for i, node in enumerate(model.graph.node) for name in node.output}
    tensors = sorted({site.tap.tensor for site in sites}, key=order.__getitem__)
    original = export(graph)
    drift, fitted = [], []
    with tempfile.TemporaryDirectory(prefix="onnxprune-sequential-") as folder:
        runs = [_Run(batches(), Path(folder) / side) for side in ("original", "pruned")]
        for index, tensor in enumerate(tensors):
            later = tensors[index + 1 :]
            runs[0].advance(original, tensor, later)
            runs[1].advance(model, tensor, later)
            here = [site for site in sites if site.tap.tensor == tensor]
            _accumulate(here, runs[0].values, runs[1].values, tensor, removed[tensor])
            for site in here:
                correction, before, after = _solve(site, free_map)
                plans[site.group] = _with_correction(plans[site.group], site.key, correction,
                                                     before, after)  # fmt: skip
                drift.append(before)
                fitted.append(after)
            if later:
                model = export(rewrite(graph, groups, plans, exact_borders=exact_borders))
            for run, current in zip(runs, (original, model), strict=True):
                run.forget(current, later)
    what = "maps and intercepts" if free_map else "intercepts"
    notes += (
        f"sequential fit: {what} at {len(fitted)} taps refit on the pruned model's activations "
        f"(mean relative error there {np.mean(drift):.3f} -> {np.mean(fitted):.3f})",
    )
    return plans, notes


class _Run:
    """One model run tap by tap over the batches: the values the rest still reads, and the
    names of the nodes that ran."""

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]], folder: Path) -> None:
        folder.mkdir()
        self.values = Held([dict(feeds) for feeds in batches], folder)
        self.done: set[str] = set()

    def advance(self, model: onnx.ModelProto, end: str, later: Iterable[str]) -> None:
        """Run what `end` needs and has not run, holding every later tap it makes."""
        segment = segment_to(model, end, self.done, later)
        if segment is not None:
            run_segment(model, segment, self.values)
            self.done |= {model.graph.node[i].name for i in segment.nodes}

    def forget(self, model: onnx.ModelProto, later: Iterable[str]) -> None:
        """Drop the values that neither a node still to run nor a later tap reads."""
        self.values.keep(still_read(model, self.done) | set(later))


def _sites(
    groups: tuple[ChannelGroup, ...], plans: Mapping[str, Plan]
) -> tuple[list[Site], tuple[str, ...]]:
    """Every corrected tap of a planned group, and a note for the taps left as they are: those
    whose correction is folded into a recurrence (an LSTM/GRU/RNN reading its own hidden
    state), where refolding the map would change the activations it is fit on."""
    sites, recurrent = [], []
    for group in (g for g in groups if g.name in plans and g.prunable):
        plan = plans[group.name]
        loops = {tap_key(e.tap, e.offset) for e in group.edits if e.role == "hidden" and e.tap}
        for tap in group.taps:
            key, old = tap.key, plan.corrections.get(tap.key)
            if old is None or key in loops:
                recurrent += [key] if old is not None else []
                continue
            keep, channels = np.asarray(plan.keep), group.channels
            if np.shape(old.M)[1] != channels:  # a head group's map of every feature
                tap = replace(tap, offset=tap.offset * tap.spatial, spatial=1)
                keep, channels = head_features(keep, group.head_dim), channels * group.head_dim
            sites.append(Site(group.name, key, tap, channels, keep, old))
    notes = ()
    if recurrent:
        notes = (
            f"sequential fit: {len(recurrent)} tap(s) read by a recurrence keep the method's "
            f"map (refolding it changes the hidden states it is fit on), e.g. '{recurrent[0]}'",
        )
    return sites, notes


def _removed_features(
    groups: tuple[ChannelGroup, ...], plans: Mapping[str, Plan], tensors: set[str]
) -> dict[str, np.ndarray]:
    """Per tensor, the original feature indices (along the tap axis) that pruning removes."""
    removed: dict[str, set[int]] = {tensor: set() for tensor in tensors}
    for group in (g for g in groups if g.name in plans and g.prunable):
        gone = np.setdiff1d(np.arange(group.channels), plans[group.name].keep)
        for tap in (t for t in group.taps if t.tensor in removed):
            channels = tap.offset + tap.stride * gone
            features = channels[:, None] * tap.spatial + np.arange(tap.spatial)
            removed[tap.tensor].update(features.reshape(-1).tolist())
    return {tensor: np.array(sorted(found), dtype=np.intp) for tensor, found in removed.items()}


def _accumulate(
    sites: list[Site], original: Held, pruned: Held, tensor: str, removed: np.ndarray
) -> None:
    """Add every batch's rows of `tensor` in both models to the sums of its sites."""
    with threadpool_limits(1, "blas"):  # as in calib/stats.py: spinning BLAS threads
        for index in range(len(original)):
            a = original.load(index, [tensor])[tensor]
            x = pruned.load(index, [tensor])[tensor]
            for site in sites:
                rows = _pruned_rows(x, a.shape[site.tap.axis], site, removed)
                site.add(rows, tap_rows(a, site.tap, site.channels))


def _pruned_rows(value: np.ndarray, width: int, site: Site, removed: np.ndarray) -> np.ndarray:
    """The site's kept channels in the pruned tensor, laid out as `tap_rows` lays out the
    original's: rows samples × positions, columns in the order of M's rows."""
    tap, k = site.tap, len(site.keep)
    kept = np.setdiff1d(np.arange(width), removed)
    if value.shape[tap.axis] != kept.size:
        raise ValueError(
            f"tap '{tap.tensor}' has {value.shape[tap.axis]} features after pruning, "
            f"expected {kept.size}"
        )
    if tap.stride == 1:  # the kept channels lie together, in the plan's order
        start = np.searchsorted(kept, tap.offset * tap.spatial)
        columns = start + np.arange(k * tap.spatial)
    else:  # behind a shuffle: in their original order (ascending keep)
        wanted = (tap.offset + tap.stride * site.keep)[:, None] * tap.spatial
        columns = np.searchsorted(kept, (wanted + np.arange(tap.spatial)).reshape(-1))
    moved = np.moveaxis(value, tap.axis, -1)[..., columns]
    moved = moved.reshape(*moved.shape[:-1], k, tap.spatial)
    return np.moveaxis(moved, -2, -1).reshape(-1, k)


def _solve(site: Site, free_map: bool) -> tuple[Correction, float, float]:
    """The refit correction and the relative error at the tap before and after.

    With an intercept, on the centred sums C: (C_xx + λI) M = C_xa + λ M₀ and c = μ_a − Mᵀμ_x;
    without, the same on the raw second moments. Without `free_map`, M = M₀ and only c moves.
    """
    s = site.sums
    n = float(s["n"])
    mx, ma = s["sx"] / n, s["sa"] / n
    M0 = np.asarray(site.old.M, dtype=np.float64)
    intercept = site.old.c is not None
    xx, xa = s["xx"] / n, s["xa"] / n
    if intercept:
        xx, xa = xx - np.outer(mx, mx), xa - np.outer(mx, ma)
    M = M0
    if free_map:
        lam = RIDGE * max(float(np.trace(xx)), 0.0) / max(len(mx), 1)
        A = xx + lam * np.eye(len(mx))
        try:
            M = np.linalg.solve(A, xa + lam * M0)
        except np.linalg.LinAlgError:
            M = np.linalg.lstsq(A, xa + lam * M0, rcond=None)[0]
    c = ma - M.T @ mx if intercept else None
    before = _error(s, M0, None if site.old.c is None else np.asarray(site.old.c, np.float64))
    return Correction(M, c), before, _error(s, M, c)


def _error(s: dict, M: np.ndarray, c: np.ndarray | None) -> float:
    """‖a − ã_S M − 1cᵀ‖_F / ‖a‖_F from the sums."""
    sq = s["aa"] - 2 * np.sum(M * s["xa"]) + np.sum(M * (s["xx"] @ M))
    if c is not None:
        sq += -2 * c @ s["sa"] + 2 * c @ (M.T @ s["sx"]) + s["n"] * c @ c
    return float(np.sqrt(max(sq, 0.0) / s["aa"])) if s["aa"] > 0 else 0.0


def _with_correction(
    plan: Plan, key: str, correction: Correction, before: float, after: float
) -> Plan:
    """`plan` with the refit correction at `key`; its info keeps the largest errors at its taps
    on the pruned activations, of the method's map (`drift`) and of the refit one (`seq`)."""
    info = dict(plan.info)
    info["drift"] = max(info.get("drift", 0.0), before)
    info["seq"] = max(info.get("seq", 0.0), after)
    return replace(plan, corrections={**plan.corrections, key: correction}, info=info)
