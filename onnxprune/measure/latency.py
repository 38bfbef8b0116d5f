"""ONNX Runtime latency benchmark that compares models fairly.

Every model gets a session with identical options (threads, providers, optimization level), the
same seeded random inputs per batch, warm-up runs, and then the models run interleaved (A B A B …)
so that drifts of a noisy machine (turbo, other processes) hit all models alike. Medians and
quantiles rather than means are reported because latency distributions have long right tails.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onnxprune.errors import DataError, ModelLoadError, UsageError, first_line

if TYPE_CHECKING:  # onnx and onnxruntime load where used: PROVIDERS serves the CLI's --help
    import onnx
    import onnxruntime as ort

    from onnxprune.calib.data import Dataset
    from onnxprune.compare.sweep import Evaluation

PROVIDERS = {  # --provider name: ONNX Runtime's provider, and the package that brings it
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu"),
    "tensorrt": ("TensorrtExecutionProvider", "onnxruntime-gpu and TensorRT"),
    "openvino": ("OpenVINOExecutionProvider", "onnxruntime-openvino"),
}
_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class BenchRow:
    """Latency statistics (milliseconds), static cost and, with evaluation data, the scores of
    one model at one batch size.

    `macs` is counted at this row's batch size. `file_bytes` is the size on disk including
    external data files (the serialized size for an in-memory model). `speedup` = median of the
    first model / this median; `ideal_speedup` = MACs of the first model / these MACs (None when
    MACs are 0). `accuracy` (labels and class scores), `agreement` (top-1 agreement with the
    first model, class scores), `rel_l2` (relative L2 distance of the first output from the
    first model's) and, for sentence encoders (token states and an `attention_mask` input),
    `cosine`, `retrieval` and `spearman` of mean-pooled embeddings against the first model's
    (onnxprune.measure.embedding) are None without evaluation data or where they do not apply.
    `provider` is the execution provider the row ran on (scores included); "first model" is
    the first model on the first provider.
    """

    model: str
    batch: int
    params: int
    file_bytes: int
    macs: int
    median_ms: float
    p90_ms: float
    iqr_ms: float
    mean_ms: float
    throughput: float  # samples per second at the median latency
    speedup: float
    ideal_speedup: float | None
    unknown_nodes: int  # nodes whose shapes were unknown, so `macs` may be an undercount
    times_ms: tuple[float, ...] = field(repr=False)
    accuracy: float | None = None
    agreement: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    retrieval: float | None = None
    spearman: float | None = None
    provider: str = "cpu"


@dataclass(frozen=True)
class BenchResult:
    """All rows (models × batches, in run order) plus the settings they were measured under."""

    rows: tuple[BenchRow, ...]
    settings: dict

    def to_dict(self) -> dict:
        """JSON-ready dict: settings, and rows including the raw times."""
        rows = [{**asdict(r), "times_ms": list(r.times_ms)} for r in self.rows]
        return {"settings": dict(self.settings), "macs_counted_at": "row batch", "rows": rows}

    def format_table(self) -> str:
        """A fixed-width table for the terminal (raw times left out)."""
        scores = [k for k in SCORES if any(getattr(r, k) is not None for r in self.rows)]
        head = (
            "model",
            "batch",
            "params",
            "size",
            "MACs",
            "median ms",
            "p90 ms",
            "IQR ms",
            "mean ms",
            "samples/s",
            "speedup",
            "ideal",
            *(SCORES[k] for k in scores),
        )
        lines = [head] + [_table_cells(r, scores) for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        text = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
            for line in lines
        ]
        s = self.settings
        text.append(
            f"{s['provider']}, {s['threads']} threads, {s['repeats_min']}+ interleaved "
            f"repeats after {s['warmup']} warm-up runs; MACs at the row's batch size"
            " (+? = some node shapes unknown)"
        )
        if s.get("evaluation"):
            e = s["evaluation"]
            text.append(
                f"scores on {e['samples']} samples of {e['data']}; all but accuracy against "
                f"{e['reference']}"
            )
        if s.get("note"):
            text.append(f"note: {s['note']}")
        return "\n".join(text)


SCORES = {"accuracy": "accuracy", "agreement": "agreement", "rel_l2": "rel-L2", "cosine": "cosine",
          "retrieval": "NN-agree", "spearman": "spearman"}  # field: column  # fmt: skip


def _table_cells(r: BenchRow, scores: Sequence[str] = ()) -> tuple[str, ...]:
    from onnxprune.measure.cost import format_count

    ideal = "-" if r.ideal_speedup is None else f"{r.ideal_speedup:.2f}x"
    macs = format_count(r.macs) + ("+?" if r.unknown_nodes else "")
    values = [getattr(r, k) for k in scores]
    return (
        r.model,
        str(r.batch),
        format_count(r.params),
        format_count(r.file_bytes) + "B",
        macs,
        f"{r.median_ms:.3f}",
        f"{r.p90_ms:.3f}",
        f"{r.iqr_ms:.3f}",
        f"{r.mean_ms:.3f}",
        f"{r.throughput:.1f}",
        f"{r.speedup:.2f}x",
        ideal,
        *("-" if v is None else f"{v:.4g}" for v in values),
    )


def benchmark(
    models: Sequence[str | os.PathLike | onnx.ModelProto],
    *,
    batches: Sequence[int] = (1,),
    threads: int | None = None,
    providers: Sequence[str] = ("cpu",),
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    warmup: int = 10,
    repeats: int = 50,
    min_time: float = 1.0,
    seed: int = 0,
    spinning: bool = False,
    names: Sequence[str] | None = None,
    evaluation: Dataset | None = None,
    evaluation_name: str = "the evaluation data",
) -> BenchResult:
    """Time `models` interleaved at each batch size; at least `repeats` runs per model and batch,
    more until a batch's measurement loop has lasted `min_time` seconds. `spinning` lets idle
    intra-op threads busy-wait (ORT's default; unfair when sessions interleave). `names` label
    the rows (default: file names). Every model runs on each of `providers` (rows labelled with
    the provider when there are several), all sessions interleaved in one loop. With
    `evaluation` data every session is also scored on it (accuracy with labels; agreement and
    rel-L2 against the first model on the CPU provider), before any timing."""
    import onnxruntime as ort

    from onnxprune.graph.session import default_threads
    from onnxprune.measure.cost import count

    _check_options(models, batches, threads, warmup, repeats, min_time)
    if not providers or len(set(providers)) != len(providers):
        raise UsageError(f"give each execution provider once, got {list(providers)}")
    threads = threads or default_threads() or physical_cores()
    cells = [(p, i) for p in providers for i in range(len(models))]  # (provider, model) pairs
    loaded = [_load(m) for m in models]
    if evaluation is not None:  # inputs the data feeds with one more axis: run with one of 1
        loaded = [_with_sample_axis(m, evaluation) for m in loaded]
    sizes = [model_bytes(m) for m in models]
    names = list(names) if names else _labels(models)
    labels = [names[i] if len(providers) == 1 else f"{names[i]} [{p}]" for p, i in cells]
    sessions = [
        make_session(loaded[i], threads=threads, provider=p, spinning=spinning) for p, i in cells
    ]
    scores = _evaluate(loaded[0], sessions, labels, evaluation) if evaluation is not None else None
    batches, note = _accepted_batches(sessions, labels, batches)
    _check_input_names(sessions, input_shapes or {})
    feeds_by_batch = {  # built up front so a bad shape fails before any timing
        batch: [
            _feed(s, lab, batch, input_shapes or {}, seed)
            for s, lab in zip(sessions, labels, strict=True)
        ]
        for batch in batches
    }
    rows: list[BenchRow] = []
    for batch, feeds in feeds_by_batch.items():
        times = _time_interleaved(sessions, feeds, warmup, repeats, min_time)
        costs = [  # per model, from the first provider's feeds (every provider's are the same)
            count(m, input_shapes={k: v.shape for k, v in f.items()})
            for m, f in zip(loaded, feeds[: len(models)], strict=True)
        ]
        cell_costs, cell_sizes = [costs[i] for _, i in cells], [sizes[i] for _, i in cells]
        rows += _rows(labels, batch, times, cell_costs, cell_sizes, scores, cells)
    settings = {
        "provider": ", ".join(providers),
        "threads": threads,
        "inter_op_threads": 1,
        "allow_spinning": spinning,
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "warmup": warmup,
        "repeats_min": repeats,
        "min_time_s": min_time,
        "seed": seed,
        "batches": list(batches),
        "onnxruntime": ort.__version__,
        **({"note": note} if note else {}),
    }
    if evaluation is not None:
        settings["evaluation"] = {
            "data": evaluation_name,
            "samples": len(evaluation),
            "labels": evaluation.labels is not None,
            "reference": labels[0],
        }
    return BenchResult(tuple(rows), settings)


def model_bytes(model: str | os.PathLike | onnx.ModelProto) -> int:
    """Bytes a model takes on disk: the file plus the external data files its tensors name
    (each counted once); for an in-memory model, its serialized size."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model.ByteSize()
    path = Path(model)
    proto = onnx.load(str(path), load_external_data=False)
    external = {
        entry.value
        for tensor in _tensors(proto.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in external)


def plot_bench(result: BenchResult, path: str | os.PathLike) -> bool:
    """Median latency vs the best available score (accuracy, else agreement with the first
    model, else rel-L2), one point per model and batch, labelled with the model. Returns False
    (and writes nothing) without matplotlib; a UsageError when the rows hold no scores."""
    from onnxprune.compare.sweep import pyplot, save_figure

    key = next((k for k in SCORES if all(getattr(r, k) is not None for r in result.rows)), None)
    if key is None:
        raise UsageError("a bench plot shows latency against scores: give --eval data")
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for batch in dict.fromkeys(r.batch for r in result.rows):
        rows = [r for r in result.rows if r.batch == batch]
        ax.plot([r.median_ms for r in rows], [getattr(r, key) for r in rows], "o",
                label=f"batch {batch}")  # fmt: skip
        for r in rows:
            ax.annotate(r.model, (r.median_ms, getattr(r, key)), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("median latency (ms)")
    ax.set_ylabel(SCORES[key] + ("" if key == "accuracy" else f" vs {result.rows[0].model}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(plt, fig, path)
    return True


def physical_cores() -> int:
    """Physical cores usable by this process: unique (physical id, core id) pairs on Linux,
    capped by the CPU affinity mask; os.cpu_count() elsewhere."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = _cpuinfo_cores()
    fallback = os.cpu_count() or 1
    return max(1, min(x for x in (cores or fallback, logical or fallback)))


def _cpuinfo_cores(text: str | None = None) -> int | None:
    """Unique (physical id, core id) pairs in `text` (default: /proc/cpuinfo), or None."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    pairs, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            pairs.add((phys, value.strip()))
    return len(pairs) or None


def make_session(
    model: onnx.ModelProto, *, threads: int, provider: str = "cpu", spinning: bool = False
) -> ort.InferenceSession:
    """An InferenceSession with the benchmark's fixed options and an explicit provider list."""
    import onnxruntime as ort

    from onnxprune.graph.session import inference_session

    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider '{provider}'; choose from {', '.join(PROVIDERS)}")
    name, package = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        raise UsageError(
            f"provider '{provider}' needs {name}, but this onnxruntime offers only "
            f"{available} (it comes with {package})"
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # Interleaved sessions each own a thread pool; spinning workers of the session that just ran
    # would steal cores from the next one (measured: 3-10x slower medians on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    providers = [name] if provider == "cpu" else [name, PROVIDERS["cpu"][0]]
    try:
        return inference_session(model, opts, providers)
    except Exception as exc:  # ORT raises several pybind exception types
        first = first_line(exc, 200)
        name = model.graph.name
        raise ModelLoadError(f"onnxruntime cannot load model '{name}': {first}") from exc


# ----------------------------------------------------------------------------- helpers


def _tensors(graph: onnx.GraphProto):
    """Initializers and tensor attributes of `graph` and of its subgraphs (If/Loop bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _tensors(sub)


def _check_options(models, batches, threads, warmup, repeats, min_time) -> None:
    if not models:
        raise UsageError("no models to benchmark")
    if not batches or any(int(b) < 1 for b in batches):
        raise UsageError(f"batch sizes must be positive integers, got {list(batches)}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if warmup < 0 or repeats < 1 or min_time < 0:
        raise UsageError(
            f"need warmup >= 0, repeats >= 1, min_time >= 0; got {warmup}, {repeats}, {min_time}"
        )


def _accepted_batches(
    sessions: Sequence[ort.InferenceSession], labels: Sequence[str], batches: Sequence[int]
) -> tuple[tuple[int, ...], str | None]:
    """The batches to time: the requested ones, or only the batch the models fix (with a note
    saying so) when their inputs fix it; models that fix different batches cannot be compared."""
    from onnxprune.calib.data import batch_for  # lazy: reads onnx, and `--help` needs none

    fixed = {
        label: batch_for((arg.shape for arg in session.get_inputs()), 0)
        for session, label in zip(sessions, labels, strict=True)
    }
    fixed = {label: batch for label, batch in fixed.items() if batch}
    if len(set(fixed.values())) > 1:
        raise UsageError(f"the models fix different batch sizes ({fixed}); bench them apart")
    if not fixed or set(batches) == set(fixed.values()):
        return tuple(batches), None
    batch = next(iter(fixed.values()))
    note = f"the model fixes its batch to {batch}: timed at {batch} instead of {list(batches)}"
    return (batch,), note


def _check_input_names(sessions, input_shapes: dict[str, tuple[int, ...]]) -> None:
    names = {arg.name for s in sessions for arg in s.get_inputs()}
    extra = sorted(set(input_shapes) - names)
    if extra:
        raise UsageError(f"--input-shape names {extra} but the model inputs are {sorted(names)}")


def _load(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load a model file (its external data mapped, not read: graph/external.py) or pass a
    ModelProto through."""
    import onnx
    from google.protobuf.message import DecodeError

    from onnxprune.graph.external import map_external

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"model file '{path}' does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        map_external(proto, path.parent)
    except (DecodeError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"'{path}' is not a valid ONNX file ({type(exc).__name__})") from exc
    if not proto.graph.node:
        raise ModelLoadError(f"'{path}' is not an ONNX model (no graph nodes)")
    if not proto.graph.name:
        proto.graph.name = path.name
    return proto


def _with_sample_axis(model: onnx.ModelProto, data: Dataset) -> onnx.ModelProto:
    """`model` with a sample axis of 1 on the inputs that `data` feeds with one axis more than
    declared (graph/unbatched.py: torchvision's detectors take one image): it is then timed and
    scored one sample per run, as a fixed-batch-1 model."""
    from onnxprune.calib.data import inputs_without_sample_axis
    from onnxprune.graph.unbatched import with_sample_axis

    names = inputs_without_sample_axis(model, data)
    return with_sample_axis(model, names) if names else model


def _labels(models: Sequence) -> list[str]:
    """Short names: file names, or full paths when file names repeat; model<i> for protos."""
    import onnx

    names = [Path(m).name if not isinstance(m, onnx.ModelProto) else "" for m in models]
    labels = []
    for i, (m, name) in enumerate(zip(models, names, strict=True)):
        if isinstance(m, onnx.ModelProto):
            labels.append(f"model{i}" if not m.graph.name else f"{i}:{m.graph.name}")
        else:
            labels.append(name if names.count(name) == 1 else str(m))
    return labels


def _feed(
    session: ort.InferenceSession,
    label: str,
    batch: int,
    input_shapes: dict[str, tuple[int, ...]],
    seed: int,
) -> dict[str, np.ndarray]:
    """Seeded random inputs of the declared dtype; dim 0 is the batch dim when it is symbolic."""
    rng = np.random.default_rng(seed)
    feed = {}
    for arg in session.get_inputs():
        shape = _input_shape(arg, label, batch, input_shapes.get(arg.name))
        dtype = _NP_TYPES.get(arg.type)
        if dtype is None:
            raise DataError(
                f"input '{arg.name}' of model '{label}' has type {arg.type}, "
                "which bench cannot fill with random data"
            )
        feed[arg.name] = _random(rng, shape, dtype)
    return feed


def _input_shape(
    arg: ort.NodeArg, label: str, batch: int, override: tuple[int, ...] | None
) -> tuple[int, ...]:
    """Concrete shape for one input: the override or declared dims, dim 0 set to `batch`."""
    declared = list(arg.shape or [])
    batch_dynamic = bool(declared) and not isinstance(declared[0], int)
    if override is not None:
        _check_override(arg.name, label, declared, override)
        declared = list(override)
    if batch_dynamic:  # a fixed batch is the one `_accepted_batches` chose
        declared[0] = batch
    dynamic = [str(d) for d in declared if not isinstance(d, int)]
    if dynamic:
        example = ",".join(str(d) if isinstance(d, int) else f"<{d}>" for d in declared)
        raise UsageError(
            f"input '{arg.name}' of model '{label}' has dynamic dims {dynamic}; "
            f"pass --input-shape {arg.name}:{example}"
        )
    return tuple(declared)


def _check_override(name: str, label: str, declared: list, override: tuple[int, ...]) -> None:
    """The override must have the input's rank and agree with its fixed dims."""
    if declared and len(declared) != len(override):
        raise UsageError(
            f"input '{name}' of model '{label}' has rank {len(declared)} but "
            f"--input-shape gives {len(override)} dims"
        )
    for i, (d, v) in enumerate(zip(declared, override, strict=False)):
        if isinstance(d, int) and d != v:
            raise UsageError(
                f"input '{name}' of model '{label}' has fixed dim {i} = {d} but "
                f"--input-shape gives {v}"
            )


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        # 0 or 1: valid for any index input of a table with two rows (BERT's token_type_ids,
        # masks); with 0..9, BERT's segment embedding lookup failed
        return rng.integers(0, 2, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _time_interleaved(sessions, feeds, warmup: int, repeats: int, min_time: float):
    """Warm up each model, then run them A B A B … until `repeats` rounds and `min_time` passed."""
    for session, feed in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - start < min_time:
        for session, feed, out in zip(sessions, feeds, times, strict=True):
            t0 = time.perf_counter_ns()
            session.run(None, feed)
            out.append((time.perf_counter_ns() - t0) / 1e6)
        rounds += 1
    return times


def _evaluate(
    reference: onnx.ModelProto,
    sessions: Sequence[ort.InferenceSession],
    labels: Sequence[str],
    data: Dataset,
) -> list[Evaluation]:
    """Each session's scores on `data` against the first output of `reference` (on the CPU
    provider), so that a provider's own rounding shows in its rows."""
    from onnxprune.compare.sweep import Evaluator

    evaluator = Evaluator(reference, data)
    scores = []
    for session, label in zip(sessions, labels, strict=True):
        try:
            got = evaluator.session_outputs(session)
        except Exception as exc:  # ORT raises several pybind exception types
            first = first_line(exc, 200)
            raise DataError(f"'{label}' cannot run on the evaluation data: {first}") from exc
        if got.shape != evaluator.reference.shape:
            raise DataError(
                f"the first output of '{label}' has shape {got.shape}, the reference "
                f"'{labels[0]}' has {evaluator.reference.shape}: they cannot be compared"
            )
        scores.append(evaluator.score(got))
    return scores


def _rows(labels, batch: int, times, costs, sizes, scores, cells) -> list[BenchRow]:
    """One row per (provider, model) cell; speedups against the first cell."""
    medians = [float(np.median(t)) for t in times]
    rows = []
    for i, (label, t, cost, median) in enumerate(zip(labels, times, costs, medians, strict=True)):
        q25, q75, p90 = np.percentile(t, [25, 75, 90])
        score = scores[i] if scores else None
        rows.append(
            BenchRow(
                model=label,
                batch=batch,
                params=cost.params,
                file_bytes=sizes[i],
                macs=cost.macs,
                median_ms=median,
                p90_ms=float(p90),
                iqr_ms=float(q75 - q25),
                mean_ms=float(np.mean(t)),
                throughput=batch * 1000.0 / median,
                speedup=medians[0] / median,
                ideal_speedup=costs[0].macs / cost.macs if cost.macs else None,
                unknown_nodes=len(cost.unknown),
                times_ms=tuple(t),
                accuracy=score.accuracy if score else None,
                agreement=score.agreement if score else None,
                rel_l2=score.rel_l2 if score else None,
                cosine=score.cosine if score else None,
                retrieval=score.retrieval if score else None,
                spearman=score.spearman if score else None,
                provider=cells[i][0],
            )
        )
    return rows
