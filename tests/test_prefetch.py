"""prefetched: the next item is produced in a thread, in order, one ahead at most, errors raised
where they occur, no thread left behind; the statistics pass it drives gives the same sums."""

from __future__ import annotations

import contextvars
import threading

import numpy as np
import pytest
from conftest import reference_feeds, reference_path

import onnxprune.calib.stats as stats_module
from onnxprune.calib.prefetch import prefetched
from onnxprune.calib.stats import collect
from onnxprune.graph.groups import Tap
from onnxprune.graph.load import load_model


def _counting(n: int, produced: list[int], fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"item {i}")
        produced.append(threading.get_ident())
        yield i


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("onnxprune-prefetch")]


def test_items_come_in_order_produced_in_another_thread_one_ahead_at_most():
    produced: list[int] = []
    seen = []
    for item in prefetched(_counting(20, produced)):
        assert len(produced) <= item + 2  # this item and at most the next one
        seen.append(item)
    assert seen == list(range(20))
    assert threading.get_ident() not in produced
    assert not _prefetch_threads()


def test_an_error_of_the_items_is_raised_at_the_item_it_replaces():
    seen = []
    with pytest.raises(ValueError, match="item 3"):
        for item in prefetched(_counting(10, [], fail_at=3)):
            seen.append(item)
    assert seen == [0, 1, 2]
    assert not _prefetch_threads()


def test_stopping_early_ends_the_thread_and_advances_the_items_once_more_at_most():
    produced: list[int] = []
    items = prefetched(_counting(100, produced))
    for item in items:
        if item == 4:
            break
    items.close()
    assert len(produced) == 6  # items 0-4 and the one produced ahead
    assert not _prefetch_threads()


_SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="unset")


def test_the_items_see_the_callers_context_variables():
    """Regression: the progress bar's switch is a context variable, unset in a bare thread."""

    def values():
        for _ in range(3):
            yield _SEEN.get()

    token = _SEEN.set("caller's")
    try:
        assert list(prefetched(values())) == ["caller's"] * 3
    finally:
        _SEEN.reset(token)


def test_the_statistics_pass_gives_the_same_sums_as_a_serial_one(monkeypatch):
    """Every run in its own part (RUN_BYTES 1), prefetched as `collect` does and serially: the
    same sums, bit for bit (the order of the updates is the same)."""
    model = load_model(reference_path("resnet"))
    names = [t for n in model.graph.node if n.op_type == "Add" for t in n.input][:2]
    taps = [(Tap(tensor=name, axis=1, offset=0, spatial=1), 8) for name in names]
    feeds = reference_feeds("resnet", 12)
    monkeypatch.setattr(stats_module, "RUN_BYTES", 1)
    ahead = collect(model, taps, [feeds])
    monkeypatch.setattr(stats_module, "prefetched", lambda items: items)
    serial = collect(model, taps, [feeds])
    for tap, _ in taps:
        assert ahead[tap].n == serial[tap].n > 0
        np.testing.assert_array_equal(ahead[tap].gram, serial[tap].gram)
        np.testing.assert_array_equal(ahead[tap].sum, serial[tap].sum)
        np.testing.assert_array_equal(ahead[tap].abs_sum, serial[tap].abs_sum)
