"""Sweep wall time, one process after another vs `--workers N` (and optionally `--ray`).

Runs the same `onnxprune sweep` command line as a subprocess (start-up included, as a user sees
it), alternating serial and parallel runs so that load from other jobs hits both alike, checks
that every run prints the same table, and writes the times, their medians and the load average.

    python benchmarks/sweep_workers.py --out benchmarks/results/sweep_workers.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = "magnitude,magnitude+lsq,id,id+bias"  # × 6 ratios = 24 cells


def sweep_command(args: argparse.Namespace) -> list[str]:
    """The sweep every run executes (latency off: timing cells while others run is unfair)."""
    return [
        sys.executable, "-m", "onnxprune", "sweep", args.model, "--methods", args.methods,
        "--ratios", args.ratios, "--data", args.data, "--eval", args.eval,
        "--calib-samples", str(args.calib_samples), "--no-latency",
    ]  # fmt: skip


def timed(command: list[str]) -> tuple[float, str]:
    """Wall seconds and stdout of one run; a failed run stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/resnet.onnx")
    parser.add_argument("--data", default="models/digits32_calib.npz")
    parser.add_argument("--eval", default="models/digits32_test.npz")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--ratios", default="0.2:0.7:0.1")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="also time --ray (local, --workers)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/sweep_workers.json"))
    args = parser.parse_args()
    base = sweep_command(args)
    variants = {"serial": base, f"workers {args.workers}": [*base, "--workers", str(args.workers)]}
    if args.ray:
        variants["ray"] = [*base, "--ray", "--workers", str(args.workers)]
    times: dict[str, list[float]] = {name: [] for name in variants}
    tables = set()
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, command in variants.items():
            seconds, out = timed(command)
            times[name].append(round(seconds, 2))
            tables.add(out)
            print(f"{name}: {seconds:.1f} s", flush=True)
        load.append(os.getloadavg()[0])
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "command": " ".join(base[1:]),
        "cores": os.cpu_count(),
        "times_s": times,
        "median_s": medians,
        "speedup": {n: round(medians["serial"] / m, 2) for n, m in medians.items()},
        "same_table": len(tables) == 1,
        "load_average_1min": [round(x, 1) for x in load],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
