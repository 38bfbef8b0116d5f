"""How widths are chosen, measured: `--global` against near-uniform widths, and the rounding.

Every digits CNN is pruned to 50 / 70 / 85 % fewer MACs (`--target-macs`) by `id` and
`magnitude` with their defaults (and magnitude with `--recalibrate`), near-uniform (the default)
and with `--global`, and by `id` at `--round-to` 16 (default), 8 and 1. Fitted on 384
calibration samples; accuracy on the other 128 (validation, benchmarks/defaults.py's split)
decides, test accuracy is recorded beside it.

    python benchmarks/widths.py --out benchmarks/results/widths.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from benchmarks.defaults import pruned_cell, splits, top1

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("vgg", "resnet", "mobilenetv2", "inception", "senet")
REDUCTIONS = (0.5, 0.7, 0.85)
VARIANTS = {
    "id": {"method": "id"},
    "id --global": {"method": "id", "global_ranking": True},
    "id --round-to 8": {"method": "id", "round_to": 8},
    "id --round-to 1": {"method": "id", "round_to": 1},
    "magnitude": {"method": "magnitude"},
    "magnitude --global": {"method": "magnitude", "global_ranking": True},
    "magnitude --recalibrate": {"method": "magnitude", "recalibrate": True},
    "magnitude --recalibrate --global": {
        "method": "magnitude",
        "recalibrate": True,
        "global_ranking": True,
    },
}


def measure(name: str, variants: list[str]) -> dict:
    model = onnx.load(ROOT / "models" / f"{name}.onnx")
    fit, val, test = splits(name)
    cells = {"original": {"validation": top1(model, *val), "test": top1(model, *test)}}
    for reduction in REDUCTIONS:
        for label in variants:
            start = time.perf_counter()
            result = onnxprune.prune(
                model, target_macs=1 - reduction, data=fit, verify=False, **VARIANTS[label]
            )
            cell = pruned_cell(result, val, test, start)
            cells[f"{label} @ {reduction}"] = cell
            print(name, label, reduction, {k: round(v, 4) for k, v in cell.items()}, flush=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/widths.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.models.split(","):
        results[name] = {**results.get(name, {}), **measure(name, variants)}
        args.out.write_text(json.dumps(results, indent=1))
    for label in variants:
        values = [results[m].get(f"{label} @ {r}") for m in results for r in REDUCTIONS]
        if all(values):
            mean = np.mean([v["validation"] for v in values])
            print(f"{label}: mean validation accuracy {mean:.2%}")


if __name__ == "__main__":
    main()
