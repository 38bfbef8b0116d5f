"""Sequential corrections: refit every tap's map on the activations the pruned model produces.

A method fits each correction a ≈ Mᵀ a_S + c (DESIGN.md §3) on the original model's activations,
all groups at once, so the errors of earlier groups reach later taps unanswered. Here the taps are
visited in topological order; at each, the pruned model (every earlier tap already refit and
folded) and the original run up to it, and the removed channels' reconstruction in M, c is
refit by least squares from the pruned model's kept activations ã_S to the original's activation
a (He et al. 2017, ThiNet, Kwon et al. 2022, OBC's sequential mode). The kept channels pass
through as the method has them: refit too, regressed on their own drifted values, they shrink —
less error at the tap, more at the output (docs/METHODS.md §9). The selection stays the
method's. Only Grams are held: of [ã_S, 1], of ã_S with a and of a.

Both models run once, cut at the taps (`graph.segments.segment_to`): after a tap is refit only
the layers reading it are refolded (`graph.refold`), which changes only layers after it, so the
nodes that ran stay valid.
The fit is ridge-regularised toward the method's own map (λ = ρ·tr(C)/k, C the centred Gram of
ã_S), so where ã_S = a_S (ratio 0, nothing pruned upstream) the method's map is recovered
exactly; ρ, or keeping the method's map, is chosen per tap on two folds of the samples
(docs/METHODS.md §9).
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.calib.data import in_parts, run_samples
from onnxprune.calib.row_mask import row_keep
from onnxprune.calib.stats import channel_view, fold_units, one_blas_thread
from onnxprune.graph.groups import ChannelGroup, Tap, tap_key
from onnxprune.graph.load import drop_mapped_pages, export
from onnxprune.graph.refold import refold
from onnxprune.graph.rewrite import rewrite
from onnxprune.graph.segments import segment_to, still_read
from onnxprune.methods.heads import head_features
from onnxprune.methods.linalg import least_squares_map
from onnxprune.plan import Correction, Plan
from onnxprune.recalibrate import Held, run_segment

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]


@dataclass
class Site:
    """One tap to refit: where its channels lie (`tap`, `channels`, in features for a head
    group's map of every feature), the kept ones in the pruned tensor's order, and the sums of
    the even- and the odd-numbered samples (`folds`)."""

    group: str
    key: str
    tap: Tap
    channels: int
    keep: np.ndarray
    old: Correction
    folds: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))
    seen: int = 0
    pending: tuple[list, list] = field(default_factory=lambda: ([], []))  # per fold: (x, a)

    def add(
        self, x: np.ndarray, a: np.ndarray, samples: int, keep: np.ndarray | None = None
    ) -> None:
        """Accumulate the rows x = ã_S (pruned) and a (original) of `samples` fold units
        (`calib.stats.fold_units`: samples, or a whole run); with `keep` (a bool per row,
        `calib.row_mask.row_keep`), only the rows it marks.

        A fold's rows are summed once a quarter as many as there are channels have come (as
        `calib.stats.TapAccumulator` does; `flush` sums the rest): each sum adds matrices of up
        to width² entries, and a ViT's runs of one sample (197 rows at a 3072-wide tap) spent
        more time adding them than computing them."""
        x, a = (v.reshape(samples, -1, v.shape[-1]) for v in (x, a))
        rows = np.ones(x.shape[:2], dtype=bool) if keep is None else keep.reshape(x.shape[:2])
        for fold, pending in enumerate(self.pending):
            first = (fold - self.seen) % 2  # the fold of a sample is the parity of its number
            chosen = rows[first::2]
            if chosen.any():
                pending.append((x[first::2][chosen], a[first::2][chosen]))  # copies
            if sum(len(p[0]) for p in pending) >= self.channels // 4:
                self._sum(fold)
        self.seen += samples

    def flush(self) -> None:
        """Sum the rows still pending; a fold no row reached gets zero sums."""
        for fold, sums in enumerate(self.folds):
            self._sum(fold)
            if not sums:
                _add(sums, np.zeros((0, len(self.keep))), np.zeros((0, self.channels)))

    def _sum(self, fold: int) -> None:
        pending = self.pending[fold]
        if pending:
            x, a = (np.concatenate(parts, dtype=np.float64) for parts in zip(*pending, strict=True))
            _add(self.folds[fold], x, a)
            pending.clear()


def _add(sums: dict, x: np.ndarray, a: np.ndarray) -> None:
    """Add the rows' sums and products to `sums`, in place after the first."""
    for name, value in (
        ("n", x.shape[0]), ("sx", x.sum(0)), ("sa", a.sum(0)), ("xx", x.T @ x),
        ("xa", x.T @ a), ("AA", a.T @ a),
    ):  # fmt: skip
        if name in sums:
            sums[name] += value
        else:
            sums[name] = value


