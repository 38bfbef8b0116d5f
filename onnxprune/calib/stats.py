"""Streamed activation statistics at the taps, through ONNX Runtime (DESIGN.md §4).

Only the tap tensors are added as graph outputs (exposing every conv output blocks ORT's fusions).
Per batch and tap, the channels are laid out as rows = samples × positions and accumulated in
float64 into n, Σa, Σ|a| and the Gram Σ aaᵀ: memory O(channels²) whatever the number of samples.
Each tap is read through an Identity copy, so ORT's optimizer cannot fuse the tensor away.

The Gram update runs on a contiguous float64 copy under a one-thread BLAS limit: on a machine whose
cores are busy, OpenBLAS's threads spin-wait for each other and the same update took up to 25×
longer, the whole statistics pass 4–20× (benchmarks/gram_update.py, docs/RESULTS.md). Meanwhile
the next part of the data runs through ONNX Runtime in a thread (calib/prefetch.py).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from threadpoolctl import threadpool_limits

from onnxprune.calib.data import batch_first, batch_for, in_batches
from onnxprune.calib.prefetch import prefetched
from onnxprune.calib.row_mask import row_keep
from onnxprune.errors import ModelRunError, VerificationError, first_line
from onnxprune.graph.groups import Tap
from onnxprune.graph.load import copy_model
from onnxprune.measure.verify import session_for
from onnxprune.plan import TapStats
from onnxprune.threads import thread_map

Moments = tuple[np.ndarray, np.ndarray]  # per channel: mean, (population) variance


def one_blas_thread() -> threadpool_limits:
    """A limit of one thread for every BLAS library, scipy's LAPACK included: the limit covers
    only the libraries loaded when it starts, and scipy (its own OpenBLAS, imported lazily by
    the solvers) otherwise ran its solves on spinning threads (ResNet-50's planning: 1.6 CPU s
    instead of 0.4)."""
    import scipy.linalg  # noqa: F401

    return threadpool_limits(1, "blas")


class TapAccumulator:
    """Running n, Σa, Σ|a| and Σaaᵀ of one tap's channels (and, with `qr`, the R factor of the
    stacked rows, re-reduced every batch: the paper's blocked QR in O(channels²) memory).

    With `folds` = F > 1, sample i's rows go to fold i mod F (samples counted across batches),
    each fold with its own statistics, and the totals are their sums: cross-validation of a
    map fitted on some folds and judged on the others (methods/heads.py), at no extra cost.
    """

    def __init__(self, channels: int, *, qr: bool = False, folds: int = 0) -> None:
        self.r_factor = np.zeros((0, channels)) if qr else None
        self.n = 0
        self.sum = np.zeros(channels)
        self.abs_sum = np.zeros(channels)
        self.gram = np.zeros((channels, channels))
        self.folds = [TapAccumulator(channels) for _ in range(folds if folds > 1 else 0)]
        self.samples = 0
        self.pending: list[np.ndarray] = []  # rows not yet in the sums (`add`)
        self.pending_rows = 0

    def add(self, rows: np.ndarray, samples: int = 1, keep: np.ndarray | None = None) -> None:
        """Add the rows of `samples` samples, sample by sample (`tap_rows`' order); with `keep`
        (a bool per row, `row_keep`), only the rows it marks.

        Rows are summed once a quarter as many as there are channels have come: each update
        adds a channels² Gram, so updating with a few rows at a time (a ViT token sequence,
        ResNet-50's 7×7 maps) spent its time adding Grams, not computing them (3072 channels,
        16 samples of 197 rows: 2.1 CPU s one sample at a time, 0.85 s four at a time). The
        rows held meanwhile are a copy (not the run's arrays), under 1/8 of the Gram's bytes."""
        if self.folds:
            if samples:
                self._add_to_folds(rows, samples, keep)
            return
        if keep is not None:
            rows = rows[keep]
        self.pending.append(rows)
        self.pending_rows += rows.shape[0]
        if self.pending_rows < self.gram.shape[0] // 4:
            self.pending[-1] = np.array(rows)
            return
        self._update(np.concatenate(self.pending, dtype=np.float64))

    def _update(self, rows: np.ndarray) -> None:
        self.pending, self.pending_rows = [], 0
        self.n += rows.shape[0]
        self.sum += rows.sum(axis=0)
        self.abs_sum += np.abs(rows).sum(axis=0)
        self.gram += rows.T @ rows  # numpy hands a contiguous AᵀA to BLAS syrk
        if self.r_factor is not None:
            self.r_factor = np.linalg.qr(np.vstack([self.r_factor, rows]), mode="r")

    def result(self) -> TapStats:
        """The statistics, holding the accumulator's own arrays (no copies: a 3072-wide Gram is
        75 MB, and each copy's fresh pages cost more than the copy); the accumulator is spent."""
        if self.pending:
            self._update(np.concatenate(self.pending, dtype=np.float64))
        if self.folds:
            folds = tuple(fold.result() for fold in self.folds)
            total = [sum(getattr(f, name) for f in folds) for name in ("sum", "gram", "abs_sum")]
            return TapStats(sum(f.n for f in folds), *total, folds=folds)
        return TapStats(self.n, self.sum, self.gram, self.abs_sum, self.r_factor)

    def _add_to_folds(self, rows: np.ndarray, samples: int, keep: np.ndarray | None) -> None:
        sample_fold = (self.samples + np.arange(samples)) % len(self.folds)
        fold_of = np.repeat(sample_fold, rows.shape[0] // samples)
        self.samples += samples
        for f, fold in enumerate(self.folds):
            chosen = fold_of == f if keep is None else (fold_of == f) & keep
            if chosen.any():
                fold.add(rows[chosen])


def summed(parts: Sequence[TapStats]) -> TapStats:
    """The statistics of the rows of all `parts` together (the copies of one tap that a shared
    weight reads at every pyramid level, graph/shared.py): sums add, R factors are stacked and
    reduced again, folds add fold by fold."""
    first = parts[0]
    r_factor = None
    if all(p.r_factor is not None for p in parts):
        r_factor = np.linalg.qr(np.vstack([p.r_factor for p in parts]), mode="r")
    folds = ()
    if all(len(p.folds) == len(first.folds) for p in parts):
        folds = tuple(summed(fold) for fold in zip(*(p.folds for p in parts), strict=True))
    return TapStats(
        sum(p.n for p in parts),
        sum(p.sum for p in parts),
        sum(p.gram for p in parts),
        sum(p.abs_sum for p in parts),
        r_factor,
        folds,
    )


def tap_rows(array: np.ndarray, tap: Tap, channels: int) -> np.ndarray:
    """The tap's channels of `array` as a (samples × positions, channels) matrix."""
    return channel_view(array, tap, channels).reshape(-1, channels)


def channel_view(array: np.ndarray, tap: Tap, channels: int) -> np.ndarray:
    """The tap's channels of `array` as (samples, positions, channels).

    Positions are every index other than the sample and channel axes, including the `spatial`
    features a flattened channel occupies. Behind a channel shuffle the channels lie every
    `tap.stride` entries; with `tap.select`, only that entry of its axis is read.
    """
    if tap.select is not None:
        axis, index = tap.select
        array = np.take(array, [index], axis=axis)
    moved = np.moveaxis(array, tap.axis, -1)
    total = moved.shape[-1] // tap.spatial
    moved = moved.reshape(*moved.shape[:-1], total, tap.spatial)
    end = tap.offset + tap.stride * (channels - 1) + 1
    moved = np.moveaxis(moved, -2, -1)[..., tap.offset : end : tap.stride]
    return moved.reshape(moved.shape[0], -1, channels)


def collect(
    model: onnx.ModelProto,
    taps: Sequence[tuple[Tap, int]],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    qr: bool = False,
    row_mask: str | None = None,
) -> dict[Tap, TapStats]:
    """Run `batches` through `model` in ORT and return the statistics of every (tap, channels)
    (`row_mask` as in `collect_all`)."""
    return collect_all(model, taps, {}, batches, qr=qr, row_mask=row_mask).stats


def channel_moments(
    model: onnx.ModelProto,
    tensors: Mapping[str, int],
    batches: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, Moments]:
    """Per-channel mean and variance of each tensor (name → channel axis) over all positions."""
    return collect_all(model, [], tensors, batches).moments


class Collected(NamedTuple):
    """What one statistics pass read: per (tap, channels) statistics, per tensor moments, and
    the model's outputs on the `reference` feeds (empty when none were given)."""

    stats: dict[Tap, TapStats]
    moments: dict[str, Moments]
    outputs: dict[str, np.ndarray]


def collect_all(
    model: onnx.ModelProto,
    taps: Sequence[tuple[Tap, int]],
    tensors: Mapping[str, int],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    qr: bool = False,
    reference: Mapping[str, np.ndarray] | None = None,
    folded: Collection[Tap] = (),
    row_mask: str | None = None,
) -> Collected:
    """`collect` and `channel_moments` from one ORT pass: the statistics of every (tap,
    channels), and the per-channel mean and variance of every tensor (name → channel axis).

    With `reference` feeds (verification samples), the same session also computes the model's
    outputs on them, so that verification need not build a session of the model and run it
    again (`measure.verify.verify`); they add nothing to the statistics. Where they are the
    first samples of `batches` (verification on fit samples), they come from the statistics
    runs themselves; the others run after them (`Reference`). Only where every output has its
    samples on axis 0 (`batch_first`): elsewhere no outputs are returned and verification runs
    the model itself. The taps in `folded` also get the statistics of the even and the odd
    samples (`TapStats.folds`; `fold_units`). With `row_mask`, the name of a graph input
    (samples, positions) such as an attention mask, a tap's rows whose mask entry is 0 (padding
    tokens) are left out of its statistics (`row_keep`); the moments keep every position."""
    if not taps and not tensors:
        return Collected({}, {}, {})
    names = sorted({tap.tensor for tap, _ in taps} | set(tensors))
    session, aliases = tapped_session(model, names)
    usable = reference if reference and batch_first(model) else {}
    outputs = Reference(usable, [o.name for o in model.graph.output])
    fetch = (aliases, names) if outputs.done else outputs.fetch(aliases, names)
    accumulators = {
        tap: TapAccumulator(channels, qr=qr, folds=2 if tap in folded else 0)
        for tap, channels in taps
    }
    moments = {name: ChannelMoments(axis) for name, axis in tensors.items()}
    with one_blas_thread():
        for part, values in prefetched(tap_runs(session, *fetch, batches)):
            add = partial(_add_run, part, values, row_mask)
            thread_map(add, zip(taps, accumulators.values(), strict=True))  # taps side by side
            for name, moment in moments.items():
                moment.add(values[name])
            outputs.offer(part, values)
    stats = {tap: acc.result() for tap, acc in accumulators.items()}
    found = {name: moment.result() for name, moment in moments.items()}
    return Collected(stats, found, outputs.result(session, outputs.fetch(aliases, names)))


def _add_run(
    part: Mapping[str, np.ndarray],
    values: Mapping[str, np.ndarray],
    row_mask: str | None,
    item: tuple[tuple[Tap, int], TapAccumulator],
) -> None:
    """Add one run's rows of one (tap, channels) to its accumulator."""
    (tap, channels), acc = item
    view = channel_view(values[tap.tensor], tap, channels)
    samples = len(next(iter(part.values())))
    units, keep = fold_units(view.shape[0], samples), row_keep(view, part, row_mask)
    acc.add(view.reshape(-1, channels), samples=units, keep=keep)


class Reference:
    """A model's outputs on `feeds`, gathered from the tapped runs of the statistics pass.

    While the pass's samples are `feeds`' own, in order (verification on samples the fit also
    used: they are the first ones), each run's outputs are kept; `result` runs the samples not
    met that way in the same session, in parts as the taps are (`tap_runs`): every run computes
    all taps, fetched or not, so all of them at once would grow ORT's arena by every tap of
    every sample (ResNet-50's 32 samples: 2 GB)."""

    def __init__(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> None:
        self.feeds = dict(feeds)
        self.outputs = list(outputs)
        self.total = len(next(iter(self.feeds.values()))) if self.feeds else 0
        self.matched = 0
        self.parts: list[list[np.ndarray]] = []
        self.following = True

    @property
    def done(self) -> bool:
        return self.matched >= self.total

    def fetch(self, aliases: Sequence[str], names: Sequence[str]) -> tuple[list, list]:
        """The (aliases, names) a run fetches to read the outputs too."""
        return [*self.outputs, *aliases], [*self.outputs, *names]

    def offer(self, part: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]) -> None:
        """Keep the outputs of a statistics run whose inputs are the next samples of `feeds`."""
        if self.done or not self.following:
            return
        n = min(len(next(iter(part.values()))), self.total - self.matched)
        window = slice(self.matched, self.matched + n)
        self.following = part.keys() == self.feeds.keys() and all(
            np.array_equal(part[name][:n], self.feeds[name][window]) for name in part
        )
        if self.following:
            self.parts.append([values[name][:n] for name in self.outputs])
            self.matched += n

    def result(
        self, session: ort.InferenceSession, fetch: tuple[list, list]
    ) -> dict[str, np.ndarray]:
        """The outputs on every sample of `feeds`, by name (empty without feeds)."""
        if not self.total:
            return {}
        if not self.done:
            rest = {name: array[self.matched :] for name, array in self.feeds.items()}
            shapes = (i.shape for i in session.get_inputs())
            batch = batch_for(shapes, self.total - self.matched)
            for _, values in tap_runs(session, *fetch, in_batches(rest, batch)):
                self.parts.append([values[name] for name in self.outputs])
        joined = (np.concatenate(arrays)[: self.total] for arrays in zip(*self.parts, strict=True))
        return dict(zip(self.outputs, joined, strict=True))


def tap_runs(
    session: ort.InferenceSession,
    aliases: Sequence[str],
    names: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run by run over `batches`: the feeds of the run and the tapped tensors (name → value).

    A run holds all its taps at once, and ORT's arena grows with them (ResNet-50's taps at batch
    24 took 1.2 GB): so a batch runs in parts whose tap outputs stay under RUN_BYTES, the part
    size taken from a first run of one sample, unless the model fixes its batch size.
    """
    fixed = any(i.shape and isinstance(i.shape[0], int) for i in session.get_inputs())
    step = None
    for feeds in batches:
        total, start = (len(next(iter(feeds.values()))) if feeds else 0), 0
        while start < total:
            size = total if fixed else min(step or 1, total - start)
            part = {k: v[start : start + size] for k, v in feeds.items()}
            values = _run_input_model(session, aliases, part)
            if step is None:
                step = max(1, RUN_BYTES * size // max(1, sum(v.nbytes for v in values)))
            yield part, dict(zip(names, values, strict=True))
            start += size


RUN_BYTES = 64 << 20


def fold_units(rows_axis: int, samples: int) -> int:
    """Into how many units for two-fold cross-validation a run's rows split: its samples where
    the tapped tensor's first axis holds them, else one, so that the run's rows stay in one fold
    and no sample is in both (nn.MultiheadAttention's (tokens·batch, E) rows, a sequence-first
    (T, B, …) tensor)."""
    return rows_axis if rows_axis == samples else 1


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs also include the tensors `names`."""
    model = copy_model(model)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    return model


def _run_input_model(
    session: ort.InferenceSession, outputs: Sequence[str], feeds: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """`session.run`; the model is the user's, so ORT failing on it is the input's problem."""
    try:
        return session.run(list(outputs), dict(feeds))
    except Exception as exc:  # ORT raises several unrelated exception types
        line = first_line(exc)
        raise ModelRunError(
            f"ONNX Runtime cannot run the original model on the calibration data: {line}",
            hint="the input model or data is at fault: check the data's shapes and values",
        ) from exc


def tapped_session(
    model: onnx.ModelProto, names: Sequence[str], *, threads: int = 0
) -> tuple[ort.InferenceSession, list[str]]:
    """`tap_session`, its ORT errors raised as a VerificationError."""
    try:
        return tap_session(model, names, threads=threads)
    except Exception as exc:  # ORT raises several unrelated exception types
        line = first_line(exc)
        raise VerificationError(f"ONNX Runtime cannot run the model to read taps: {line}") from exc


def tap_session(
    model: onnx.ModelProto, names: Sequence[str], *, threads: int = 0
) -> tuple[ort.InferenceSession, list[str]]:
    """An ORT session that also outputs the tensors `names`, each through an Identity copy
    (`add_taps`), without the optimizers in _TAP_SAFE; returns the session and the output
    names to run, in the order of `names`. `threads` as in `session_for`; ORT's errors pass."""
    aliases: list[str] = []
    edit = lambda copy: aliases.extend(add_taps(copy, names))  # noqa: E731
    # the taps go into the copy the session is made from: the weights are not copied
    session = session_for(model, threads=threads, edit=edit, disabled=_TAP_SAFE)
    return session, aliases


def add_taps(model: onnx.ModelProto, names: Sequence[str]) -> list[str]:
    """Make `model` (in place) output the tensors `names`, each through an Identity copy, and
    return the output names that read them, in the order of `names` (`tap_session` makes the
    session such a model needs).

    Naming an inner tensor as a graph output is not enough: ORT's layout optimizer (NCHWc, level
    ALL) can fuse a Conv with the Add that reads it and drop the tensor anyway, and session
    creation then fails. A copy read by nothing else is never fused.
    """
    outputs = {o.name for o in model.graph.output}
    taken = outputs | {t for node in model.graph.node for t in (*node.input, *node.output)}
    aliases = []
    for name in names:
        if name in outputs:
            aliases.append(name)
            continue
        alias = _fresh(f"{name}__onnxprune_tap", taken)
        model.graph.node.append(onnx.helper.make_node("Identity", [name], [alias], name=alias))
        model.graph.output.append(onnx.ValueInfoProto(name=alias))
        aliases.append(alias)
    return aliases


# ORT's identity elimination (level BASIC) folds a tap's copy back into the tensor by renaming
# it; DenseNet-121 exported at opset 8 (taps on two Conv → Pad → AveragePool transitions) then
# failed to load ("… is not a graph input, initializer, or output of a previous node"). Without
# it the copies stay: ResNet-50 with its 49 Relu outputs tapped ran 1 % slower (4 samples).
_TAP_SAFE = ("EliminateIdentity",)


def _fresh(name: str, taken: set[str]) -> str:
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    taken.add(candidate)
    return candidate


class ChannelMoments:
    """Running n, Σa and Σa² per channel along `axis`, in float64.

    The tensor is read as (before, channels, after) blocks of about a million elements, summed
    with float64 accumulators and no axis moved (moving it made a strided copy 8× slower). A
    block is converted to float64 once: einsum casting float32 as it multiplies took 1.5× as
    long for the same sums.
    """

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.n = 0
        self.sum: np.ndarray | float = 0.0
        self.squares: np.ndarray | float = 0.0

    def add(self, value: np.ndarray) -> None:
        axis = self.axis % value.ndim  # -1: a MatMul's channels on the last axis
        before, channels = math.prod(value.shape[:axis]), value.shape[axis]
        blocks = value.reshape(before, channels, math.prod(value.shape[axis + 1 :]))
        step = max(1, _BLOCK_ELEMENTS // max(blocks.shape[1] * blocks.shape[2], 1))
        for start in range(0, blocks.shape[0], step):
            block = blocks[start : start + step].astype(np.float64)
            self.sum = self.sum + block.sum(axis=(0, 2))
            self.squares = self.squares + np.einsum("bcp,bcp->c", block, block)
        self.n += before * blocks.shape[2]

    def result(self) -> Moments:
        """Mean and (population) variance per channel."""
        mean = self.sum / self.n
        return mean, np.maximum(self.squares / self.n - mean**2, 0.0)


_BLOCK_ELEMENTS = 1 << 20
