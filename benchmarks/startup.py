"""Start-up time of the command line: `onnxprune --help` and `onnxprune analyze`, per source tree.

Each tree is a checkout of onnxprune (e.g. the current one and `git archive <commit>` of an older
one); every command runs in a fresh interpreter with PYTHONPATH set to the tree, all trees
interleaved round by round. `import onnx` alone is timed too: it bounds `analyze` from below.
Wall time depends on the machine's load; CPU time (user + sys of the child) much less.

    python benchmarks/startup.py --trees before=/tmp/base,after=. --rounds 5 \
        --out benchmarks/results/startup.json
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
from pathlib import Path

COMMANDS = {
    "onnxprune --help": ["-m", "onnxprune", "--help"],
    "onnxprune analyze models/vgg.onnx": ["-m", "onnxprune", "analyze", "models/vgg.onnx"],
    "python -c 'import onnx'": ["-c", "import onnx"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default="current=.", help="NAME=PATH,... source trees")
    parser.add_argument("--rounds", type=int, default=5, help="runs per command and tree")
    parser.add_argument("--out", help="write the JSON here (default: stdout only)")
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    result = measure({k: Path(v).resolve() for k, v in trees.items()}, args.rounds)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def measure(trees: dict[str, Path], rounds: int) -> dict:
    """Median wall and CPU seconds per (tree, command), interleaved over `rounds` rounds."""
    times: dict[tuple[str, str], list[tuple[float, float]]] = {
        (t, c): [] for t in trees for c in COMMANDS
    }
    load = [os.getloadavg()[0]]
    for _ in range(rounds):
        for command, argv in COMMANDS.items():
            for name, root in trees.items():
                times[(name, command)].append(_run(root, argv))
    load.append(os.getloadavg()[0])
    return {
        "machine": _machine(),
        "loadavg_1min_start_end": load,
        "rounds": rounds,
        "trees": {k: str(v) for k, v in trees.items()},
        "results": [
            {
                "tree": name,
                "command": command,
                "wall_median_s": round(statistics.median(w for w, _ in runs), 3),
                "cpu_median_s": round(statistics.median(c for _, c in runs), 3),
                "wall_s": [round(w, 3) for w, _ in runs],
            }
            for (name, command), runs in times.items()
        ],
    }


def _run(root: Path, argv: list[str]) -> tuple[float, float]:
    """(wall, user + sys CPU) seconds of one fresh interpreter running `argv` in `root`."""
    env = {"PYTHONPATH": str(root), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, *argv], cwd=root, env=env, stdout=subprocess.DEVNULL, check=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def _machine() -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "avx512f": " avx512f" in flags,
        "avx2": " avx2" in flags,
    }


if __name__ == "__main__":
    main()