def refit(
    graph: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    plans: Mapping[str, Plan],
    batches: Batches,
    *,
    free_map: bool,
    exact_borders: bool = False,
    row_mask: str | None = None,
) -> tuple[dict[str, Plan], tuple[str, ...]]:
    """The plans with every correction refit sequentially, and notes for the report.

    `free_map`: M and c are refit (ID, least-squares compensation); otherwise M stays the
    method's selection and only c is refit (mean-shift compensation). A correction without c
    is refit without one. A correction folded into a recurrence stays (`_sites`). `row_mask`:
    the input whose zero entries mark token rows the sums leave out (`calib.row_mask`)."""
    plans = dict(plans)
    sites, notes = _sites(groups, plans)
    if not sites:
        return plans, notes
    model = export(rewrite(graph, groups, plans, exact_borders=exact_borders))
    drop_mapped_pages(graph)  # the rewrite read the weights it selected from
    gc.collect()  # the rewritten graph is a reference cycle holding weight copies
    chosen = chosen_rows(model)
    unpaired = [site.key for site in sites if site.tap.tensor in chosen]
    if unpaired:
        sites = [site for site in sites if site.tap.tensor not in chosen]
        notes += (
            f"sequential fit: {len(unpaired)} tap(s) whose rows the data chooses (after "
            "NonZero, NonMaxSuppression or TopK: a detector's region features) keep the "
            "method's map: the pruned and the original model choose other rows, which cannot "
            f"be paired, e.g. '{unpaired[0]}'",
        )
    if not sites:
        return plans, notes
    removed = _removed_features(groups, plans, {site.tap.tensor for site in sites})
    copies = _copies(groups, sites)
    tensors = _visits(model, sites, copies)
    waiting: dict[str, Site] = {}
    original = export(graph)
    drift, fitted = [], []
    with tempfile.TemporaryDirectory(prefix="onnxprune-sequential-") as folder:
        size = run_samples(original)  # short runs: ORT's arena and caches (calib/data.py)
        runs = [
            _Run(in_parts(batches(), size), Path(folder) / side, row_mask)
            for side in ("original", "pruned")
        ]
        for index, tensor in enumerate(tensors):
            later = tensors[index + 1 :]
            runs[0].advance(original, tensor, later)
            runs[1].advance(model, tensor, later)
            here = [site for site in sites if site.tap.tensor == tensor]
            _accumulate(here, runs, tensor, removed[tensor])
            waiting.update((site.key, site) for site in here)
            ready = [keys for keys in dict.fromkeys(copies[s.key] for s in here)
                     if all(key in waiting for key in keys)]  # fmt: skip
            for keys in ready:
                together = [waiting.pop(key) for key in keys]
                with one_blas_thread():
                    correction, before, after, ridge = _solve(_pooled(together), free_map)
                fit = (correction, before, after, ridge)
                for site in together:
                    plans[site.group] = _with_correction(plans[site.group], site.key, *fit)
                    site.folds = ({}, {})  # spent: float64 sums up to width² each, not held on
                drift += [before] * len(together)  # each copy's tap counts
                fitted += [after] * len(together)
            keys = {key for ready_keys in ready for key in ready_keys}
            if not keys:
                continue  # a copy of a shared weight's tap waits for the others
            # only the layers reading them change
            if later and not refold(model, graph, groups, plans, keys, exact_borders=exact_borders):
                model = export(rewrite(graph, groups, plans, exact_borders=exact_borders))
                drop_mapped_pages(graph)
                gc.collect()  # the rewritten graphs are reference cycles holding weight copies
            for run, current in zip(runs, (original, model), strict=True):
                run.forget(current, later)
    what = "maps and intercepts" if free_map else "intercepts"
    notes += (
        f"sequential fit: {what} at {len(fitted)} taps refit on the pruned model's activations "
        f"(mean relative error there {np.mean(drift):.3f} -> {np.mean(fitted):.3f})",
    )
    return plans, notes


