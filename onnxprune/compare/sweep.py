"""Sweep: prune one model with several method specs at several widths and score every result.

Each cell (method spec × ratio or MAC target) is pruned from the same calibration data, evaluated
on a held-out split (accuracy where labels exist, else agreement with the original's top-1, the
cosine of mean-pooled sentence embeddings for an encoder fed an `attention_mask`, or the
relative L2 deviation of its output), costed (MACs, parameters) and optionally timed against the
original at batch 1, interleaved. Random is repeated over seeds and reported as mean ± std.
Cells run one after another, in local worker processes or as Ray tasks (`compare.parallel`);
each writes its own pruned model when asked, and a failing cell is recorded in its row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxprune.api import prune
from onnxprune.calib.data import Dataset, batch_for, input_specs, load_data
from onnxprune.compare.parallel import Backend, CellError, run_cells
from onnxprune.errors import DataError, OnnxPruneError, UsageError
from onnxprune.graph.load import load_model, save_model
from onnxprune.measure.cost import Cost, count
from onnxprune.measure.embedding import embedding_scores, token_state_mask
from onnxprune.measure.latency import benchmark
from onnxprune.measure.verify import is_class_scores, session_for
from onnxprune.options import METHODS, check_ratio

if TYPE_CHECKING:
    import onnxruntime as ort

MODIFIERS: dict[str, dict[str, Any]] = {
    "bias": {"compensate": "bias"},
    "lsq": {"compensate": "lsq"},
    "recalibrate": {"recalibrate": True},
    "sequential": {"sequential": True},
}
CSV_COLUMNS = (
    "method", "kind", "point", "seeds", "metric", "metric_std", "accuracy", "agreement", "rel_l2",
    "cosine", "retrieval", "spearman",
    "macs", "params", "macs_reduction", "params_reduction", "latency_ms", "base_latency_ms",
    "speedup", "seconds", "onnx", "error",
)  # fmt: skip
ModelLike = str | os.PathLike | onnx.ModelProto


@dataclass(frozen=True)
class MethodSpec:
    """A method name plus modifiers, e.g. `magnitude+lsq` → method magnitude, compensate lsq."""

    label: str
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """Scores of one model on the evaluation split; `value` is the sweep's chosen metric.

    `cosine`, `retrieval` and `spearman` (onnxprune.measure.embedding) are set for encoders whose
    first output is token states and whose inputs include an `attention_mask`."""

    value: float
    accuracy: float | None
    agreement: float | None
    rel_l2: float
    cosine: float | None = None
    retrieval: float | None = None
    spearman: float | None = None


@dataclass(frozen=True)
class SweepCell:
    """One (method, ratio or MAC target) point, averaged over seeds where there are several."""

    method: str
    kind: str  # "ratio" (channels removed per group) or "target" (MACs reduction aimed at)
    point: float
    seeds: int = 1
    metric: float | None = None
    metric_std: float | None = None
    accuracy: float | None = None
    agreement: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    retrieval: float | None = None
    spearman: float | None = None
    macs: int | None = None
    params: int | None = None
    macs_reduction: float | None = None
    params_reduction: float | None = None
    latency_ms: float | None = None
    base_latency_ms: float | None = None
    speedup: float | None = None
    seconds: float | None = None
    onnx: str = ""  # the pruned model's file, when the sweep writes them
    error: str = ""


@dataclass(frozen=True)
class SweepResult:
    """Every cell of a sweep plus what they are measured against."""

    model: str
    metric: str
    higher_is_better: bool
    base: Evaluation
    macs: int
    params: int
    cells: tuple[SweepCell, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the baseline, the settings and one dict per cell."""
        return {
            "model": self.model,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "base": asdict(self.base),
            "macs": self.macs,
            "params": self.params,
            "settings": dict(self.settings),
            "cells": [asdict(c) for c in self.cells],
        }

    def write(self, out_dir: str | os.PathLike, stem: str = "sweep") -> tuple[Path, Path]:
        """Write `<stem>.csv` and `<stem>.json` into `out_dir` (created); return both paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for cell in self.cells:
                writer.writerow({k: _csv_value(v) for k, v in asdict(cell).items()})
        json_path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return csv_path, json_path

    def format_table(self) -> str:
        """A fixed-width terminal table, one row per cell."""
        kind = self.cells[0].kind if self.cells else "ratio"
        head = ("method", "ratio" if kind == "ratio" else "target", "MACs -%", "params -%",
                self.metric, "rel L2", "speedup")  # fmt: skip
        rows = [head] + [_table_row(c) for c in self.cells]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(row, widths, strict=True)))
            for row in rows
        ]  # fmt: skip
        lines.append(f"original: {self.metric} {_fmt(self.base.value)}; "
                     f"rel L2 = deviation of the first output from the original's")  # fmt: skip
        return "\n".join(lines)


class Evaluator:
    """Scores models on an evaluation Dataset against the original's outputs.

    The metric is accuracy when the data has labels and the first output is class scores,
    otherwise top-1 agreement with the original (class scores), the mean cosine of mean-pooled
    embeddings (token states (N, S, H) of an encoder fed an `attention_mask` (N, S)), or
    relative L2 deviation (anything else, lower is better).
    """

    def __init__(self, original: onnx.ModelProto, data: Dataset, *, batch_size: int = 256):
        if len(data) == 0:
            raise DataError("evaluation data holds no samples")
        self.data = data
        self.batch_size = batch_size
        self.reference = self.outputs(original)
        self.classify = is_class_scores(self.reference)
        self.mask = token_state_mask(self.reference, data.arrays)
        if data.labels is not None and self.classify:
            self.metric = "accuracy"
        elif self.mask is not None:
            self.metric = "cosine"
        else:
            self.metric = "agreement" if self.classify else "rel_l2"
        self.higher_is_better = self.metric != "rel_l2"
        self.base = self.score(self.reference)

    def __call__(self, model: onnx.ModelProto) -> Evaluation:
        """Evaluate `model` on the whole evaluation split."""
        return self.score(self.outputs(model))

    def outputs(self, model: onnx.ModelProto) -> np.ndarray:
        """The first output of `model` over the evaluation split, in batches (of the model's
        fixed batch when it has one)."""
        return self.session_outputs(session_for(model))

    def session_outputs(self, session: ort.InferenceSession) -> np.ndarray:
        """`outputs` of a model already loaded in `session` (any execution provider)."""
        name = session.get_outputs()[0].name
        batch = batch_for((arg.shape for arg in session.get_inputs()), self.batch_size)
        parts = [session.run([name], b.feeds)[0] for b in self.data.batches(batch)]
        return np.concatenate(parts)

    def score(self, got: np.ndarray) -> Evaluation:
        """Accuracy, agreement, embedding scores and relative L2 deviation of outputs `got`."""
        ref64, got64 = self.reference.astype(np.float64), got.astype(np.float64)
        rel = float(np.linalg.norm(got64 - ref64) / max(np.linalg.norm(ref64), 1e-30))
        accuracy = agreement = None
        if self.classify:
            top = got.argmax(axis=1)
            agreement = float(np.mean(top == self.reference.argmax(axis=1)))
            if self.data.labels is not None:
                accuracy = float(np.mean(top == self.data.labels))
        embed = None if self.mask is None else embedding_scores(self.reference, got, self.mask)
        value = {"accuracy": accuracy, "agreement": agreement, "rel_l2": rel,
                 "cosine": embed.cosine if embed else None}[self.metric]  # fmt: skip
        return Evaluation(float(value), accuracy, agreement, rel,  # type: ignore[arg-type]
                          **(asdict(embed) if embed else {}))  # fmt: skip

    def loss(self, evaluation: Evaluation) -> float:
        """How much worse than the original (≥ 0 means worse) in the metric's units."""
        if self.higher_is_better:
            return self.base.value - evaluation.value
        return evaluation.value - self.base.value


