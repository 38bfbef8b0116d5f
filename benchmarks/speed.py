"""Prove it is faster: measured vs ideal (MAC) speedup of pruned 224×224 models in ONNX Runtime.

For a ResNet-18-like and a MobileNetV2-like net (random weights, `benchmarks/archs224.py`) this
prunes with `method="magnitude"` to 75 / 50 / 25 % of the MACs (`target_macs`, default
round_to 16; ResNet also with `prune_residual=True`, and with round_to 1 at 50 %), then times the
original and every pruned variant *interleaved in one benchmark() call* (A B C … A B C …) at
batch 1 and 32, and reports per variant: MACs kept, ideal speedup (MAC ratio), measured speedup
(ratio of medians), measured/ideal, and the per-round paired ratio spread. At batch 32 the
original and the 50 % variants are also profiled with ORT's profiler (interleaved runs, per-node
median over runs) to split the time by op type (NCHWc Conv, NCHW FusedConv, Reorder*, pools …)
and by stage, with each op type's own speedup.

    python benchmarks/speed.py            # ~6-8 min on 2 shared cores → results/speed.json
    python benchmarks/speed.py --quick    # smoke run (~1-2 min) → results/speed.quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import archs224  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.measure.latency import benchmark, physical_cores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GOAL = 0.8  # measured/ideal speedup wanted at batch 32 for 50 % fewer MACs


# ----------------------------------------------------------------------------- machine


def machine() -> dict:
    """CPU model, core counts, load and library versions: every number is tied to these."""
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == "unknown":
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- pruning


def variants(arch: str, targets: tuple[float, ...]) -> list[dict]:
    """The pruning settings to compare for `arch` (each a row of the result tables)."""
    out = [
        {"name": f"mag{int(t * 100)}", "target_macs": t, "round_to": 16, "prune_residual": False}
        for t in targets
    ]
    if arch == "resnet18":
        out += [
            {
                "name": f"mag{int(t * 100)}+res",
                "target_macs": t,
                "round_to": 16,
                "prune_residual": True,
            }
            for t in targets
        ]
        if 0.5 in targets:
            out.append(
                {"name": "mag50 r1", "target_macs": 0.5, "round_to": 1, "prune_residual": False}
            )
    return out


def prune_all(original: onnx.ModelProto, settings: list[dict]) -> dict[str, onnx.ModelProto]:
    models = {}
    for v in settings:
        t0 = time.perf_counter()
        result = onnxprune.prune(
            original,
            method="magnitude",
            target_macs=v["target_macs"],
            round_to=v["round_to"],
            prune_residual=v["prune_residual"],
            verify_samples=8,
        )
        (p0, p1), (m0, m1) = result.report.params, result.report.macs
        v["prune_s"] = round(time.perf_counter() - t0, 2)
        v["macs_kept"] = m1 / m0
        v["params_kept"] = p1 / p0
        v["widths"] = {g.name: [g.channels, g.kept] for g in result.report.groups}
        v["notes"] = list(result.report.notes)
        print(
            f"  pruned {v['name']}: MACs kept {v['macs_kept']:.3f}, params kept "
            f"{v['params_kept']:.3f} ({v['prune_s']} s)",
            flush=True,
        )
        models[v["name"]] = result.model
    return models


# ----------------------------------------------------------------------------- latency


def paired_ratios(base: list[float], other: list[float]) -> dict:
    """Per-round speedups base[i]/other[i]: rounds are interleaved, so each pair saw the same
    machine state; their median and quartiles show how much the load moved the result."""
    r = np.asarray(base) / np.asarray(other)
    q25, q50, q75 = np.percentile(r, [25, 50, 75])
    return {"median": float(q50), "q25": float(q25), "q75": float(q75), "rounds": len(r)}


def time_models(
    models: dict[str, onnx.ModelProto], batch: int, *, warmup: int, repeats: int, min_time: float
) -> list[dict]:
    names = list(models)
    res = benchmark(
        list(models.values()),
        batches=(batch,),
        names=names,
        warmup=warmup,
        repeats=repeats,
        min_time=min_time,
    )
    print(res.format_table(), flush=True)
    base = res.rows[0]
    rows = []
    for r in res.rows:
        rows.append(
            {
                "model": r.model,
                "batch": r.batch,
                "macs": r.macs,
                "params": r.params,
                "median_ms": r.median_ms,
                "p90_ms": r.p90_ms,
                "iqr_ms": r.iqr_ms,
                "speedup": r.speedup,
                "ideal_speedup": r.ideal_speedup,
                "measured_over_ideal": r.speedup / r.ideal_speedup if r.ideal_speedup else None,
                "paired_speedup": paired_ratios(list(base.times_ms), list(r.times_ms)),
                "times_ms": list(r.times_ms),
            }
        )
    return rows


# ----------------------------------------------------------------------------- profiling


def profile(
    models: dict[str, onnx.ModelProto], batch: int, *, runs: int, warmup: int, threads: int
) -> dict[str, dict]:
    """Per model: per-op-type and per-stage time (ms per run), from interleaved profiled runs.

    Each node's time is its median over the `runs` runs (robust against the other jobs on a
    shared machine), then summed by op type. Convs converted by ORT's NCHWc transformer are
    labelled 'Conv[NCHWc]'; convs left in NCHW run as 'FusedConv'/'Conv'.
    """
    feed = {
        "input": np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    }
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, model in models.items():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.log_severity_level = 3
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / name.replace(" ", "_").replace("+", "_"))
            sessions[name] = ort.InferenceSession(
                model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )
        for s in sessions.values():
            for _ in range(warmup):
                s.run(None, feed)
        for _ in range(runs):
            for s in sessions.values():
                s.run(None, feed)
        return {name: _parse_profile(s.end_profiling(), warmup) for name, s in sessions.items()}


def _op_label(event: dict) -> str:
    op = event["args"]["op_name"]
    return f"{op}[NCHWc]" if "_nchwc" in event["name"] and op == "Conv" else op


def _conv_macs(event: dict) -> int:
    """MACs of a conv event from its logical shapes: |Y| · prod(W.shape[1:])."""
    shapes = [next(iter(s.values())) for s in event["args"]["input_type_shape"]]
    out = next(iter(event["args"]["output_type_shape"][0].values()))
    return math.prod(out) * math.prod(shapes[1][1:])


def _parse_profile(path: str, warmup: int) -> dict:
    events = json.loads(Path(path).read_text())
    os.unlink(path)
    model_runs = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e["name"] == "model_run"
    )[warmup:]
    per_node: dict[str, list[float]] = defaultdict(list)
    meta: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in model_runs):
            continue
        per_node[e["name"]].append(e["dur"] / 1000.0)
        if e["name"] not in meta:
            op = _op_label(e)
            out = next(iter(e["args"]["output_type_shape"][0].values()))
            conv = op.startswith(("Conv", "FusedConv"))
            meta[e["name"]] = {
                "op": op,
                "macs": _conv_macs(e) if conv else 0,
                "hw": out[-1] if len(out) == 4 else 1,
            }
    by_op: dict[str, float] = defaultdict(float)
    macs_by_op: dict[str, int] = defaultdict(int)
    by_stage: dict[str, dict] = defaultdict(
        lambda: {"conv_ms": 0.0, "conv_macs": 0, "other_ms": 0.0}
    )
    for name, times in per_node.items():
        ms, m = statistics.median(times), meta[name]
        by_op[m["op"]] += ms
        macs_by_op[m["op"]] += m["macs"]
        stage = by_stage[f"{m['hw']}x{m['hw']}"]
        if m["macs"]:
            stage["conv_ms"] += ms
            stage["conv_macs"] += m["macs"]
        else:
            stage["other_ms"] += ms
    total = sum(by_op.values())
    run_ms = [(hi - lo) / 1000.0 for lo, hi in model_runs]
    return {
        "runs": len(model_runs),
        "model_run_ms_median": statistics.median(run_ms) if run_ms else None,
        "node_sum_ms": total,
        "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "by_op_share": {k: v / total for k, v in by_op.items()},
        "by_op_macs": dict(macs_by_op),
        "nodes_by_op": _count_ops(meta),
        "by_stage": dict(by_stage),
        "conv_macs": sum(m["macs"] for m in meta.values()),
    }


def _count_ops(meta: dict[str, dict]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for m in meta.values():
        counts[m["op"]] += 1
    return dict(counts)


def _ps(ms: float, macs: int) -> float | None:
    return ms * 1e9 / macs if macs else None


def compare_profiles(profiles: dict[str, dict], base: str) -> dict[str, dict]:
    """Per pruned model and op type: time share in both models and the op type's speedup."""
    ref = profiles[base]
    out = {}
    for name, prof in profiles.items():
        if name == base:
            continue
        ops = sorted(
            set(ref["by_op_ms"]) | set(prof["by_op_ms"]), key=lambda k: -ref["by_op_ms"].get(k, 0)
        )
        rows = {}
        for op in ops:
            a, b = ref["by_op_ms"].get(op, 0.0), prof["by_op_ms"].get(op, 0.0)
            rows[op] = {
                "orig_ms": a,
                "pruned_ms": b,
                "orig_share": a / ref["node_sum_ms"],
                "pruned_share": b / prof["node_sum_ms"],
                "speedup": a / b if b and a else None,
                "ps_per_mac": [
                    _ps(a, ref["by_op_macs"].get(op, 0)),
                    _ps(b, prof["by_op_macs"].get(op, 0)),
                ],
                "nodes": [ref["nodes_by_op"].get(op, 0), prof["nodes_by_op"].get(op, 0)],
            }
        conv = [k for k in ops if k.startswith(("Conv", "FusedConv"))]
        conv_a = sum(ref["by_op_ms"].get(k, 0.0) for k in conv)
        conv_b = sum(prof["by_op_ms"].get(k, 0.0) for k in conv)
        out[name] = {
            "by_op": rows,
            "total_speedup": ref["node_sum_ms"] / prof["node_sum_ms"],
            "conv_time_speedup": conv_a / conv_b,
            "conv_mac_ratio": ref["conv_macs"] / prof["conv_macs"],
            "conv_ps_per_mac": [conv_a * 1e9 / ref["conv_macs"], conv_b * 1e9 / prof["conv_macs"]],
            "non_conv_ms": [ref["node_sum_ms"] - conv_a, prof["node_sum_ms"] - conv_b],
            "by_stage": {
                st: {
                    "conv_time_speedup": ref["by_stage"][st]["conv_ms"]
                    / max(prof["by_stage"].get(st, {}).get("conv_ms", 0.0), 1e-9),
                    "conv_mac_ratio": ref["by_stage"][st]["conv_macs"]
                    / max(prof["by_stage"].get(st, {}).get("conv_macs", 0), 1),
                    "orig_conv_ms": ref["by_stage"][st]["conv_ms"],
                    "pruned_conv_ms": prof["by_stage"].get(st, {}).get("conv_ms", 0.0),
                }
                for st in ref["by_stage"]
                if ref["by_stage"][st]["conv_macs"]
            },
        }
    return out


