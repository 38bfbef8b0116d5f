"""Measure onnxprune on the model zoo (real torchvision / ultralytics exports).

Per model file of `benchmarks/zoo_models.py`'s cache (legacy dynamic-batch exports, plus the
`.b1` and `.dynamo` variants):

- analysis: time of `onnxprune.analyze`, the share of the MACs (Conv, ConvTranspose, Gemm,
  MatMul, Einsum, LSTM/GRU/RNN) in groups that can be pruned (default, and with
  `--prune-residual`), and the blocking reasons ranked by the MACs of the blocked groups' nodes
  that no prunable group touches;
- MAC check: those MACs by the tool against an independent count from the shapes ONNX Runtime
  actually produces at batch 1 (ratio 1.0 = agree);
- ratio 0: `onnxprune.prune(ratio=0)` must reproduce the original (max |Δ| / max |y|);
- `magnitude` and `id` at ratio 0.25 and 0.5 through the CLI (exit code, one-line error): checker
  (full_check), ORT-runnable, rel-L2 deviation on the held-out photos (also against the
  output's variation across samples), MAC cut (tool's count and from ORT's shapes), ORT
  speedup at batch 1 (interleaved medians), and pruning wall time ÷ one ORT forward pass over
  the calibration data (the CLI time includes process start-up and its own verification).

Every stage's exception is caught and recorded as one line; results are written after each model.

    python benchmarks/zoo.py [--cache DIR] [--models a,b] [--reuse] [--repeats N]

Needs only the core dependencies (the models come from the cache; see zoo_models.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import onnxprune
from onnxprune.graph.load import export, load_model, normalize
from onnxprune.measure.cost import count
from onnxprune.measure.latency import benchmark

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "results" / "cache" / "zoo"
DEFAULT_OUT = HERE / "results" / "zoo.json"
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "LSTM", "GRU", "RNN", "Attention")
RUNS = (("magnitude", 0.25), ("magnitude", 0.5), ("id", 0.25), ("id", 0.5))
VARIANTS = {"legacy": "", "legacy_b1": ".b1", "dynamo": ".dynamo"}
VARIANTS |= {"tf2onnx": "", "tf2onnx_b1": ".b1"}  # keras_models.py's exports
VARIANTS |= {"paddle2onnx": "", "paddle2onnx_b1": ".b1"}  # paddle_models.py's exports


def main(argv: list[str] | None = None) -> None:
    """Measure each selected zoo file and rewrite the JSON after each one."""
    args = parse_args(argv)
    cache = Path(args.cache)
    entries = zoo_entries(json.loads((cache / "manifest.json").read_text()), cache)
    names = args.models.split(",") if args.models else list(entries)
    unknown = sorted(set(names) - set(entries))
    if unknown:
        sys.exit(f"unknown zoo model(s) {unknown}; the cache has {sorted(entries)}")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["settings"] = settings(args)
    models = results.setdefault("models", {})
    for name in names:
        if args.reuse and name in models:
            continue
        start = time.perf_counter()
        models[name] = measure_model(entries[name], args)
        models[name]["benchmark_s"] = round(time.perf_counter() - start, 1)
        models[name]["onnxprune_commit"] = results["settings"]["onnxprune_commit"]
        print(f"{name}: {models[name]['benchmark_s']} s", file=sys.stderr, flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: cache, subset, output, reuse, latency settings."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    default = os.environ.get("ONNXPRUNE_ZOO_CACHE", str(DEFAULT_CACHE))
    parser.add_argument("--cache", default=default, help="Zoo folder (zoo_models.py's output).")
    parser.add_argument("--models", default="", help="Comma-separated subset (default: all).")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="Results JSON.")
    parser.add_argument("--reuse", action="store_true", help="Keep models already in --out.")
    parser.add_argument("--repeats", type=int, default=10, help="Latency runs per model.")
    parser.add_argument("--min-time", type=float, default=1.0, help="Latency seconds per model.")
    parser.add_argument("--threads", type=int, default=1, help="ORT threads for latency.")
    return parser.parse_args(argv)


def zoo_entries(manifest: Mapping[str, Any], cache: Path) -> dict[str, dict[str, Any]]:
    """One entry per exported file: its path, calibration and held-out npz, input name."""
    entries = {}
    for model, info in manifest.items():
        for variant, form in info["files"].items():
            if "error" in form:
                continue
            entries[model + VARIANTS[variant]] = {
                "path": cache / form["file"],
                "calib": cache / f"calib_{info['size']}.npz",
                "heldout": cache / f"heldout_{info['size']}.npz",
                "export": form["how"],
            }
    return entries


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers were measured under."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    return {
        "command": "python benchmarks/zoo.py " + " ".join(sys.argv[1:]),
        "isa": "AVX-512" if " avx512f" in cpuinfo else "AVX2",
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "onnxprune_commit": commit,
        "latency": {
            "batch": 1,
            "threads": args.threads,
            "repeats_min": args.repeats,
            "min_time_s": args.min_time,
            "warmup": 2,
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def measure_model(entry: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of one file; a failing stage records its error and the rest go on."""
    path = entry["path"]
    heldout = load_npz(entry["heldout"])
    result: dict[str, Any] = {"file": path.name, "export": entry["export"]}
    result["analysis"] = guarded(analysis_summary, path)
    result["mac_check"] = guarded(mac_check, path, heldout)
    forward = guarded(forward_time, path, load_npz(entry["calib"]))
    result["forward_s"] = forward
    result["ratio0"] = guarded(ratio0_deviation, path, entry["calib"], heldout)
    result["runs"] = {
        f"{method}@{ratio}": run_cli(path, method, ratio, entry["calib"], heldout, args, forward)
        for method, ratio in RUNS
    }
    return result