def _copies(groups: tuple[ChannelGroup, ...], sites: list[Site]) -> dict[str, tuple[str, ...]]:
    """Per site key, the keys of the sites that are copies of its tap (`ChannelGroup.pooled`:
    a shared weight reads them at every pyramid level), itself included: they are refit as
    one, on their rows together, so the copies keep one map."""
    have = {site.key for site in sites}
    copies = {key: (key,) for key in have}
    for keys in (ks for g in groups for ks in g.pooled):
        present = tuple(key for key in keys if key in have)
        copies.update(dict.fromkeys(present, present))
    return copies


def _visits(
    model: onnx.ModelProto, sites: list[Site], copies: Mapping[str, tuple[str, ...]]
) -> list[str]:
    """The tap tensors in topological order, except that the copies of one tap come one after
    another, at the place of the first: nothing downstream of a copy is refit before the
    copies' one map is. (A copy computed from another, RetinaNet's P6 from P5, has run by then
    with the earlier map upstream: the rows downstream of it are the earlier map's.)"""
    order = {name: i for i, node in enumerate(model.graph.node) for name in node.output}
    tensor = {site.key: site.tap.tensor for site in sites}
    first = {site.tap.tensor: order[site.tap.tensor] for site in sites}
    for site in sites:  # a tensor holding taps of several pools goes with its earliest
        here = min(order[tensor[key]] for key in copies[site.key])
        first[site.tap.tensor] = min(first[site.tap.tensor], here)
    return sorted(first, key=lambda t: (first[t], order[t]))


def _pooled(sites: list[Site]) -> Site:
    """The first site with the sums of every site's rows, fold by fold."""
    if len(sites) == 1:
        return sites[0]
    folds = tuple(
        {name: sum(fold[name] for fold in parts) for name in parts[0]}
        for parts in zip(*(site.folds for site in sites), strict=True)
    )
    return replace(sites[0], folds=folds)


ROW_CHOOSERS = frozenset({"NonZero", "NonMaxSuppression", "TopK"})


def chosen_rows(model: onnx.ModelProto) -> set[str]:
    """The tensors of `model` computed from rows or positions that the data chooses (a
    ROW_CHOOSERS output, and everything computed from it but shapes): a detector's proposals
    and the region features pooled at them. Their rows in two models are not paired."""
    chosen: set[str] = set()
    for node in model.graph.node:  # in topological order, as ONNX requires
        if node.op_type in ROW_CHOOSERS or (
            node.op_type not in ("Shape", "Size") and chosen.intersection(node.input)
        ):
            chosen.update(node.output)
    return chosen


HELD_BYTES = 64 << 20  # per model: the two runs' borders spill to files past it (peak RSS)


class _Run:
    """One model run tap by tap over the batches: the values the rest still reads, and the
    names of the nodes that ran."""

    def __init__(
        self, batches: Iterable[Mapping[str, np.ndarray]], folder: Path, row_mask: str | None
    ) -> None:
        folder.mkdir()
        feeds = [dict(f) for f in batches]
        self.samples = [len(next(iter(f.values()))) for f in feeds]  # per batch, for the folds
        self.masks = [{row_mask: f[row_mask]} if row_mask else {} for f in feeds]  # per batch
        self.row_mask = row_mask
        self.values = Held(feeds, folder, HELD_BYTES)
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
                keep = head_features(keep, group.feature_dim)
                channels *= group.feature_dim
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


