"""Does ONNX Runtime CPU run channel counts that are multiples of 4/8/16 faster per MAC?

Times one Conv (C_in = C_out = c, k×k, 'same' padding) for every c in a range plus a few
multiples of 8/16, all channel counts interleaved, and reports the median latency, picoseconds
per MAC normalised to the group's median (1.00 = typical; < 1 = more efficient), and, for each
candidate rounding r, how much of the ideal MAC saving pruning from ceil_r(c) down to c really
delivers. If that fraction is near 0, odd counts buy nothing and `--round-to r` costs nothing.

    python benchmarks/round_to.py                      # ~2-3 min on 2 cores
    python benchmarks/round_to.py --hw 28 --repeats 30 --channels 40-72
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.measure.latency import benchmark  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "round_to.json"
ROUNDINGS = (4, 8, 16)


def conv_model(channels: int, kernel: int, hw: int, depth: int = 1) -> onnx.ModelProto:
    """`depth` Convs (bias, ReLU between) with C_in = C_out = `channels` and dynamic batch.

    A chain amortises ORT's NCHW<->NCHWc reorders at the model boundary the way a real network
    does; a single Conv pays them on every run, which penalises multiples of 4/8/16 unfairly.
    """
    rng = np.random.default_rng(channels)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        w = rng.standard_normal((channels, channels, kernel, kernel)).astype(np.float32) * 0.1
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}"),
        ]
        y = "y" if i == depth - 1 else f"c{i}"
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [y], pads=[kernel // 2] * 4))
        if i < depth - 1:
            nodes.append(helper.make_node("Relu", [y], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        f"c{channels}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def parse_channels(text: str) -> list[int]:
    """'40-72,80,96' -> [40, 41, ..., 72, 80, 96]."""
    values: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        values.update(range(int(lo), int(hi or lo) + 1))
    return sorted(values)


def measure(channels: list[int], kernel: int, args: argparse.Namespace) -> list[dict]:
    """Median latency and normalised time per MAC for each channel count and batch."""
    models = [conv_model(c, kernel, args.hw, args.depth) for c in channels]
    result = benchmark(
        models,
        batches=args.batches,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        min_time=0.0,
    )
    rows = [
        {
            "kernel": kernel,
            "depth": args.depth,
            "channels": c,
            "batch": r.batch,
            "macs": r.macs,
            "median_ms": r.median_ms,
            "iqr_ms": r.iqr_ms,
            "ps_per_mac": r.median_ms * 1e9 / r.macs,
        }
        for r, c in zip(result.rows, channels * len(args.batches), strict=True)
    ]
    for batch in args.batches:
        group = [r for r in rows if r["batch"] == batch]
        typical = statistics.median(r["ps_per_mac"] for r in group)
        for r in group:
            r["norm_per_mac"] = r["ps_per_mac"] / typical
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (kernel, batch): mean normalised time/MAC by divisibility class, and the fraction of the
    ideal saving realised when pruning from the next multiple of r down to c."""
    out = []
    for key in sorted({(r["kernel"], r["batch"]) for r in rows}):
        group = {r["channels"]: r for r in rows if (r["kernel"], r["batch"]) == key}
        entry = {"kernel": key[0], "batch": key[1], "per_mac_by_class": _by_class(group)}
        for step in ROUNDINGS:
            entry[f"realised_saving_r{step}"] = _realised(group, step)
        out.append(entry)
    return out


def _by_class(group: dict[int, dict]) -> dict[str, float]:
    classes = {
        "mult16": lambda c: c % 16 == 0,
        "mult8": lambda c: c % 8 == 0 and c % 16,
        "mult4": lambda c: c % 4 == 0 and c % 8,
        "even": lambda c: c % 2 == 0 and c % 4,
        "odd": lambda c: c % 2,
    }
    return {
        name: round(statistics.mean(r["norm_per_mac"] for c, r in group.items() if test(c)), 3)
        for name, test in classes.items()
        if any(test(c) for c in group)
    }


def _realised(group: dict[int, dict], step: int) -> float | None:
    """Mean over c (not a multiple of `step`) of (1 - lat_c/lat_up) / (1 - macs_c/macs_up)."""
    fractions = []
    for c, row in group.items():
        up = group.get(-(-c // step) * step)
        if c % step and up is not None:
            ideal = 1 - row["macs"] / up["macs"]
            fractions.append((1 - row["median_ms"] / up["median_ms"]) / ideal)
    return round(statistics.median(fractions), 2) if fractions else None


def print_table(rows: list[dict], summary: list[dict]) -> None:
    for kernel in sorted({r["kernel"] for r in rows}):
        batches = sorted({r["batch"] for r in rows})
        depth = rows[0]["depth"]
        print(f"\n{depth} x Conv {kernel}x{kernel}: median ms (normalised time per MAC)")
        print("  C  " + "".join(f"{'batch ' + str(b):>22}" for b in batches))
        for c in sorted({r["channels"] for r in rows}):
            cells = [
                next(r for r in rows if (r["kernel"], r["channels"], r["batch"]) == (kernel, c, b))
                for b in batches
            ]
            mark = "*16" if c % 16 == 0 else "*8" if c % 8 == 0 else "*4" if c % 4 == 0 else ""
            print(
                f"{c:4d}{mark:4}"
                + "".join(f"{r['median_ms']:13.3f} ({r['norm_per_mac']:.2f})" for r in cells)
            )
    print(
        "\nsummary (per_mac: mean normalised time per MAC; realised_saving_rN: median fraction "
        "of the ideal MAC saving obtained by pruning from the next multiple of N to c)"
    )
    for entry in summary:
        print(json.dumps(entry))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--channels", default="40-72,32,80,96", help="Counts, e.g. 40-72,96.")
    parser.add_argument("--kernels", default="3,1", help="Kernel sizes.")
    parser.add_argument("--hw", type=int, default=56, help="Input height = width.")
    parser.add_argument("--depth", type=int, default=3, help="Convs chained per model.")
    parser.add_argument("--batches", default="1,8", help="Batch sizes.")
    parser.add_argument("--threads", type=int, default=None, help="Default: physical cores.")
    parser.add_argument("--warmup", type=int, default=5, help="Warm-up runs per model.")
    parser.add_argument("--repeats", type=int, default=50, help="Interleaved rounds.")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output file.")
    args = parser.parse_args(argv)
    args.batches = tuple(int(b) for b in args.batches.split(","))
    channels = parse_channels(args.channels)
    start = time.perf_counter()
    rows = [r for k in args.kernels.split(",") for r in measure(channels, int(k), args)]
    summary = summarize(rows)
    print_table(rows, summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(
        json.dumps(
            {
                "config": config,
                "channels": channels,
                "summary": summary,
                "rows": rows,
                "seconds": time.perf_counter() - start,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"\n{time.perf_counter() - start:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