def sweep(
    model: ModelLike,
    methods: Sequence[str | MethodSpec],
    *,
    data: Any,
    evaluation: Dataset | str | os.PathLike,
    ratios: Sequence[float] | None = None,
    targets: Sequence[float] | None = None,
    seeds: int = 1,
    latency: bool = True,
    latency_repeats: int = 20,
    backend: Backend | None = None,
    models_dir: str | os.PathLike | None = None,
    **options: Any,
) -> SweepResult:
    """Prune `model` with every method spec at every ratio (or MACs-reduction target) and score it.

    `data` is the calibration data (anything `onnxprune.prune` accepts), `evaluation` the held-out
    split. `targets` are MACs reductions t (pruned with `target_macs = 1 - t`). `seeds` repeats
    the `random` method. `backend` runs the cells in worker processes or on Ray (default: here,
    one after another); the cells and their numbers do not depend on it. With `models_dir` each
    cell writes its pruned model there (the first seed's). Other options go to `onnxprune.prune`
    (`round_to`, `prune_residual`, `compensate`, `recalibrate` …); a spec's modifiers override
    them.
    """
    kind, points = _points(ratios, targets)
    if seeds < 1:
        raise UsageError(f"'seeds' must be at least 1; got {seeds}")
    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    if not specs:
        raise UsageError("no methods to sweep")
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    backend = backend or Backend()
    backend.check_model(proto)
    evaluator = Evaluator(proto, as_dataset(proto, evaluation, role="evaluation"))
    before = count(proto)
    base_seed = int(options.pop("seed", 0))
    if data is not None:  # read once, not once per cell
        data = as_dataset(proto, data, role="calibration", seed=base_seed,
                          samples=options.get("calib_samples"))  # fmt: skip
    shared = _Shared(proto, data, evaluator, before, options, latency, latency_repeats,
                     None if models_dir is None else str(models_dir))  # fmt: skip
    tasks = [
        _Point(spec, kind, point, base_seed, seeds if spec.method == "random" else 1)
        for spec in specs
        for point in points
    ]
    outcomes = run_cells(_cell, shared, tasks, backend, "sweep cells")
    cells = [
        SweepCell(t.spec.label, kind, t.point, error=o.message) if isinstance(o, CellError) else o
        for t, o in zip(tasks, outcomes, strict=True)
    ]
    settings = {
        "methods": [s.label for s in specs],
        "kind": kind,
        "points": list(points),
        "seeds": seeds,
        "latency": latency,
        "options": {k: v for k, v in options.items() if _jsonable(v)},
    }
    name = Path(model).stem if not isinstance(model, onnx.ModelProto) else proto.graph.name
    return SweepResult(name, evaluator.metric, evaluator.higher_is_better, evaluator.base,
                       before.macs, before.params, tuple(cells), settings)  # fmt: skip


