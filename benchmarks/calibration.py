"""Calibration engine cost: throughput of the statistics and gradient passes, and their memory.

(a) Throughput (samples/s) on every digits reference model in `models/` (manifest.json; the
    legacy-exporter files), the first 256 calibration samples, batch 32, the taps of the groups a
    ratio-0.5 run selects (exactly as `calib.gather.gather` builds them). The passes are timed
    interleaved, `--repeats` times each (stats and grads once; grads on the first 128 samples),
    medians reported:
      plain      ORT forward of the normalized model (no extra outputs), session built outside
      taps-only  ORT forward with the tap tensors as extra outputs, no accumulation
      stats      `calib.stats.collect(model, taps, batches)` end to end (session build included)
      grads      `calib.grads.collect_gradients(model, products, batches)` end to end (Taylor
                 products of the same taps; interpreter build + check against ORT included)
    so `taps-only / plain` is the cost of exposing the taps (lost fusions, extra copies) and
    `stats / taps-only` adds the float64 accumulation (Σa, Σ|a|, Gram). `stats_blas1` is the
    same collect() under threadpoolctl's 1-thread BLAS limit: on 2 shared cores, OpenBLAS's own
    threads contending with ORT's made the Gram matmul up to ~100× slower.
(b) Peak memory of the statistics pass on the 224×224 ResNet-18-like model (random weights,
    random inputs generated batch by batch so the data itself is never held), batch 32, with
    128 and 1024 samples, each in a fresh subprocess (BLAS limited to 1 thread by default, see
    --memory-blas-threads): ru_maxrss before and after the pass, the maxrss trace per batch, and
    the tracemalloc peak of Python-side (numpy) allocations during it. The statistics stream in
    fixed memory, so the two settings should differ only by noise.

    python benchmarks/calibration.py           # ~4-6 min on 2 shared cores → calibration.json
    python benchmarks/calibration.py --quick   # smoke run → results/calibration.quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from onnxprune.budget import choose_widths  # noqa: E402
from onnxprune.calib.data import Batch  # noqa: E402
from onnxprune.calib.grads import Product, collect_gradients  # noqa: E402
from onnxprune.calib.stats import collect, with_outputs  # noqa: E402
from onnxprune.config import PruneConfig  # noqa: E402
from onnxprune.graph.analyze import analyze as find_groups  # noqa: E402
from onnxprune.graph.load import export, load_model, normalize  # noqa: E402
from onnxprune.measure.latency import physical_cores  # noqa: E402
from onnxprune.measure.verify import session_for  # noqa: E402
from onnxprune.options import WidthRule  # noqa: E402

MODELS = ROOT / "models"
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
    }


def selected_taps(model: onnx.ModelProto, ratio: float = 0.5):
    """The normalized model and (tap, channels) of the groups a `ratio` run selects, as gather()
    builds them."""
    graph = normalize(model)
    groups = find_groups(graph)
    config = PruneConfig(method="id", width=WidthRule(ratio=ratio))
    counts = choose_widths(graph, groups, config).counts
    selected = [g for g in groups if g.name in counts]
    taps = list(dict.fromkeys((tap, g.channels) for g in selected for tap in g.taps))
    return export(graph), taps, len(groups), len(selected)


# ----------------------------------------------------------------------------- (a) throughput


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(
    name: str,
    entry: dict,
    *,
    batch: int,
    repeats: int,
    samples: int | None,
    grad_samples: int,
    slow_repeats: int,
) -> dict:
    data = np.load(MODELS / entry["calib"])
    x, y = data["input"], data["labels"].astype(np.int64)
    if samples:
        x, y = x[:samples], y[:samples]
    model, taps, n_groups, n_selected = selected_taps(load_model(MODELS / entry["onnx"]))
    input_name = model.graph.input[0].name
    feeds = [{input_name: x[i : i + batch]} for i in range(0, len(x), batch)]
    labelled = [Batch(f, y[i * batch : (i + 1) * batch]) for i, f in enumerate(feeds)]
    names = sorted({tap.tensor for tap, _ in taps})
    grad_batches = max(1, grad_samples // batch)
    products = [Product(tap, tap, channels) for tap, channels in taps]

    t0 = time.perf_counter()
    plain = session_for(model)
    plain_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    tapped = session_for(with_outputs(model, names))
    tapped_build = time.perf_counter() - t0
    for f in feeds[:2]:  # warm-up
        plain.run(None, f)
        tapped.run(names, f)

    def stats_blas1():
        with threadpool_limits(limits=1, user_api="blas"):
            collect(model, taps, iter(feeds))

    passes = {
        "plain": lambda: [plain.run(None, f) for f in feeds],
        "taps_only": lambda: [tapped.run(names, f) for f in feeds],
        "stats": lambda: collect(model, taps, iter(feeds)),
        "stats_blas1": stats_blas1,
        "grads": lambda: collect_gradients(model, products, iter(labelled[:grad_batches])),
    }
    counts = {k: len(x) for k in passes} | {"grads": min(len(x), grad_batches * batch)}
    times: dict[str, list[float]] = {k: [] for k in passes}
    errors: dict[str, str] = {}
    for i in range(repeats):
        for key, fn in passes.items():
            if key in errors or (key in ("stats", "grads") and i >= slow_repeats):
                continue
            try:
                times[key].append(_timed(fn))
            except Exception as exc:  # a refusing interpreter is a result, not a crash
                errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    out = {
        "samples": len(x),
        "grad_samples": counts["grads"],
        "batch": batch,
        "groups": n_groups,
        "selected_groups": n_selected,
        "taps": len(taps),
        "tap_tensors": len(names),
        "tap_floats_per_sample": int(sum(_numel_per_sample(tapped, names, feeds[0]))),
        "session_build_s": {"plain": plain_build, "tapped": tapped_build},
        "errors": errors,
        "passes": {},
    }
    for key, ts in times.items():
        if ts:
            med = statistics.median(ts)
            out["passes"][key] = {
                "median_s": med,
                "samples_per_s": counts[key] / med,
                "times_s": ts,
            }
    base = out["passes"]["plain"]["samples_per_s"]
    for p in out["passes"].values():
        p["time_vs_plain"] = base / p["samples_per_s"]  # time per sample relative to plain
    print(
        f"  {name}: "
        + ", ".join(
            f"{k} {p['samples_per_s']:.0f}/s ({p['time_vs_plain']:.1f}×)"
            for k, p in out["passes"].items()
        )
        + (f"; errors {errors}" if errors else ""),
        flush=True,
    )
    return out


def _numel_per_sample(session, names, feed):
    values = session.run(names, feed)
    rows = next(iter(feed.values())).shape[0]
    return [v.size // rows for v in values]


# ----------------------------------------------------------------------------- (b) memory


def memory_child(samples: int, batch: int, blas_threads: int | None) -> dict:
    """Runs in a fresh interpreter: the statistics pass of the 224 ResNet-18 on `samples`."""
    import archs224

    model, taps, _, n_selected = selected_taps(onnx.load(str(archs224.export("resnet18"))))
    rng = np.random.default_rng(0)

    trace = []  # ru_maxrss (MiB) each time the pass asks for the next batch

    def batches():
        for start in range(0, samples, batch):
            trace.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            n = min(batch, samples - start)
            yield {"input": rng.standard_normal((n, 3, 224, 224), dtype=np.float32)}

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        stats = collect(model, taps, batches())
    elapsed = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state = sum(s.gram.nbytes + s.sum.nbytes + s.abs_sum.nbytes for s in stats.values())
    return {
        "samples": samples,
        "batch": batch,
        "blas_threads": blas_threads or "default",
        "selected_groups": n_selected,
        "taps": len(taps),
        "rows_seen": int(next(iter(stats.values())).n),
        "seconds": elapsed,
        "maxrss_before_mib": rss_before / 1024,
        "maxrss_after_mib": rss_after / 1024,
        "tracemalloc_peak_mib": traced_peak / 2**20,
        "stats_state_mib": state / 2**20,
        "maxrss_at_batch_mib": trace,
    }


def memory(settings: list[int], batch: int, blas_threads: int) -> dict:
    runs = []
    for samples in settings:
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            str(samples),
            "--batch",
            str(batch),
            "--memory-blas-threads",
            str(blas_threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"  {samples} samples: maxrss {row['maxrss_before_mib']:.0f} → "
            f"{row['maxrss_after_mib']:.0f} MiB, tracemalloc peak "
            f"{row['tracemalloc_peak_mib']:.1f} MiB, state {row['stats_state_mib']:.2f} MiB, "
            f"{row['seconds']:.1f} s",
            flush=True,
        )
        runs.append(row)
    lo, hi = runs[0], runs[-1]
    return {
        "command_per_setting": "python benchmarks/calibration.py --memory-child N --batch B "
        "--memory-blas-threads T",
        "runs": runs,
        "maxrss_diff_mib": hi["maxrss_after_mib"] - lo["maxrss_after_mib"],
        "tracemalloc_peak_diff_mib": hi["tracemalloc_peak_mib"] - lo["tracemalloc_peak_mib"],
    }


# ----------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = [
        "| model | samples | sel. groups / taps | plain ORT | taps-only | stats | "
        "stats, BLAS 1 thread | grads | stats ÷ plain | stats BLAS1 ÷ plain | grads ÷ plain |"
        " tapped session build |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["throughput"].items():
        p = r["passes"]

        def cell(key, p=p):
            return f"{p[key]['samples_per_s']:,.0f}/s" if key in p else "refused"

        def ratio(key, p=p):
            return f"{p[key]['time_vs_plain']:.1f}×" if key in p else "-"

        lines.append(
            f"| {name} | {r['samples']} ({r['grad_samples']}) | "
            f"{r['selected_groups']} / {r['taps']} | {cell('plain')} | "
            f"{cell('taps_only')} | {cell('stats')} | {cell('stats_blas1')} | "
            f"{cell('grads')} | {ratio('stats')} | {ratio('stats_blas1')} | "
            f"{ratio('grads')} | {r['session_build_s']['tapped'] * 1000:.0f} ms |"
        )
    mem = result.get("memory")
    if mem:
        lines += [
            "",
            "| samples | batch | BLAS threads | maxrss before pass | maxrss after pass "
            "| tracemalloc peak | statistics state | time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in mem["runs"]:
            lines.append(
                f"| {r['samples']} | {r['batch']} | {r['blas_threads']} | "
                f"{r['maxrss_before_mib']:.0f} MiB | "
                f"{r['maxrss_after_mib']:.0f} MiB | {r['tracemalloc_peak_mib']:.1f} MiB | "
                f"{r['stats_state_mib']:.2f} MiB | {r['seconds']:.1f} s |"
            )
        lines.append(
            f"\ndifference (largest − smallest setting): maxrss "
            f"{mem['maxrss_diff_mib']:+.1f} MiB, tracemalloc peak "
            f"{mem['tracemalloc_peak_diff_mib']:+.1f} MiB"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer samples/repeats")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--memory-blas-threads",
        type=int,
        default=1,
        help="BLAS threads in the memory runs (0 = library default; 1 keeps the "
        "1024-sample run short on a shared machine)",
    )
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        print(
            json.dumps(
                memory_child(args.memory_child, args.batch, args.memory_blas_threads or None)
            )
        )
        return
    repeats = args.repeats or (1 if args.quick else 3)
    samples, grad_samples = (64, 64) if args.quick else (256, 128)
    mem_settings = [32, 128] if args.quick else [128, 1024]
    out = args.out or RESULTS / ("calibration.quick.json" if args.quick else "calibration.json")
    t0 = time.perf_counter()
    result = {
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "throughput": {},
    }
    manifest = json.loads((MODELS / "manifest.json").read_text())["models"]
    print("== throughput", flush=True)
    for name, entry in manifest.items():
        result["throughput"][name] = throughput(
            name,
            entry,
            batch=args.batch,
            repeats=repeats,
            samples=samples,
            grad_samples=grad_samples,
            slow_repeats=1,
        )
    print("== memory (224×224 ResNet-18-like, fresh subprocess per setting)", flush=True)
    result["memory"] = memory(mem_settings, args.batch, args.memory_blas_threads)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["markdown"] = markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["markdown"])
    print(f"wrote {out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
