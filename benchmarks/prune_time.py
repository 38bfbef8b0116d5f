"""Pruning time and memory: `prune()` wall and CPU time ÷ one ORT forward pass over the same
calibration data, and peak RSS ÷ the model's weight bytes, per method, for one or more source
trees (interleaved, so a busy machine slows every tree alike).

Each measurement runs in a fresh interpreter (`--child`), so peak RSS is that of one call:
*prune* reads the data and the model, notes its RSS (the base: interpreter, libraries, data),
then times `onnxprune.prune(path, data=…, ratio=0.25, …)` (verification on its held-out share
included and also timed alone, interpreter start-up and imports not) and reports ru_maxrss.
*pass* times one ORT pass over the same samples in batches of 32 (1 for a fixed-batch model;
session creation and one warm-up batch not counted), median of three, and notes that process's
peak RSS: the memory of running the model over the data at all, against which a prune's peak
is also given as "pass + k× the weights". A prune is compared with the mean of the passes
measured just before and after it: wall ÷ wall, and CPU ÷ CPU (process time, every thread:
what survives a machine whose cores other jobs share).

    git archive <commit> | tar -x -C /tmp/base         # the tree to compare against
    python benchmarks/prune_time.py --trees before=/tmp/base,after=. \\
        --models resnet50,resnet,vgg,mobilenetv2 --out benchmarks/results/prune_time.json
    python benchmarks/prune_time.py --models resnet50 --samples 8 --methods id-defaults  # quick
    python benchmarks/prune_time.py --models resnet50 --methods id --crops 128  # more data

A zoo model's calibration data is the zoo's 32 crops (`calib_224.npz`), or with `--crops N`, N
crops of the same photos (`zoo_models.photo_crops`, seed 1, cached as `calib<N>_224.npz`): with
more data the fixed costs of pruning weigh less against the pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ZOO = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", "/work/zoo_cache"))
RATIO = 0.25
METHODS = {
    "magnitude": {"method": "magnitude"},
    "id": {"method": "id", "compensate": "none", "recalibrate": False, "sequential": False},
    "id-defaults": {"method": "id"},
    "id-one-shot": {"method": "id", "sequential": False},  # the defaults before the refit
    "biascomp": {"method": "biascomp"},
}


def model_files(name: str, crops: int = 0) -> tuple[Path, Path]:
    """The model and its calibration data: a zoo export (`resnet50`; `crops` > 0: that many crops
    instead of the zoo's 32) or a bundled digits model."""
    if (ZOO / f"{name}.onnx").is_file():
        size = 320 if name.startswith("yolo") else 224
        return ZOO / f"{name}.onnx", zoo_crops(size, crops) if crops else ZOO / f"calib_{size}.npz"
    data = "digits64_calib.npz" if name.startswith("mlp") else "digits32_calib.npz"
    return ROOT / "models" / f"{name}.onnx", ROOT / "models" / data


def zoo_crops(size: int, count: int) -> Path:
    """`count` calibration crops of the zoo's calibration photos at `size`, made once."""
    path = ZOO / f"calib{count}_{size}.npz"
    if not path.exists():
        from zoo_models import CALIB_PHOTOS, photo_crops

        key = "images" if size == 320 else "input"
        np.savez(path, **{key: photo_crops(CALIB_PHOTOS, count, size, seed=1)})
    return path


def load_data(path: Path, samples: int | None) -> dict[str, np.ndarray]:
    """The npz's input arrays (labels dropped), the first `samples` of each."""
    with np.load(path) as data:
        return {k: np.ascontiguousarray(data[k][:samples]) for k in data.files if k != "labels"}


def child_pass(model: Path, data: Path, samples: int | None) -> dict:
    """Wall and CPU seconds of one ORT pass over the data (medians of 3), and the peak RSS of
    the process that ran it (MB): what running the model over this data takes at all."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    x = next(iter(load_data(data, samples).values()))
    step = 1 if spec.shape[0] == 1 else 32
    batches = [x[i : i + step] for i in range(0, len(x), step)]
    session.run(None, {spec.name: batches[0]})
    times, cpu = [], []
    for _ in range(3):
        start, used = time.perf_counter(), time.process_time()
        for batch in batches:
            session.run(None, {spec.name: batch})
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - used)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "pass_s": statistics.median(times),
        "pass_cpu_s": statistics.median(cpu),
        "pass_peak_rss_mb": peak,
    }


def child_prune(model: Path, data: Path, samples: int | None, method: str) -> dict:
    """Wall and CPU seconds of one `prune()`, RSS before it and at its peak (MB)."""
    import onnx

    import onnxprune
    import onnxprune.api

    verify_s = timed(onnxprune.api, "_verification")
    feeds = load_data(data, samples)
    proto = onnx.load(str(model), load_external_data=False)
    weights = sum(
        math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in proto.graph.initializer
    )
    del proto
    base = rss_mb()
    cpu, start = time.process_time(), time.perf_counter()
    result = onnxprune.prune(str(model), ratio=RATIO, data=feeds, **METHODS[method])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    check = result.report.verification
    return {
        "prune_s": wall,
        "prune_cpu_s": cpu,
        "verify_s": sum(verify_s),
        "base_rss_mb": base,
        "peak_rss_mb": peak,
        "weights_mb": weights / 2**20,
        "rel_l2": check.rel_l2 if check else None,
        "macs_kept": result.report.macs[1] / result.report.macs[0],
    }


def timed(module: object, name: str) -> list[float]:
    """Wrap `module.name` so that the wall seconds of its calls land in the returned list."""
    seconds, call = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(module, name, wrapper)
    return seconds


def rss_mb() -> float:
    """This process's resident set now, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def spawn(tree: Path, *args: str) -> dict:
    """Run this script's `--child` in a fresh interpreter importing onnxprune from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, __file__, "--child", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(
    name: str, methods: list[str], trees: dict[str, Path], samples: int | None, crops: int = 0
) -> list:
    """Rows for one model: per method, a pass, a prune per tree, a pass again."""
    model, data = model_files(name, crops)
    common = [str(model), str(data), str(samples or 0)]
    rows, before = [], spawn(ROOT, "pass", *common)
    for method in methods:
        prunes = {label: spawn(tree, "prune", *common, method) for label, tree in trees.items()}
        after = spawn(ROOT, "pass", *common)
        passes = [p for p in (before, after) if "pass_s" in p]
        seconds = statistics.mean(p["pass_s"] for p in passes)
        cpu = statistics.mean(p["pass_cpu_s"] for p in passes)
        pass_peak = max(p["pass_peak_rss_mb"] for p in passes)
        for label, found in prunes.items():
            row = {"model": name, "method": method, "tree": label, "pass_s": seconds, **found}
            row["pass_cpu_s"], row["pass_peak_rss_mb"] = cpu, pass_peak
            if "prune_s" in found:
                row["prune_over_pass"] = found["prune_s"] / seconds
                row["cpu_over_pass"] = found["prune_cpu_s"] / cpu
                row["unverified_over_pass"] = (found["prune_s"] - found["verify_s"]) / seconds
                row["peak_over_weights"] = found["peak_rss_mb"] / found["weights_mb"]
                row["above_pass_over_weights"] = (found["peak_rss_mb"] - pass_peak) / found[
                    "weights_mb"
                ]
            rows.append(row)
            print(format_row(row), flush=True)
        before = after
    return rows


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['model']:<12} {row['method']:<12} {row['tree']:<7} error: {row['error']}"
    return (
        f"{row['model']:<12} {row['method']:<12} {row['tree']:<7} pass {row['pass_s']:6.2f} s  "
        f"prune {row['prune_s']:7.2f} s = {row['prune_over_pass']:5.1f}× (cpu "
        f"{row['cpu_over_pass']:5.1f}×, w/o verify {row['unverified_over_pass']:5.1f}×)  "
        f"RSS base {row['base_rss_mb']:5.0f} peak {row['peak_rss_mb']:6.0f} MB = "
        f"{row['peak_over_weights']:6.1f}× weights, pass {row['pass_peak_rss_mb']:5.0f} MB "
        f"+ {row['above_pass_over_weights']:4.1f}× weights "
        f"({row['weights_mb']:.1f} MB)  rel-L2 {row['rel_l2'] or 0:.4f}"
    )


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "load": os.getloadavg(), "python": sys.version}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, model, data, samples, *rest = sys.argv[2:]
        run = child_pass if kind == "pass" else child_prune
        print(json.dumps(run(Path(model), Path(data), int(samples) or None, *rest)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,resnet,vgg,mobilenetv2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--trees", default="after=.", help="label=path,... (onnxprune sources)")
    parser.add_argument("--samples", type=int, default=0, help="first N samples (0: all)")
    parser.add_argument("--crops", type=int, default=0, help="zoo models: N crops (0: the zoo's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    trees = {
        label: Path(path).resolve()
        for label, path in (item.split("=", 1) for item in args.trees.split(","))
    }
    started = time.time()
    rows = []
    for name in args.models.split(","):  # written after each model: a cut-short run keeps them
        rows += measure(name, args.methods.split(","), trees, args.samples or None, args.crops)
        info = {"machine": machine(), "platform": platform.platform(), "ratio": RATIO}
        info["crops"] = args.crops or None
        info["seconds"] = round(time.time() - started)
        if args.out:
            args.out.write_text(json.dumps({**info, "rows": rows}, indent=1) + "\n")
    print(f"{round(time.time() - started)} s, load {os.getloadavg()}")


if __name__ == "__main__":
    main()