def parse_method(text: str) -> MethodSpec:
    """`name[+modifier...]` with modifiers bias, lsq (compensation), recalibrate and
    sequential."""
    name, *mods = [part.strip() for part in text.strip().split("+")]
    if name not in METHODS:
        raise UsageError(f"unknown method '{name}' in '{text}'; choose from {', '.join(METHODS)}")
    options: dict[str, Any] = {}
    for mod in mods:
        if mod not in MODIFIERS:
            raise UsageError(
                f"unknown modifier '{mod}' in '{text}'; choose from {', '.join(MODIFIERS)}"
            )
        if "compensate" in MODIFIERS[mod] and "compensate" in options:
            raise UsageError(f"'{text}' gives two compensations; choose bias or lsq")
        options.update(MODIFIERS[mod])
    return MethodSpec(text.strip(), name, options)


def parse_grid(text: str, what: str = "ratio") -> tuple[float, ...]:
    """`START:STOP:STEP` (STOP included) or `A,B,C`; every value must lie in [0, 1)."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            n = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + i * step, 10) for i in range(max(n, 0))]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"--{what}s expects START:STOP:STEP or A,B,C; got '{text}'") from exc
    if not values:
        raise UsageError(f"--{what}s '{text}' gives no values")
    return tuple(dict.fromkeys(check_ratio(v, what) for v in values))


def as_dataset(
    model: onnx.ModelProto, data: Dataset | str | os.PathLike | Mapping, *, role: str, **kw: Any
) -> Dataset:
    """`data` as a validated Dataset for `model` (a Dataset passes through)."""
    if isinstance(data, Dataset):
        return data
    return load_data(data, input_specs(model), role=role, **kw)


def overlap_warning(
    calibration: Dataset,
    evaluation: Dataset,
    calibration_source: str | os.PathLike | None = None,
    evaluation_source: str | os.PathLike | None = None,
) -> str | None:
    """A one-line warning when calibration and evaluation data are one file or share samples."""
    if _same_file(calibration_source, evaluation_source):
        return (
            f"calibration and evaluation data are the same file ({evaluation_source}); "
            "scores will be optimistic — evaluate on a disjoint split"
        )
    if calibration.synthetic or evaluation.synthetic:
        return None
    shared = len(_sample_hashes(calibration) & _sample_hashes(evaluation))
    if shared:
        return (
            f"calibration and evaluation data share {shared} identical sample(s) "
            f"(of {len(evaluation)} evaluated); scores will be optimistic"
        )
    return None


def pyplot() -> Any | None:
    """matplotlib.pyplot with the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: str | os.PathLike) -> None:
    """Lay out, write (folders created) and close a matplotlib figure."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(result: SweepResult, path: str | os.PathLike) -> bool:
    """Metric vs MACs reduction (one line per method) and, when timed, speedup vs MACs
    reduction. Returns False (and writes nothing) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    timed = any(c.speedup is not None for c in result.cells)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    for method in dict.fromkeys(c.method for c in result.cells):
        cells = sorted((c for c in result.cells if c.method == method and c.metric is not None),
                       key=lambda c: c.macs_reduction or 0.0)  # fmt: skip
        if not cells:
            continue
        x = [100 * (c.macs_reduction or 0.0) for c in cells]
        y = [c.metric for c in cells]
        err = [c.metric_std or 0.0 for c in cells]
        ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", ms=3, label=method)
        if timed:
            speed = [(100 * (c.macs_reduction or 0.0), c.speedup) for c in cells if c.speedup]
            if speed:
                axes[0][1].plot(*zip(*speed, strict=True), marker="o", ms=3, label=method)
    ax.axhline(result.base.value, color="grey", lw=0.8, ls=":", label="original")
    ax.set(xlabel="MACs reduction (%)", ylabel=result.metric, title=result.model)
    ax.legend(fontsize=7)
    if timed:
        right = axes[0][1]
        grid = np.linspace(0, max(100 * (c.macs_reduction or 0) for c in result.cells), 50)
        right.plot(grid, 1 / np.maximum(1 - grid / 100, 1e-3), "k:", lw=0.8, label="ideal (MACs)")
        right.set(xlabel="MACs reduction (%)", ylabel="latency speedup (batch 1)")
        right.legend(fontsize=7)
    save_figure(plt, fig, path)
    return True


