"""Work side by side in threads: thread_map's order, errors and context; pruning planned and
accumulated in threads gives the model planned on one; the rank-k bound and symbolic shape
inference kept off the expensive paths."""

from __future__ import annotations

import contextvars
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, reference_feeds, reference_path

import onnxprune
import onnxprune.methods.planner as planner
import onnxprune.threads as threads_module
from onnxprune.graph.session import THREADS_ENV
from onnxprune.threads import thread_map, worker_threads

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def test_items_are_mapped_in_order_in_several_threads(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "2")
    assert worker_threads() == 2
    seen: set[int] = set()

    def slow_square(i: int) -> int:
        seen.add(threading.get_ident())
        time.sleep(0.01 * (5 - i % 5))  # later items finish first
        return i * i

    assert thread_map(slow_square, range(10)) == [i * i for i in range(10)]
    assert len(seen) == 2 and threading.get_ident() not in seen


def test_one_thread_runs_in_the_caller(monkeypatch):
    """One core's share, or at most one item at a time (planning groups whose Grams are large)."""
    caller = [threading.get_ident()] * 3
    monkeypatch.setenv(THREADS_ENV, "1")
    assert thread_map(lambda _: threading.get_ident(), range(3)) == caller
    monkeypatch.setenv(THREADS_ENV, "2")
    assert thread_map(lambda _: threading.get_ident(), range(3), most=1) == caller


def test_the_first_error_in_item_order_is_raised_after_every_item_ended(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "2")
    ended: list[int] = []

    def work(i: int) -> int:
        time.sleep(0.02 if i == 1 else 0.0)
        ended.append(i)
        if i in (1, 3):
            raise ValueError(f"item {i}")
        return i

    with pytest.raises(ValueError, match="item 1"):
        thread_map(work, range(6))
    assert sorted(ended) == list(range(6))


def test_items_see_the_callers_context_variables(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "2")
    token = VAR.set("caller")
    try:
        assert thread_map(lambda _: VAR.get(), range(4)) == ["caller"] * 4
    finally:
        VAR.reset(token)


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_planning_and_statistics_in_threads_give_the_model_of_one_thread(name, monkeypatch):
    """Heads and FFN groups (ViT), residual streams (ResNet): each group's plan and each tap's
    sums are computed by one thread in the same order, so the models are equal byte for byte."""
    feeds = reference_feeds(name, 48)
    models = []
    for threads in (1, 2):  # ORT's own threads unchanged: only the work on our side moves
        monkeypatch.setattr(threads_module, "worker_threads", lambda n=threads: n)
        result = onnxprune.prune(
            reference_path(name), method="id", ratio=0.4, data=feeds, prune_residual=True
        )
        models.append(result.model.SerializeToString())
    assert models[0] == models[1]


def test_the_rank_k_bound_is_left_out_above_its_width_limit(monkeypatch):
    """err is reported for every pruned group; err/opt (≥ 1 by Eckart–Young; None where the
    optimum is ~0) only for groups no wider than BOUND_MAX_CHANNELS."""
    feeds = reference_feeds("vgg", 128)
    result = onnxprune.prune(reference_path("vgg"), method="id", ratio=0.5, data=feeds)
    rows = [row for row in result.report.groups if row.status == "pruned"]
    bounded = sorted(row.channels for row in rows if row.error_ratio is not None)
    assert len(set(bounded)) > 1
    assert all(row.error_ratio >= 1 - 1e-9 for row in rows if row.error_ratio is not None)
    limit = bounded[0]
    monkeypatch.setattr(planner, "BOUND_MAX_CHANNELS", limit)
    result = onnxprune.prune(reference_path("vgg"), method="id", ratio=0.5, data=feeds)
    after = [row for row in result.report.groups if row.status == "pruned"]
    assert [row.error for row in after] == [row.error for row in rows]
    for row, before in zip(after, rows, strict=True):
        assert row.error_ratio == (before.error_ratio if row.channels <= limit else None)
    assert any(row.error_ratio is not None for row in after)
    pairs = zip(after, rows, strict=True)
    assert any(b.error_ratio is not None and a.error_ratio is None for a, b in pairs)


def test_symbolic_shape_inference_loads_without_importing_torch():
    """onnxruntime.tools' __init__ imports torch where it is installed (seconds); the symbolic
    shape inference module needs only onnx and sympy."""
    code = (
        "import sys\n"
        "from onnxprune.measure.cost import _symbolic_shape_inference\n"
        "cls = _symbolic_shape_inference()\n"
        "assert cls is not None and cls.__name__ == 'SymbolicShapeInference'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
