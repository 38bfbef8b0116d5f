"""Prune a model past protobuf's 2 GB limit end to end, measuring time and peak memory.

Builds a Gemm+ReLU MLP whose weights (float32, in one external `.data` file, written layer by
layer so the builder never holds them all) exceed 2 GiB — default: 81920 → 6144 → 6144 → 6144 →
1000, 2.34 GB — then runs, each as its own `onnxprune` process: analyze, prune by magnitude
(data-free), prune by id on a small calibration set, and bench original vs id-pruned. For each
step: wall time, the process's peak RSS (`wait4`'s ru_maxrss), exit code, and the report's
numbers; the input files' hashes before and after. Writes `results/large_model.json`.

    python benchmarks/large_model.py                       # ~2.3 GB model in /tmp, several minutes
    python benchmarks/large_model.py --input 8192 --hidden 1024 --out /tmp/small.json   # smoke test
    python benchmarks/large_model.py --input 40960 --hidden 3072 --limit 100000000  # 0.6 GB, forced
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "large_model.json"


def main() -> None:
    args = _parse()
    with tempfile.TemporaryDirectory(prefix="onnxprune-large-", dir=args.tmp) as folder:
        work = Path(folder)
        start = time.perf_counter()
        # built in a spawned process: a child's ru_maxrss starts at its parent's RSS when forked,
        # so a parent that had held the weights would inflate every step's peak
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            shape = (args.input, args.hidden, args.layers, args.classes)
            model = pool.submit(build_mlp, work / "mlp.onnx", *shape).result()
        built = time.perf_counter() - start
        rng = np.random.default_rng(0)
        calib = rng.standard_normal((args.samples, args.input)).astype(np.float32)
        np.savez(work / "calib.npz", x=calib)
        before = _hashes(work, "mlp.onnx")
        chosen = {k: v for k, v in _steps(args).items() if k in args.steps.split(",")}
        limit = {"ONNXPRUNE_EXTERNAL_LIMIT": str(args.limit)} if args.limit else {}
        floor = _step(work, [], limit, command=[sys.executable, "-c", "pass"])["peak_rss_gb"]
        steps = {name: _step(work, cmd, limit) for name, cmd in chosen.items()}
        result = {
            "command": " ".join(sys.argv),
            "machine": _machine(),
            "model": {"file": str(model.name), "build_s": round(built, 1), **_sizes(work)},
            "calibration_samples": args.samples,
            "external_limit": args.limit or "default (1.8e9 bytes)",
            "peak_rss_floor_gb": floor,  # an empty child's: no step can report less
            "steps": steps,
            "input_unchanged": _hashes(work, "mlp.onnx") == before,
            "outputs": _sizes(work, ("mag", "id")),
        }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def build_mlp(path: Path, width_in: int, hidden: int, layers: int, classes: int) -> Path:
    """Write the MLP to `path` + `path.data`, one weight at a time (N(0, 1/fan_in) weights)."""
    rng = np.random.default_rng(0)
    data = path.with_name(f"{path.name}.data")
    nodes, inits, h = [], [], "x"
    widths = [width_in] + [hidden] * layers + [classes]
    with open(data, "wb") as out:
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            name = f"fc{i}"
            weight = _normal(rng, (fan_out, fan_in), 1 / np.sqrt(fan_in))
            inits.append(_external(f"{name}.w", weight, out, data.name))
            inits.append(
                helper.make_tensor(f"{name}.b", TensorProto.FLOAT, [fan_out], [0.0] * fan_out)
            )
            y = f"{name}_out"
            nodes.append(
                helper.make_node("Gemm", [h, f"{name}.w", f"{name}.b"], [y], name=name, transB=1)
            )
            if i < len(widths) - 2:
                h = f"r{i}_out"
                nodes.append(helper.make_node("Relu", [y], [h], name=f"r{i}"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width_in])
    logits = helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", classes])
    graph = helper.make_graph(nodes, "large_mlp", [x], [logits], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def _normal(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """float32 normal weights generated row block by row block (no float64 copy of it all)."""
    out = np.empty(shape, np.float32)
    for start in range(0, shape[0], 512):
        block = rng.standard_normal((min(512, shape[0] - start), shape[1]), dtype=np.float32)
        out[start : start + len(block)] = block * np.float32(scale)
    return out


def _external(name: str, array: np.ndarray, out, location: str) -> TensorProto:
    """A tensor whose data is appended to the open file `out` at a 4 KiB-aligned offset."""
    out.seek(-out.tell() % 4096, os.SEEK_CUR)
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    raw = array.tobytes()
    for key, value in (("location", location), ("offset", out.tell()), ("length", len(raw))):
        tensor.external_data.add(key=key, value=str(value))
    out.write(raw)
    return tensor


def _steps(args: argparse.Namespace) -> dict[str, list[str]]:
    """The onnxprune commands timed, in order (outputs and reports in the work folder)."""
    prune = ["mlp.onnx", "--ratio", str(args.ratio), "--verify-samples", "16"]
    return {
        "analyze": ["analyze", "mlp.onnx"],
        "prune_magnitude": [
            *prune,
            "--method",
            "magnitude",
            "-o",
            "mag.onnx",
            "--report",
            "mag.json",
        ],
        "prune_id": [
            *prune,
            "--method",
            "id",
            "--data",
            "calib.npz",
            "-o",
            "id.onnx",
            "--report",
            "id.json",
        ],
        "bench": [
            "bench",
            "mlp.onnx",
            *(["id.onnx"] if "prune_id" in args.steps else []),
            "--batch",
            "1",
            "--repeats",
            "5",
            "--warmup",
            "1",
            "--min-time",
            "0",
            "--threads",
            "1",
        ],
    }


def _step(
    work: Path, arguments: list[str], limit: dict[str, str], command: list[str] | None = None
) -> dict:
    """Run `onnxprune ARGUMENTS` (or `command`) in `work`: wall time, peak RSS, exit code, last
    lines, report."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **limit}
    command = command or [sys.executable, "-m", "onnxprune", *arguments]
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    step = {
        "command": "onnxprune " + " ".join(arguments),
        "exit": process.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
        "tail": output.strip().splitlines()[-12:],
    }
    if "--report" in arguments:
        step["report"] = _report(work / arguments[arguments.index("--report") + 1])
    return step