def _accumulate(sites: list[Site], runs: list[_Run], tensor: str, removed: np.ndarray) -> None:
    """Add every batch's rows of `tensor` in both models (`runs`: original, pruned) to the sums
    of its sites."""
    original, pruned = (run.values for run in runs)
    with one_blas_thread():
        for index, samples in enumerate(runs[0].samples):
            a = original.load(index, [tensor])[tensor]
            x = pruned.load(index, [tensor])[tensor]
            units = fold_units(len(a), samples)
            for site in sites:
                rows = _pruned_rows(x, a.shape[site.tap.axis], site, removed)
                view = channel_view(a, site.tap, site.channels)
                keep = row_keep(view, runs[0].masks[index], runs[0].row_mask)
                site.add(rows, view.reshape(-1, site.channels), units, keep)
    for site in sites:
        site.flush()


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


def _solve(site: Site, free_map: bool) -> tuple[Correction, float, float, float | None]:
    """The refit correction, the relative error at the tap of the method's map and of the
    refit one, and the ridge chosen (ρ; None where the method's M is kept).

    Without `free_map` only c is refit. With it the candidates are: the method's map, its M
    with c refit, and the ridge fits (C_xx + λI) M = C_xa + λ M₀, c = μ_a − Mᵀμ_x (centred sums
    C; without an intercept the raw second moments), λ = ρ·tr(C_xx)/k for every ρ in RIDGES;
    in every one the kept channels' columns stay the method's (they pass through: regressed on
    their own drifted values they shrink, which lowers the error at the tap but compounds
    downstream — docs/METHODS.md §9), so only the removed channels' reconstruction is refit.
    The choice is made on two folds of the samples: on each, the one-shot map is fitted as the
    method fits it (least squares from the original's kept channels) and every candidate from
    it; the candidate with the least error on the other fold is then fitted on both. Where a
    fold has fewer than MIN_ROWS rows per kept channel, M stays the method's (the two-fold
    estimate is too noisy there: MobileNetV3's classifier taps, one row per image)."""
    total = {name: site.folds[0][name] + site.folds[1][name] for name in site.folds[0]}
    method = (np.asarray(site.old.M, np.float64), None if site.old.c is None else site.old.c)
    choice, fixed = np.inf, (site.keep if free_map else None)
    rows = min(fold.get("n", 0) for fold in site.folds)
    if rows > 0 and free_map:
        # a map fitted on fewer rows than MIN_ROWS per kept channel and fold is not trusted
        enough = rows >= MIN_ROWS * len(site.keep)
        candidates = [None, np.inf, *(RIDGES if enough else ())]
        fits = [_fits(fold, _one_shot(site, fold), candidates, fixed) for fold in site.folds]
        free = np.setdiff1d(np.arange(site.channels), fixed)  # the kept columns are the same
        held_out = [  # in every candidate, so only the removed ones are compared
            _squares(site.folds[1], *fits[0][i], free) + _squares(site.folds[0], *fits[1][i], free)
            for i in range(len(candidates))
        ]
        choice = candidates[int(np.argmin(held_out))]
    M, c = _fits(total, method, [choice], fixed)[0]
    scale = max(float(np.trace(total["AA"])), 1e-300)
    before = np.sqrt(_squares(total, *method) / scale)
    ridge = None if choice is None or choice == np.inf else choice
    return Correction(M, c), before, np.sqrt(_squares(total, M, c) / scale), ridge


RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ρ: λ = ρ·tr(C)/k, the mean variance of ã_S
MIN_ROWS = 2  # rows (samples × positions) per kept channel in each fold to refit M at all