def guarded(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, or {"error": one line} if it raises anything."""
    try:
        return fn(*args)
    except Exception as err:  # the benchmark records failures, it does not stop on them
        return {"error": one_line(err)}


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an npz file."""
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


# ----------------------------------------------------------------------------- analysis


def analysis_summary(path: Path) -> dict[str, Any]:
    """Analyze time, group counts, and prunable MAC shares with their blockers."""
    start = time.perf_counter()
    analysis = onnxprune.analyze(str(path))
    seconds = time.perf_counter() - start
    cost = count(export(normalize(load_model(path))))
    ops = {n.name: n.op_type for n in cost.per_node}
    macs = {n.name: n.macs for n in cost.per_node if n.op_type in MAC_OPS}
    groups = analysis.groups
    return {
        "analyze_s": round(seconds, 2),
        "groups": len(groups),
        "prunable_groups": sum(g.prunable for g in groups),
        "coupled_prunable_groups": sum(g.prunable and g.coupled for g in groups),
        "macs": analysis.macs,
        "default": mac_share(groups, macs, ops, prune_residual=False),
        "prune_residual": mac_share(groups, macs, ops, prune_residual=True),
    }


def mac_share(
    groups: Iterable[Any], macs: Mapping[str, int], ops: Mapping[str, str], *, prune_residual: bool
) -> dict[str, Any]:
    """Share of MAC-op MACs in nodes that some selectable group touches, and the blockers.

    A node's MACs shrink when any group it produces, passes or consumes is pruned, so it counts
    as prunable when one selectable group touches it. Each blocker (reason with quoted names
    elided, and the blocking node's op type) holds the MACs of its groups' nodes that no
    selectable group touches; a node blocked by two reasons counts for both.
    """
    groups = list(groups)
    selectable = [g for g in groups if g.prunable and (prune_residual or not g.coupled)]
    free = {n for g in selectable for n in members(g)}
    total = sum(macs.values())
    blockers: dict[str, dict[str, Any]] = {}
    for group in groups:
        if group in selectable:
            continue
        key = blocker_key(group, ops)
        row = blockers.setdefault(key, {"nodes": set(), "groups": 0, "example": None})
        row["nodes"] |= {n for n in members(group) if n in macs and n not in free}
        row["groups"] += 1
        row["example"] = row["example"] or example(group)
    ranked = sorted(blockers.items(), key=lambda kv: -sum(macs[n] for n in kv[1]["nodes"]))
    return {
        "share": sum(macs[n] for n in free if n in macs) / total if total else None,
        "blockers": [
            {
                "blocker": key,
                "mac_share": sum(macs[n] for n in row["nodes"]) / total if total else None,
                "groups": row["groups"],
                "example": row["example"],
            }
            for key, row in ranked
        ],
    }


def members(group: Any) -> set[str]:
    """The nodes whose work scales with the group's width."""
    return {*group.producers, *group.passthrough, *group.consumers}


def blocker_key(group: Any, ops: Mapping[str, str]) -> str:
    """`OpType: reason` with quoted names elided, so the same cause ranks as one row."""
    if group.prunable:
        return "coupled (residual Add): needs --prune-residual"
    reason = re.sub(r"'[^']*'", "'…'", group.reason or "")
    op = ops.get(group.blocker or "", "graph")  # a blocker that is no node: an output, an input
    return f"{op}: {reason}"


def example(group: Any) -> str:
    """One concrete instance of a blocker: group, reason and blocking node as the tool says."""
    where = f" at '{group.blocker}'" if group.blocker else ""
    return f"{group.name}: {group.reason or 'coupled'}{where}"


# ----------------------------------------------------------------------------- MAC check


def mac_check(path: Path, heldout: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The tool's MACs of the `MAC_OPS` at batch 1 against ORT-shape MACs."""
    model = onnx.load(str(path))
    cost = count(model)
    tool = sum(n.macs for n in cost.per_node if n.op_type in MAC_OPS)
    feeds = {k: v[:1] for k, v in heldout.items()}
    feeds = dict(zip([i.name for i in model.graph.input], feeds.values(), strict=False))
    independent = independent_macs(model, feeds)
    unknown = len(cost.unknown)
    return {
        "tool": tool,
        "ort_shapes": independent,
        "ratio": tool / independent,
        "unknown": unknown,
    }


def independent_macs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> int:
    """Conv/ConvTranspose/Gemm/MatMul/Einsum MACs from the shapes ONNX Runtime produces on `feeds`.

    Every non-constant input and output of those nodes becomes a graph output of a copy of the
    model, which runs unoptimised; weight shapes come from the initializers. Conv: output
    elements × C_in/group × kernel; ConvTranspose: input elements × C_out/group × kernel; Gemm:
    output elements × K; MatMul: output elements × K; Einsum: the product of its labels' sizes;
    LSTM/GRU/RNN: steps × batch × the elements of W and R; opset-23 Attention: q·kᵀ and
    weights·v for every query head. Nodes inside subgraphs or functions, and ops of other
    domains, are not counted.
    """
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in MAC_OPS and n.domain in ("", "ai.onnx")]
    wanted = {name for n in nodes for name in (*n.input[:3], n.output[0]) if name}
    shapes |= ort_shapes(model, sorted(wanted - set(shapes)), feeds)
    return sum(node_macs(node, shapes) for node in nodes)


def ort_shapes(
    model: onnx.ModelProto, names: list[str], feeds: Mapping[str, np.ndarray]
) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors `names` when ONNX Runtime runs `model` (no graph optimisation)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, ["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    values = session.run(outputs, dict(feeds))
    return {n: v.shape for n, v in zip(outputs, values, strict=True)}


def node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """MACs of one Conv, ConvTranspose, Gemm, MatMul, Einsum (explicit labels) or recurrent node
    from its actual input and output shapes."""
    out = int(np.prod(shapes[node.output[0]]))
    a, b = shapes[node.input[0]], shapes[node.input[1]]
    if node.op_type == "Einsum":  # one multiply-add per combination of the labels' indices
        equation = onnx.helper.get_attribute_value(node.attribute[0]).decode().replace(" ", "")
        terms = equation.split("->")[0].split(",")
        sizes = {
            k: n
            for term, shape in zip(terms, (a, b), strict=True)
            for k, n in zip(term, shape, strict=True)
        }
        return int(np.prod(list(sizes.values())))
    if node.op_type == "Attention":  # per query head: S × L dot products of q·k and of w·v
        v = shapes[node.input[2]]
        if len(a) == 4:  # (B, H, S, D)
            return a[0] * a[1] * a[2] * b[2] * (a[3] + v[3])
        attrs = {at.name: at.i for at in node.attribute}
        heads, kv_heads = attrs["q_num_heads"], attrs["kv_num_heads"]
        return a[0] * a[1] * b[1] * heads * (a[2] // heads + v[2] // kv_heads)
    if node.op_type in ("LSTM", "GRU", "RNN"):  # W·x and R·h per step, batch row, direction
        layout = any(at.name == "layout" and at.i for at in node.attribute)
        steps, batch = (a[1], a[0]) if layout else (a[0], a[1])
        return steps * batch * (int(np.prod(b)) + int(np.prod(shapes[node.input[2]])))
    if node.op_type == "Conv":
        return out * int(np.prod(b[1:]))
    if node.op_type == "ConvTranspose":  # each input element meets a C_out/group × kernel slice
        return int(np.prod(a)) * int(np.prod(b[1:]))
    if node.op_type == "Gemm":
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        return out * (a[0] if trans_a else a[1])
    return out * a[-1]  # MatMul


# ----------------------------------------------------------------------------- pruning


def forward_time(path: Path, calib: Mapping[str, np.ndarray]) -> float:
    """Seconds of one ORT pass over the calibration data (batch 1 loop if the batch is fixed)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    x = next(iter(calib.values()))
    batches = [x[i : i + 1] for i in range(len(x))] if inp.shape[0] == 1 else [x]
    session.run(None, {inp.name: batches[0][:1]})  # warm-up: allocations, kernel selection
    start = time.perf_counter()
    for batch in batches:
        session.run(None, {inp.name: batch})
    return round(time.perf_counter() - start, 3)


def ratio0_deviation(path: Path, calib: Path, heldout: Mapping[str, np.ndarray]) -> dict:
    """`prune(ratio=0)` through the whole pipeline: max |Δ| / max |y| over outputs, held-out."""
    result = onnxprune.prune(
        str(path), method="id", ratio=0.0, data=str(calib), allow_noop=True, prune_residual=True
    )
    ref, got = run_model(onnx.load(str(path)), heldout), run_model(result.model, heldout)
    pairs = zip(ref, got, strict=True)
    return {
        "max_rel_deviation": max(float(np.abs(g - r).max() / np.abs(r).max()) for r, g in pairs)
    }


def run_model(model: onnx.ModelProto | Path, data: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of `model` on `data` (sample by sample when its batch is fixed at 1)."""
    blob = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    x = next(iter(data.values()))
    batches = [x[i : i + 1] for i in range(len(x))] if inp.shape[0] == 1 else [x]
    runs = [session.run(None, {inp.name: b}) for b in batches]
    return [np.concatenate(parts) for parts in zip(*runs, strict=True)]


def run_cli(
    path: Path,
    method: str,
    ratio: float,
    calib: Path,
    heldout: Mapping[str, np.ndarray],
    args: argparse.Namespace,
    forward: Any,
    flags: Sequence[str] = (),
) -> dict[str, Any]:
    """Prune through the CLI (with extra `flags`), then check and measure the written file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.onnx"
        cmd = [sys.executable, "-m", "onnxprune", str(path), "--method", method]
        cmd += ["--ratio", str(ratio), "--data", str(calib), "-o", str(out), *flags]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {"exit": proc.returncode, "prune_s": round(seconds, 1)}
        if isinstance(forward, float):
            row["prune_over_forward"] = round(seconds / forward, 1)
        if proc.returncode != 0:
            row["traceback"] = "Traceback (most recent call last)" in proc.stderr
            row["error"] = cli_error(proc.stderr)
            return row
        row.update(evaluate(path, out, heldout, args))
    return row


def cli_error(stderr: str) -> str:
    """The CLI's one-line error, or the exception line of a traceback that escaped it."""
    lines = [x for x in stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("onnxprune: error")]
    if not errors and "Traceback (most recent call last)" in stderr:
        last = max(i for i, x in enumerate(lines) if x.startswith("Traceback"))
        errors = [x for x in lines[last + 1 :] if not x.startswith(" ")]
    return (errors or lines[-1:] or [""])[0][:400]


def evaluate(
    original: Path, pruned: Path, heldout: Mapping[str, np.ndarray], args: argparse.Namespace
) -> dict[str, Any]:
    """Checker, ORT run and deviation on held-out data, MAC cut, batch-1 speedup."""
    row: dict[str, Any] = {"checker": guarded(check, pruned)}
    try:
        ref, got = run_model(original, heldout), run_model(pruned, heldout)
        row["ort_runs"] = True
        pairs = list(zip(ref, got, strict=True))
        row["rel_l2"] = [float(np.linalg.norm(g - r) / np.linalg.norm(r)) for r, g in pairs]
        row["rel_l2_centered"] = [centered_deviation(r, g) for r, g in pairs]
    except Exception as err:  # a pruned file ORT cannot run is a result
        row["ort_runs"] = one_line(err)
        return row
    models = onnx.load(str(original)), onnx.load(str(pruned))
    row["mac_cut"] = 1 - count(models[1]).macs / count(models[0]).macs
    row["mac_cut_ort_shapes"] = guarded(ort_mac_cut, *models, heldout)
    if args.repeats > 0:  # 0: no timing (zoo_breadth.py)
        row["latency"] = guarded(speedup, original, pruned, args)
    return row


def ort_mac_cut(
    original: onnx.ModelProto, pruned: onnx.ModelProto, data: Mapping[str, np.ndarray]
) -> float:
    """1 − pruned / original MACs, both counted from ORT's shapes at batch 1."""
    feeds = {original.graph.input[0].name: next(iter(data.values()))[:1]}
    return 1 - independent_macs(pruned, feeds) / independent_macs(original, feeds)


def centered_deviation(ref: np.ndarray, got: np.ndarray) -> float:
    """‖got − ref‖ / ‖ref − mean over samples of ref‖: the deviation against what varies with
    the input. Plain rel-L2 looks small when a large input-independent part dominates (YOLO's
    box coordinates on the anchor grid)."""
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean(axis=0)))


def check(path: Path) -> bool:
    """The ONNX checker with full_check (shape inference included); raises on failure."""
    onnx.checker.check_model(str(path), full_check=True)
    return True


def speedup(original: Path, pruned: Path, args: argparse.Namespace) -> dict[str, float]:
    """Interleaved ORT medians at batch 1 and their ratio."""
    timing = benchmark(
        [str(original), str(pruned)],
        batches=(1,),
        threads=args.threads,
        warmup=2,
        repeats=args.repeats,
        min_time=args.min_time,
    )
    first, second = timing.rows
    return {
        "original_ms": round(first.median_ms, 2),
        "pruned_ms": round(second.median_ms, 2),
        "speedup": round(second.speedup, 3),
    }


if __name__ == "__main__":
    main()
