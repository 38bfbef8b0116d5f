"""Run the independent cells of a comparison one after another, in local worker processes, or as
Ray tasks, and gather their results in order.

A cell function `fn(shared, task)` is a module-level function (so that it pickles by name);
`shared` is what every cell reads (the model, the data, the evaluator) and travels once per
worker process (Ray: once into the object store), `task` is the cell's own few values. A cell
that raises is recorded as a `CellError` and the others go on. A worker process that dies (a
crash in native code, the OOM killer) breaks a process pool and every cell then in it: those
cells are rerun one at a time, each in a fresh process, so only the cell that kills its process
again is recorded as failed.

Each local worker limits ONNX Runtime, BLAS/OpenMP and torch to cores // workers threads so N
workers do not oversubscribe the machine; a Ray task asks for one CPU and uses one thread. Bars
and other progress output inside cells are off (several processes would garble one line); the
caller's bar counts finished cells.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import onnx

from onnxprune.errors import OnnxPruneError, UsageError, first_line
from onnxprune.graph.load import too_large_for_protobuf
from onnxprune.graph.session import THREADS_ENV
from onnxprune.progress import Bar, shown

LOCAL_RAY = "local"  # `ray=` value that starts a local Ray instance instead of joining a cluster
CellFunction = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class CellError:
    """A cell that failed: the one-line reason."""

    message: str


@dataclass(frozen=True)
class Backend:
    """Where cells run: `workers` local processes (1: in this process), or Ray when `ray` is
    set (`LOCAL_RAY` starts a local instance with `workers` CPUs, or all cores when `workers`
    is 1; anything else is a cluster address)."""

    workers: int = 1
    ray: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UsageError(f"'workers' must be at least 1; got {self.workers}")

    @property
    def parallel(self) -> bool:
        """Whether cells leave this process (so that what they share must be pickled)."""
        return self.workers > 1 or self.ray is not None

    def check_model(self, model: onnx.ModelProto) -> None:
        """UsageError when cells would need a copy of a model that pickling cannot carry."""
        if self.parallel and too_large_for_protobuf(model):
            raise UsageError(
                "a model past protobuf's 2 GB limit cannot be sent to worker processes",
                hint="run without --workers/--ray",
            )


def run_cells(
    fn: CellFunction, shared: Any, tasks: Sequence[Any], backend: Backend, label: str
) -> list[Any]:
    """`fn(shared, task)` for every task, in task order; a failed cell gives a `CellError`.
    A progress bar labelled `label` counts finished cells."""
    with Bar(len(tasks), label) as bar:
        if backend.ray is not None:
            return _on_ray(fn, shared, tasks, backend, bar)
        if backend.workers == 1 or len(tasks) <= 1:
            results = []
            for task in tasks:
                results.append(guarded(fn, shared, task))
                bar.update()
            return results
        return _in_processes(fn, shared, tasks, backend.workers, bar)


def guarded(fn: CellFunction, shared: Any, task: Any) -> Any:
    """`fn(shared, task)` with progress output off; any exception becomes a `CellError` (ours
    by its message, anything else prefixed with its type, as it is most likely a bug)."""
    try:
        with shown(False):
            return fn(shared, task)
    except OnnxPruneError as exc:
        return CellError(first_line(exc))
    except Exception as exc:  # a failing cell must not end the sweep
        return CellError(f"{type(exc).__name__}: {first_line(exc)}")


def threads_per_worker(workers: int) -> int:
    """The cores this process may use, shared among `workers` (at least one each)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


def limit_threads(threads: int) -> None:
    """Limit this process's ONNX Runtime sessions, BLAS/OpenMP pools and torch to `threads`."""
    from threadpoolctl import threadpool_limits

    for name in (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    threadpool_limits(threads)
    torch = sys.modules.get("torch")  # imported later, it reads OMP_NUM_THREADS set above
    if torch is not None:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- local processes

_SHARED: dict[str, Any] = {}  # a worker process's copy of `shared`, set by its initializer


def _in_processes(
    fn: CellFunction, shared: Any, tasks: Sequence[Any], workers: int, bar: Bar
) -> list[Any]:
    """All cells in a pool of `workers` spawned processes; the cells a broken pool took down
    are rerun alone, each in a fresh one-process pool."""
    results: dict[int, Any] = {}
    threads = threads_per_worker(workers)
    lost = _pool_round(fn, shared, tasks, range(len(tasks)), workers, threads, results, bar)
    for index in lost:
        _pool_round(fn, shared, tasks, [index], 1, threads, results, bar)
        results.setdefault(index, CellError("the worker process died while running this cell"))
    return [results[i] for i in range(len(tasks))]


def _pool_round(
    fn: CellFunction,
    shared: Any,
    tasks: Sequence[Any],
    indices: Sequence[int],
    workers: int,
    threads: int,
    results: dict[int, Any],
    bar: Bar,
) -> list[int]:
    """Run the cells `indices` in one pool, filling `results`; return the cells lost to a
    broken pool (not filled)."""
    context = multiprocessing.get_context("spawn")  # no forked copies of ORT's thread pools
    lost = []
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(shared, threads)
    ) as pool:
        futures: dict[Future, int] = {pool.submit(_worker_cell, fn, tasks[i]): i for i in indices}
        for future in as_completed(futures):
            index = futures[future]
            try:
                results[index] = future.result()
            except BrokenProcessPool:
                lost.append(index)
                continue
            bar.update()
    return sorted(lost)


def _start_worker(shared: Any, threads: int) -> None:
    """Process-pool initializer: keep `shared` for every cell of this worker, limit threads."""
    limit_threads(threads)
    _SHARED["value"] = shared


def _worker_cell(fn: CellFunction, task: Any) -> Any:
    return guarded(fn, _SHARED["value"], task)


# ----------------------------------------------------------------------------- Ray


def _on_ray(fn: CellFunction, shared: Any, tasks: Sequence[Any], backend: Backend, bar: Bar):
    """Every cell as a Ray task of one CPU; joins the cluster at `backend.ray`, or starts a
    local instance (shut down again at the end)."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        _start_ray(ray, backend)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_ray_cell)
        shared_ref = ray.put(shared)
        refs = {remote.remote(fn, shared_ref, task): i for i, task in enumerate(tasks)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            results[refs[ready[0]]] = _ray_result(ray, ready[0])
            bar.update()
        return [results[i] for i in range(len(tasks))]
    finally:
        if started:
            ray.shutdown()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UsageError(
            "--ray needs Ray, which is not installed", hint="pip install 'onnxprune[ray]'"
        ) from exc
    return ray


def _start_ray(ray: Any, backend: Backend) -> None:
    """`ray.init`: a local instance (`backend.workers` CPUs, all cores for 1), or the cluster."""
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": "error"}
    try:
        if backend.ray == LOCAL_RAY:
            cpus = backend.workers if backend.workers > 1 else threads_per_worker(1)
            ray.init(num_cpus=cpus, **options)
        else:
            ray.init(address=backend.ray, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot start or join Ray at '{backend.ray}': {first_line(exc)}") from exc


def _ray_cell(fn: CellFunction, shared: Any, task: Any) -> Any:
    """A Ray task: one thread (the task holds one CPU), then the guarded cell."""
    limit_threads(1)
    return guarded(fn, shared, task)


def _ray_result(ray: Any, ref: Any) -> Any:
    """The task's result, or a `CellError` when Ray lost the task or its worker."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        return CellError(f"Ray task failed: {first_line(exc)}")