# ----------------------------------------------------------------------------- helpers


def _points(
    ratios: Sequence[float] | None, targets: Sequence[float] | None
) -> tuple[str, tuple[float, ...]]:
    if (ratios is None) == (targets is None):
        raise UsageError("give exactly one of ratios or targets")
    if ratios is not None:
        return "ratio", tuple(check_ratio(r) for r in ratios)
    return "target", tuple(check_ratio(t, "target") for t in targets or ())


@dataclass(frozen=True)
class _Shared:
    """What every cell of one sweep reads (sent once to each worker process)."""

    model: onnx.ModelProto
    data: Dataset | None
    evaluator: Evaluator
    before: Cost
    options: Mapping[str, Any]
    latency: bool
    repeats: int
    models_dir: str | None


@dataclass(frozen=True)
class _Point:
    """One cell: a method spec at one ratio or target, over `seeds` seeds from `first_seed`."""

    spec: MethodSpec
    kind: str
    point: float
    first_seed: int
    seeds: int


def _cell(shared: _Shared, task: _Point) -> SweepCell:
    """Prune, score, cost, optionally write and time one cell; a refused prune is its error."""
    spec, kind, point = task.spec, task.kind, task.point
    width = {"ratio": point} if kind == "ratio" else {"target_macs": 1.0 - point}
    literal = {"compensate": "none", "recalibrate": False, "sequential": False}  # a spec: all
    # it adds is named
    prune_options = {"verify": False, "allow_noop": True, **literal, **shared.options}
    prune_options.update({**spec.options, **width})
    scores, macs, params, seconds, model = [], [], [], [], None
    try:
        for seed in range(task.first_seed, task.first_seed + task.seeds):
            start = time.perf_counter()
            result = prune(shared.model, method=spec.method, data=shared.data, seed=seed,
                           **prune_options)  # fmt: skip
            seconds.append(time.perf_counter() - start)
            model = model or result.model
            scores.append(shared.evaluator(result.model))
            macs.append(result.report.macs[1])
            params.append(result.report.params[1])
    except OnnxPruneError as exc:
        return SweepCell(spec.label, kind, point, error=str(exc).splitlines()[0])
    path = _write(model, shared.models_dir, task) if shared.models_dir else ""
    timed = shared.latency and model is not None
    timing = _latency(shared.model, model, shared.repeats) if timed else (None, None)
    values = [s.value for s in scores]
    before = shared.before
    return SweepCell(
        method=spec.label,
        kind=kind,
        point=point,
        seeds=len(scores),
        metric=float(np.mean(values)),
        metric_std=float(np.std(values)),
        accuracy=_mean([s.accuracy for s in scores]),
        agreement=_mean([s.agreement for s in scores]),
        rel_l2=_mean([s.rel_l2 for s in scores]),
        cosine=_mean([s.cosine for s in scores]),
        retrieval=_mean([s.retrieval for s in scores]),
        spearman=_mean([s.spearman for s in scores]),
        macs=round(float(np.mean(macs))),
        params=round(float(np.mean(params))),
        macs_reduction=1.0 - float(np.mean(macs)) / before.macs if before.macs else 0.0,
        params_reduction=1.0 - float(np.mean(params)) / before.params if before.params else 0.0,
        latency_ms=timing[1],
        base_latency_ms=timing[0],
        speedup=timing[0] / timing[1] if timing[1] else None,
        seconds=float(np.mean(seconds)),
        onnx=path,
    )


