"""The Gram update of `calib/stats.py` before and after its fix, side by side in one run.

*before*: `rows.astype(float64, copy=False)` then `gram += rows.T @ rows` with OpenBLAS's default
threads (the code up to commit 42582e5); *after*: the same product on a contiguous float64 copy
inside `threadpool_limits(1, "blas")` (the current `TapAccumulator.add` and `collect`).
Each is timed on an idle machine and with N busy-loop processes started by this script (what
other jobs do to a shared machine); medians of interleaved repeats.

    python benchmarks/gram_update.py            # writes results/gram_update.json
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune.calib.stats as stats  # noqa: E402
from onnxprune.graph.analyze import analyze  # noqa: E402
from onnxprune.graph.load import export, load_model, normalize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gram_update.json"
SHAPES = ((128, 64, 16), (32, 64, 56), (512, 16, 8), (256, 128, 8))  # samples, channels, side
REPEATS = 5


def old_add(self, rows: np.ndarray) -> None:
    """TapAccumulator.add as it was before the fix (kept here for the comparison only)."""
    rows = rows.astype(np.float64, copy=False)
    self.n += rows.shape[0]
    self.sum += rows.sum(axis=0)
    self.abs_sum += np.abs(rows).sum(axis=0)
    self.gram += rows.T @ rows


@contextlib.contextmanager
def busy(processes: int):
    """`processes` busy loops for the duration (ended by their own pids)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        time.sleep(0.5 if procs else 0.0)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def tap_rows(samples: int, channels: int, side: int) -> np.ndarray:
    """A float32 NCHW activation as `channel_view` hands it over: a non-contiguous view."""
    array = np.random.default_rng(0).standard_normal((samples, channels, side, side))
    moved = np.moveaxis(array.astype(np.float32), 1, -1)
    return moved.reshape(samples, -1, channels).reshape(-1, channels)


def time_update(rows: np.ndarray, fixed: bool) -> float:
    """One update; the thread limit (entered once per pass in `collect`) is not timed."""
    acc = stats.TapAccumulator(rows.shape[1])
    limit = threadpool_limits(1, "blas") if fixed else contextlib.nullcontext()
    with limit:
        start = time.perf_counter()
        (acc.add if fixed else lambda r: old_add(acc, r))(rows)
        return time.perf_counter() - start


def time_collect(name: str, samples: int, fixed: bool) -> float:
    """`calib.stats.collect` on the taps of every prunable group (residual ones too), batch 32."""
    graph = normalize(load_model(ROOT / "models" / f"{name}.onnx"))
    groups = analyze(graph)
    x = np.load(ROOT / "models" / "digits32_calib.npz")["input"][:samples]
    taps = list(dict.fromkeys((tap, g.channels) for g in groups if g.prunable for tap in g.taps))
    batches = [{"input": x[i : i + 32]} for i in range(0, samples, 32)]
    model = export(graph)
    saved = stats.TapAccumulator.add, stats.threadpool_limits
    if not fixed:
        stats.TapAccumulator.add = old_add
        stats.threadpool_limits = lambda *a, **k: contextlib.nullcontext()
    try:
        start = time.perf_counter()
        stats.collect(model, taps, batches)
        return time.perf_counter() - start
    finally:
        stats.TapAccumulator.add, stats.threadpool_limits = saved


def main() -> None:
    out = {"command": "python benchmarks/gram_update.py", "repeats": REPEATS, "rows": []}
    for load in (0, 2):
        with busy(load):
            for shape in SHAPES:
                rows = tap_rows(*shape)
                times = {True: [], False: []}
                for _ in range(REPEATS):
                    for fixed in (False, True):
                        times[fixed].append(time_update(rows, fixed))
                out["rows"].append(_row("update", f"{rows.shape[0]}×{rows.shape[1]}", load, times))
            for name in ("resnet", "mobilenetv2", "vgg"):
                times = {True: [], False: []}
                for _ in range(3):
                    for fixed in (False, True):
                        times[fixed].append(time_collect(name, 256, fixed))
                out["rows"].append(_row("collect", f"{name}, 256 samples", load, times))
            print(json.dumps(out["rows"][-1]), flush=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(out))


def _row(kind: str, what: str, load: int, times: dict) -> dict:
    before, after = float(np.median(times[False])), float(np.median(times[True]))
    return {"kind": kind, "what": what, "busy_processes": load, "before_s": before,
            "after_s": after, "speedup": before / after}  # fmt: skip


def markdown(out: dict) -> str:
    lines = ["| what | busy loops | before | after | before ÷ after |", "|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['kind']}: {r['what']} | {r['busy_processes']} | "
                     f"{1e3 * r['before_s']:.1f} ms | {1e3 * r['after_s']:.1f} ms | "
                     f"{r['speedup']:.1f}× |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
