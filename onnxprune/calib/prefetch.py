"""Produce the next item of an iterator in a thread while the caller works on the current one.

The statistics pass alternates ONNX Runtime runs with float64 Gram updates; both release the GIL,
so the next part can run through ONNX Runtime while the last part's Grams are summed. ONNX Runtime
already uses both cores of the machine measured, so the Grams only fill the gaps between its
operators: plain `id` on ResNet-50 took 0.91–0.95× the time (docs/RESULTS.md).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_END = object()


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """The items of `items`, in order, each produced in one worker thread while the caller
    holds the one before: at most one item is produced ahead (so at most two are alive).

    An exception raised by `items` is raised here, at the item it replaces. If the caller stops
    early (breaks, raises, or closes this generator), the item being produced is awaited and the
    thread ends before this generator does: no thread outlives it and `items` is never advanced
    by two threads at once. `items` runs in a copy of the caller's context (context variables:
    whether progress is shown, `progress.shown`)."""
    iterator, context = iter(items), contextvars.copy_context()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxprune-prefetch") as pool:
        pending = pool.submit(context.run, next, iterator, _END)
        while True:
            item = pending.result()
            if item is _END:
                return
            pending = pool.submit(context.run, next, iterator, _END)
            yield item