def _one_shot(site: Site, sums: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """The map the method folds, fitted on `sums` alone: least squares (affine where the
    method's has an intercept) from the original's kept channels, rows in the plan's order."""
    intercept = site.old.c is not None
    order = np.argsort(site.keep, kind="stable")
    n = float(sums["n"])
    M, c = least_squares_map(sums["AA"], sums["sa"] / n, n, site.keep, intercept=intercept)
    rows = np.empty_like(order)
    rows[order] = np.arange(order.size)  # M's rows follow ascending keep; the plan's may not
    return M[rows], (c if intercept else None)


def _fits(
    sums: dict,
    prior: tuple[np.ndarray, np.ndarray | None],
    ridges: list[float | None],
    fixed: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(M, c) fitted on `sums` for every entry of `ridges`: None keeps `prior` (M₀, c₀), inf
    keeps M₀ and refits c, a number ρ is the ridge fit toward M₀ with λ = ρ·tr(C)/k. The
    columns `fixed` keep M₀'s and c₀'s entries in every fit (a column's fit is independent of
    the others', so this is the fit of the rest alone)."""
    M0, c0 = prior
    free = None if fixed is None else np.setdiff1d(np.arange(M0.shape[1]), fixed)
    n = float(sums["n"])
    mx, ma = sums["sx"] / n, sums["sa"] / n
    columns = slice(None) if free is None else free  # xa is read at these columns only
    xx, xa = sums["xx"] / n, sums["xa"][:, columns] / n
    if c0 is not None:
        xx, xa = xx - np.outer(mx, mx), xa - np.outer(mx, ma[columns])
    if any(r is not None and r != np.inf for r in ridges):  # one eigendecomposition for all λ
        values, vectors = np.linalg.eigh(0.5 * (xx + xx.T))
        base = max(float(np.trace(xx)), 1e-300) / max(len(mx), 1)
    out = []
    for ridge in ridges:
        if ridge is None:
            out.append((M0, None if c0 is None else np.asarray(c0, np.float64)))
            continue
        M = M0
        if ridge != np.inf:  # only the columns not fixed: a 3072-wide FFN tap keeps 3/4 of them
            lam = ridge * base
            rhs = xa + lam * M0[:, columns]
            fit = vectors @ ((vectors.T @ rhs) / (np.maximum(values, 0) + lam)[:, None])
            if free is None:
                M = fit
            else:
                M = M0.copy()
                M[:, free] = fit
        c = None if c0 is None else ma - M.T @ mx
        if fixed is not None and c is not None:
            c[fixed] = c0[fixed]
        out.append((M, c))
    return out


def _squares(
    s: dict, M: np.ndarray, c: np.ndarray | None, columns: np.ndarray | None = None
) -> float:
    """‖a − ã_S M − 1cᵀ‖²_F from the sums; with `columns`, of those columns of a only."""
    aa, xa, sa = np.diagonal(s["AA"]), s["xa"], s["sa"]
    if columns is not None:
        aa, xa, sa, M = aa[columns], xa[:, columns], sa[columns], M[:, columns]
        c = None if c is None else c[columns]
    sq = aa.sum() - 2 * np.sum(M * xa) + np.sum(M * (s["xx"] @ M))
    if c is not None:
        sq += -2 * c @ sa + 2 * c @ (M.T @ s["sx"]) + s["n"] * c @ c
    return float(max(sq, 0.0))


def _with_correction(
    plan: Plan, key: str, correction: Correction, before: float, after: float, ridge: float | None
) -> Plan:
    """`plan` with the refit correction at `key`; its info keeps the largest errors at its taps
    on the pruned activations, of the method's map (`drift`) and of the refit one (`seq`), and
    the largest ridge ρ chosen (`ridge`; absent where every tap kept the method's M)."""
    info = dict(plan.info)
    info["drift"] = max(info.get("drift", 0.0), before)
    info["seq"] = max(info.get("seq", 0.0), after)
    if ridge is not None:
        info["ridge"] = max(info.get("ridge", 0.0), ridge)
    return replace(plan, corrections={**plan.corrections, key: correction}, info=info)
