"""Planning time on fixed statistics: `make_plans` of one or more source trees on the same
groups and calibration statistics, its CPU time, and whether the plans agree.

The statistics are gathered once (`prune()` with the current tree, stopped at the plan stage,
its inputs pickled); each tree then plans them in a fresh interpreter on one BLAS thread, so
the comparison is free of the statistics pass and of the load between runs.

    git archive <commit> | tar -x -C /tmp/base         # the tree to compare against
    python benchmarks/plan_time.py --model vit_b_16 --samples 16 --trees before=/tmp/base,after=.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ZOO = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", "/work/zoo_cache"))


class Stop(Exception):
    """Raised in place of planning once its inputs are saved."""


def dump(model: str, samples: int | None, path: Path) -> None:
    """Run `prune()` (id, ratio 0.25, one-shot) up to the plan stage and pickle its inputs."""
    import onnxprune
    import onnxprune.api

    def save(*args):
        path.write_bytes(pickle.dumps(args))
        raise Stop

    onnxprune.api.make_plans = save
    with np.load(ZOO / "calib_224.npz") as data:
        feeds = {k: np.ascontiguousarray(data[k][:samples]) for k in data.files if k != "labels"}
    try:
        onnxprune.prune(str(ZOO / f"{model}.onnx"), ratio=0.25, data=feeds, method="id",
                        sequential=False)  # fmt: skip
    except Stop:
        return


def plan(inputs: Path, out: Path) -> None:
    """Plan the pickled inputs on one BLAS thread; print the CPU seconds, pickle the plans."""
    import scipy.linalg  # noqa: F401  (loaded before the limit: it covers loaded libraries)
    from threadpoolctl import threadpool_limits

    from onnxprune.methods.planner import make_plans

    args = pickle.loads(inputs.read_bytes())
    with threadpool_limits(1, "blas"):
        start = time.process_time()
        plans = make_plans(*args)
        print(f"{time.process_time() - start:.2f}")
    found = {
        name: (p.keep, {k: (c.M, c.c) for k, c in p.corrections.items()})
        for name, p in plans.items()
    }
    out.write_bytes(pickle.dumps(found))


def difference(a: dict, b: dict) -> tuple[bool, float]:
    """Whether the kept channels agree everywhere, and the largest relative map difference."""
    same, worst = a.keys() == b.keys(), 0.0
    for name in a.keys() & b.keys():
        same &= np.array_equal(a[name][0], b[name][0])
        for key, arrays in a[name][1].items():
            for x, y in zip(arrays, b[name][1].get(key, ()), strict=False):
                if x is not None and y is not None and np.shape(x) == np.shape(y):
                    scale = max(float(np.max(np.abs(x), initial=0.0)), 1e-300)
                    worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)) / scale)
    return same, worst


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        plan(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="a zoo model (224×224 input)")
    parser.add_argument("--samples", type=int, default=0, help="first N samples (0: all)")
    parser.add_argument("--trees", default="after=.", help="label=path,... (onnxprune sources)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="plan-time-") as folder:
        inputs = Path(folder) / "inputs.pkl"
        dump(args.model, args.samples or None, inputs)
        plans = {}
        for label, tree in (item.split("=", 1) for item in args.trees.split(",")):
            out = Path(folder) / f"{label}.pkl"
            env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
            command = [sys.executable, __file__, "--child", str(inputs), str(out)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            plans[label] = pickle.loads(out.read_bytes())
            print(f"{label}: make_plans {done.stdout.strip()} CPU s", flush=True)
        first, *rest = plans
        for label in rest:
            same, worst = difference(plans[first], plans[label])
            print(f"{label} vs {first}: same kept channels {same}, max rel map diff {worst:.1e}")
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
