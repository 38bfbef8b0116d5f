"""The sequential refit against the one-shot maps, judged on the calibration photos alone.

The zoo's calib_224.npz photos are cut into K folds (photo i in fold i mod K); `id` (its
defaults, ratio 0.25, batch 8) is fitted on K−1 folds and the logit rel-L2 against the original
is taken on the remaining one, pooled over the K folds. The held-out photos are not read: this
is the evidence a choice may rest on (benchmarks/sequential.py --part zoo scores heldout_224).

    python benchmarks/sequential_cv.py --models resnet50 --out benchmarks/results/sequential_cv.json
    python benchmarks/sequential_cv.py --models resnet50 --no-recalibrate
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from onnxprune.measure.verify import run

CACHE = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", "/work/zoo_cache"))
VARIANTS = {"one-shot": {"sequential": False}, "sequential": {"sequential": True}}


def cross_validate(name: str, folds: int, ratio: float, **extra) -> dict:
    """Pooled held-fold logit rel-L2 and seconds of every variant."""
    model = onnx.load(CACHE / f"{name}.onnx")
    key = model.graph.input[0].name
    with np.load(CACHE / "calib_224.npz") as calib:
        photos = calib[key]
    reference = next(iter(run(model, {key: photos}).values()))
    cells = {}
    for label, options in VARIANTS.items():
        squares = norm = 0.0
        start = time.perf_counter()
        for fold in range(folds):
            held = np.arange(len(photos)) % folds == fold
            result = onnxprune.prune(model, method="id", ratio=ratio, data={key: photos[~held]},
                                     verify=False, batch_size=8, **options, **extra)  # fmt: skip
            got = next(iter(run(result.model, {key: photos[held]}).values()))
            squares += float(np.sum((got - reference[held]) ** 2))
            norm += float(np.sum(reference[held] ** 2))
        cells[label] = {
            "cv_rel_l2": (squares / norm) ** 0.5,
            "seconds": time.perf_counter() - start,
        }
        print(name, label, {k: round(v, 4) for k, v in cells[label].items()}, flush=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--no-recalibrate", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    extra = {"recalibrate": False} if args.no_recalibrate else {}
    results = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    for name in args.models.split(","):
        label = f"{name} @ {args.ratio}" + (" --no-recalibrate" if args.no_recalibrate else "")
        results[label] = cross_validate(name, args.folds, args.ratio, **extra)
        results[label]["meta"] = {
            "folds": args.folds,
            "machine": platform.processor() or platform.machine(),
            "load": os.getloadavg(),
            "date": time.ctime(),
        }
        if args.out:
            args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