def _report(path: Path) -> dict | None:
    """The numbers of a prune report: sizes, parameters, MACs, verification."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    keys = ("params", "macs", "file_size", "verification")
    return {k: report.get(k) for k in keys}


def _sizes(work: Path, names: tuple[str, ...] = ("mlp",)) -> dict:
    """Bytes of each model file and its external data file."""
    return {
        f"{n}{suffix}_bytes": (work / f"{n}.onnx{suffix}").stat().st_size
        for n in names
        for suffix in ("", ".data")
        if (work / f"{n}.onnx{suffix}").exists()
    }


def _hashes(work: Path, name: str) -> dict[str, str]:
    """sha256 of the model file and its data file."""
    files = (work / name, work / f"{name}.data")
    return {p.name: hashlib.file_digest(open(p, "rb"), "sha256").hexdigest() for p in files}


def _machine() -> dict:
    """CPU, cores and memory of this machine."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gb": round(memory / 2**30, 1),
        "python": platform.python_version(),
    }


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=int, default=81920, help="input features")
    parser.add_argument("--hidden", type=int, default=6144, help="hidden width")
    parser.add_argument("--layers", type=int, default=3, help="hidden Gemm+ReLU layers")
    parser.add_argument("--classes", type=int, default=1000, help="output width")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples (id)")
    parser.add_argument("--ratio", type=float, default=0.5, help="channel ratio removed")
    parser.add_argument(
        "--steps", default="analyze,prune_magnitude,prune_id,bench", help="steps to run, in order"
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="ONNXPRUNE_EXTERNAL_LIMIT for the steps (bytes)"
    )
    parser.add_argument("--tmp", default=None, help="folder for the model (default: $TMPDIR)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
