"""ConvNeXt-Tiny with its channels-last block LayerNorms rebuilt from the kept channels.

Prunable MAC shares (default / --prune-residual), ratio 0 exactness, magnitude and id at each
ratio with --prune-residual (and without, for comparison): held-out rel-L2, MAC cut, checker,
interleaved batch-1 latency medians. `overhead` times the cost of the rebuilt norms alone:
every stream group keeps all its channels, in reversed order (a permutation, so every norm
over a stream is rebuilt at full width and the function is unchanged), against the original.

    python benchmarks/convnext_norm.py --out benchmarks/results/convnext_norm.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from zoo import (
    analysis_summary,
    evaluate,
    guarded,
    load_npz,
    ratio0_deviation,
    settings,
)

import onnxprune
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import export, load_model, normalize
from onnxprune.graph.rewrite import rewrite
from onnxprune.plan import Plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="/work/zoo_cache")
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--out", default="benchmarks/results/convnext_norm.json")
    parser.add_argument("--runs", default="magnitude@0.25,id@0.25,magnitude@0.5,id@0.5")
    parser.add_argument("--residual", default="1,0", help="prune_residual settings to run")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs-only", action="store_true", help="skip shares, ratio 0, overhead")
    parser.add_argument(
        "--profile-only", action="store_true", help="only ORT kernel times of `overhead`'s pair"
    )
    args = parser.parse_args()
    cache, out = Path(args.cache), Path(args.out)
    path = cache / f"{args.model}.onnx"
    calib, heldout = cache / "calib_224.npz", load_npz(cache / "heldout_224.npz")
    results: dict[str, Any] = {"settings": settings(args), "model": path.name}
    results["settings"]["command"] = "python benchmarks/convnext_norm.py " + " ".join(sys.argv[1:])

    def save() -> None:
        out.write_text(json.dumps(results, indent=1) + "\n")

    if args.profile_only:
        results["kernel_ms"] = kernel_times(path, heldout)
        save()
        return
    if not args.runs_only:
        results["analysis"] = guarded(analysis_summary, path)
        save()
        results["ratio0"] = guarded(ratio0_deviation, path, calib, heldout)
        save()
        results["overhead"] = guarded(overhead, path, heldout, args)
        save()
    runs = results.setdefault("runs", {})
    for residual in (bool(int(r)) for r in args.residual.split(",")):
        for run in args.runs.split(","):
            method, ratio = run.split("@")
            key = f"{run}{' --prune-residual' if residual else ''}"
            runs[key] = guarded(prune_run, path, method, float(ratio), residual, calib, heldout,
                                args)  # fmt: skip
            print(key, runs[key], file=sys.stderr, flush=True)
            save()


def prune_run(
    path: Path,
    method: str,
    ratio: float,
    residual: bool,
    calib: Path,
    heldout: dict,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Prune through the API (defaults of `method`), then check and measure the file."""
    start = time.perf_counter()
    result = onnxprune.prune(
        str(path), method=method, ratio=ratio, data=str(calib), prune_residual=residual,
        verify=False,
    )  # fmt: skip
    row: dict[str, Any] = {"prune_s": round(time.perf_counter() - start, 1)}
    ops = [n.op_type for n in result.model.graph.node]
    row["layernorms_left"] = ops.count("LayerNormalization")
    with tempfile.TemporaryDirectory() as tmp:
        pruned = Path(tmp) / "pruned.onnx"
        onnx.save(result.model, str(pruned))
        row.update(evaluate(path, pruned, heldout, args))
    return row


def reversed_streams(path: Path) -> tuple[onnx.ModelProto, int]:
    """The model with every coupled group (the stages' streams) keeping all its channels in
    reversed order, so each norm over a stream is rebuilt at full width (the same function);
    and the number of such groups."""
    graph = normalize(load_model(path))
    groups = analyze(graph)
    plans = {
        g.name: Plan(np.arange(g.channels)[::-1].copy()) for g in groups if g.prunable and g.coupled
    }
    return export(rewrite(graph, groups, plans)), len(plans)


def kernel_times(path: Path, heldout: dict, runs: int = 6) -> dict[str, Any]:
    """ORT's profiler, 1 thread, batch 1: mean node time per op type (ms) of the original and
    of `reversed_streams`, which separates the rebuilt ops' own cost from scheduling noise."""
    import onnxruntime as ort

    x = next(iter(heldout.values()))[:1]
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = Path(tmp) / "rebuilt.onnx"
        onnx.save(reversed_streams(path)[0], str(rebuilt))
        for name, model in (("original", path), ("rebuilt", rebuilt)):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / name)
            session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            feeds = {session.get_inputs()[0].name: x}
            for _ in range(runs):
                session.run(None, feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
            by_op: dict[str, float] = {}
            for event in events:
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    op = event["args"]["op_name"]
                    by_op[op] = by_op.get(op, 0.0) + event["dur"] / runs / 1000
            found[name] = {
                "total": round(sum(by_op.values()), 1),
                "by_op": {k: round(v, 2) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            }
    return found


def overhead(path: Path, heldout: dict, args: argparse.Namespace) -> dict[str, Any]:
    """`reversed_streams` timed against the original (interleaved medians)."""
    model, groups = reversed_streams(path)
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = Path(tmp) / "rebuilt.onnx"
        onnx.save(model, str(rebuilt))
        row = evaluate(path, rebuilt, heldout, args)
    row["groups"] = groups
    row["norms_rebuilt"] = sum(n.op_type == "LayerNormalization" for n in onnx.load(
        str(path), load_external_data=False).graph.node) - sum(
        n.op_type == "LayerNormalization" for n in model.graph.node)  # fmt: skip
    return row


if __name__ == "__main__":
    main()