def _write(model: onnx.ModelProto, folder: str, task: _Point) -> str:
    """Save one cell's pruned model as `<folder>/<spec>_<kind><point>.onnx`; return the path."""
    name = "".join(c if c.isalnum() or c in "+-." else "_" for c in task.spec.label)
    path = Path(folder) / f"{name}_{task.kind}{task.point:g}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    return str(path)


def _latency(original: onnx.ModelProto, pruned: onnx.ModelProto, repeats: int):
    """Median batch-1 latencies (ms) of the original and the pruned model, timed interleaved."""
    rows = benchmark([original, pruned], batches=(1,), warmup=3, repeats=repeats, min_time=0.1,
                     names=("original", "pruned")).rows  # fmt: skip
    return rows[0].median_ms, rows[1].median_ms


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _same_file(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    if a is None or b is None or "random" in (str(a), str(b)):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _sample_hashes(data: Dataset) -> set[bytes]:
    """One digest per sample over all inputs (by input name), to find shared samples."""
    names = sorted(data.arrays)
    hashes = set()
    for i in range(len(data)):
        digest = hashlib.blake2b(digest_size=16)
        for name in names:
            digest.update(np.ascontiguousarray(data.arrays[name][i]).tobytes())
        hashes.add(digest.digest())
    return hashes


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.4g}"


def _table_row(cell: SweepCell) -> tuple[str, ...]:
    if cell.error:
        return (cell.method, f"{cell.point:g}", "-", "-", f"error: {cell.error}"[:60], "-", "-")
    metric = _fmt(cell.metric)
    if cell.seeds > 1:
        metric += f" ± {cell.metric_std:.2g}"
    speed = "-" if cell.speedup is None else f"{cell.speedup:.2f}x"
    return (cell.method, f"{cell.point:g}", _fmt(cell.macs_reduction, True),
            _fmt(cell.params_reduction, True), metric, _fmt(cell.rel_l2), speed)  # fmt: skip
