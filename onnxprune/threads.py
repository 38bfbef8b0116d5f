"""Independent numerical items side by side in threads, one per core.

numpy's BLAS and LAPACK calls release the GIL, so items made of them (one group's plan: a pivoted
Cholesky, a ridge path, an eigendecomposition) run in parallel in threads of one process, each on
one BLAS thread (the callers hold `one_blas_thread`): no pickling, no spinning BLAS pools. Planning
ViT-B/16's 24 groups took half the wall time on two cores (docs/RESULTS.md).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from onnxprune.graph.session import default_threads

T = TypeVar("T")
R = TypeVar("R")


def thread_map(fn: Callable[[T], R], items: Iterable[T], *, most: int | None = None) -> list[R]:
    """`[fn(item) for item in items]`, computed in `worker_threads()` threads (at most `most`);
    the first exception in item order is raised once every item has ended. Each call runs in a
    copy of the caller's context (context variables such as `progress.shown`)."""
    items = list(items)
    threads = min(worker_threads(), len(items), most or len(items))
    if threads <= 1:
        return [fn(item) for item in items]
    context = contextvars.copy_context()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="onnxprune-worker") as pool:
        futures = [pool.submit(context.copy().run, fn, item) for item in items]
    return [future.result() for future in futures]


def worker_threads() -> int:
    """`$ONNXPRUNE_ORT_THREADS` where set (a parallel sweep's worker: its share of the cores),
    else the physical cores this process may use."""
    from onnxprune.measure.latency import physical_cores

    return default_threads() or physical_cores()