# ----------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = []
    for arch, data in result["archs"].items():
        lines += [
            f"#### {arch}",
            "",
            "| variant | round_to | residual | MACs kept | params kept | ideal | "
            "b1 speedup | b1 meas/ideal | b32 speedup | b32 meas/ideal | "
            "b32 paired (IQR) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        rows = {(r["model"], r["batch"]): r for b in data["bench"].values() for r in b}
        for v in data["variants"]:
            r1, r32 = (
                rows.get((v["name"], data["batches"][0])),
                rows.get((v["name"], data["batches"][1])),
            )
            p = r32["paired_speedup"]
            lines.append(
                f"| {v['name']} | {v['round_to']} | {'yes' if v['prune_residual'] else 'no'} | "
                f"{v['macs_kept']:.3f} | {v['params_kept']:.3f} | {r32['ideal_speedup']:.2f}× | "
                f"{r1['speedup']:.2f}× | {r1['measured_over_ideal']:.2f} | "
                f"{r32['speedup']:.2f}× | {r32['measured_over_ideal']:.2f} | "
                f"{p['median']:.2f} ({p['q25']:.2f}–{p['q75']:.2f}) |"
            )
        base = {b: rows[("original", b)]["median_ms"] for b in data["batches"]}
        lines += [
            "",
            "original median: " + ", ".join(f"batch {b}: {ms:.1f} ms" for b, ms in base.items()),
            "",
        ]
        for name, cmp in data.get("profile_compare", {}).items():
            lines += [
                f"Profile at batch {data['batches'][1]}, original vs **{name}** "
                f"(node-time speedup {cmp['total_speedup']:.2f}×, conv time "
                f"{cmp['conv_time_speedup']:.2f}× for conv MACs "
                f"{cmp['conv_mac_ratio']:.2f}×; conv ps/MAC "
                f"{cmp['conv_ps_per_mac'][0]:.1f} → {cmp['conv_ps_per_mac'][1]:.1f}; "
                f"non-conv ms {cmp['non_conv_ms'][0]:.1f} → {cmp['non_conv_ms'][1]:.1f}):",
                "",
                "| op type | nodes | orig ms | orig share | pruned ms | pruned share |"
                " speedup | ps/MAC orig → pruned |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for op, r in cmp["by_op"].items():
                sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}×"
                ps = " → ".join("-" if v is None else f"{v:.1f}" for v in r["ps_per_mac"])
                lines.append(
                    f"| {op} | {r['nodes'][0]} → {r['nodes'][1]} | {r['orig_ms']:.1f} | "
                    f"{r['orig_share']:.1%} | {r['pruned_ms']:.1f} | "
                    f"{r['pruned_share']:.1%} | {sp} | {ps} |"
                )
            lines += [
                "",
                "| stage (output H×W) | orig conv ms | pruned conv ms | conv time "
                "speedup | conv MAC ratio |",
                "|---|---|---|---|---|",
            ]
            for st, r in cmp["by_stage"].items():
                lines.append(
                    f"| {st} | {r['orig_conv_ms']:.1f} | {r['pruned_conv_ms']:.1f} | "
                    f"{r['conv_time_speedup']:.2f}× | {r['conv_mac_ratio']:.2f}× |"
                )
            lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    result = {
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "goal": f">= {GOAL} of ideal at batch 32, 50 % fewer MACs",
        "archs": {},
    }
    threads = physical_cores()
    for arch in args.archs:
        print(f"== {arch}", flush=True)
        original = onnx.load(str(archs224.export(arch)))
        settings = variants(arch, args.targets)
        pruned = prune_all(original, settings)
        models = {"original": original, **pruned}
        bench = {}
        for batch, repeats, warmup, min_time in (
            (args.batches[0], args.repeats_small, 3, 1.0),
            (args.batches[1], args.repeats_large, 1, 0.0),
        ):
            bench[str(batch)] = time_models(
                models, batch, warmup=warmup, repeats=repeats, min_time=min_time
            )
        profiled = {
            "original": original,
            **{k: v for k, v in pruned.items() if k.startswith("mag50")},
        }
        print(f"  profiling {list(profiled)} at batch {args.batches[1]}", flush=True)
        profiles = profile(
            profiled, args.batches[1], runs=args.profile_runs, warmup=1, threads=threads
        )
        result["archs"][arch] = {
            "batches": list(args.batches),
            "variants": settings,
            "bench": bench,
            "profiles": profiles,
            "profile_compare": compare_profiles(profiles, "original"),
        }
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 50 %% only, batch 1 and 4, few repeats"
    )
    parser.add_argument(
        "--archs", nargs="+", default=["resnet18", "mobilenetv2"], choices=sorted(archs224.ARCHS)
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.targets, args.batches = (0.5,), (1, 4)
        args.repeats_small, args.repeats_large, args.profile_runs = 5, 3, 2
    else:
        args.targets, args.batches = (0.75, 0.5, 0.25), (1, 32)
        args.repeats_small, args.repeats_large, args.profile_runs = 40, 20, 5
    out = args.out or RESULTS / ("speed.quick.json" if args.quick else "speed.json")
    t0 = time.perf_counter()
    result = run(args)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["markdown"] = markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["markdown"])
    print(f"wrote {out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
