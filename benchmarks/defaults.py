"""Which combination should plain `--method id` mean? Chosen on a validation split, never the test.

The calibration split of each digits model is cut in two (seeded): 384 samples fit the method,
128 validate it. Every variant — intercept (`--compensate bias`) on/off × recalibration on/off —
prunes every digits model to 50 / 70 / 85 % fewer MACs; the variant with the best mean
validation accuracy is the default (ties: the smaller validation deviation of the logits from
the original's). Test-split accuracy is recorded beside it for the report,
not used for the choice. All four without the sequential refit (benchmarks/sequential.py
measures that one against this choice).

    python benchmarks/defaults.py --out benchmarks/results/defaults.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.measure.verify import run

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("vgg", "resnet", "mobilenetv2", "inception", "senet", "mlp")
REDUCTIONS = (0.5, 0.7, 0.85)
VARIANTS = {
    "id": {"compensate": "none", "recalibrate": False, "sequential": False},
    "id + bias": {"compensate": "bias", "recalibrate": False, "sequential": False},
    "id + recalibrate": {"compensate": "none", "recalibrate": True, "sequential": False},
    "id + bias + recalibrate": {"compensate": "bias", "recalibrate": True, "sequential": False},
}


def splits(name: str) -> tuple[Dataset, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]:
    """(fit Dataset, validation (x, labels), test (x, labels)) for a digits model."""
    size = 64 if name == "mlp" else 32
    with np.load(ROOT / "models" / f"digits{size}_calib.npz") as data:
        x, labels = data["input"], data["labels"]
    order = np.random.default_rng(0).permutation(len(x))
    fit, val = order[:384], order[384:]
    with np.load(ROOT / "models" / f"digits{size}_test.npz") as data:
        test = (data["input"], data["labels"])
    return Dataset({"input": x[fit]}, labels=labels[fit]), (x[val], labels[val]), test


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return next(iter(run(model, {"input": x}).values())).astype(np.float64)


def top1(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits(model, x).argmax(1) == labels))


def pruned_cell(result: onnxprune.Result, val: tuple, test: tuple, start: float) -> dict:
    """Validation and test top-1, the MACs kept and the seconds since `start` of one prune."""
    return {
        "validation": top1(result.model, *val),
        "test": top1(result.model, *test),
        "macs_kept": result.report.macs[1] / result.report.macs[0],
        "seconds": time.perf_counter() - start,
    }


def measure(name: str) -> dict:
    model = onnx.load(ROOT / "models" / f"{name}.onnx")
    fit, val, test = splits(name)
    cells = {}
    for reduction in REDUCTIONS:
        for label, options in VARIANTS.items():
            start = time.perf_counter()
            pruned = onnxprune.prune(
                model, method="id", target_macs=1 - reduction, data=fit, verify=False, **options
            ).model
            ref, got = logits(model, val[0]), logits(pruned, val[0])
            cell = {
                "validation": top1(pruned, *val),
                "validation_rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                "test": top1(pruned, *test),
                "seconds": time.perf_counter() - start,
            }
            cells[f"{label} @ {reduction}"] = cell
            print(name, label, reduction, {k: round(v, 4) for k, v in cell.items()}, flush=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/defaults.json")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.models.split(","):
        results[name] = measure(name)
        args.out.write_text(json.dumps(results, indent=1))
    mean = {
        label: float(
            np.mean(
                [results[m][f"{label} @ {r}"]["validation"] for m in results for r in REDUCTIONS]
            )
        )
        for label in VARIANTS
    }
    deviation = {
        label: float(
            np.mean(
                [
                    results[m][f"{label} @ {r}"]["validation_rel_l2"]
                    for m in results
                    for r in REDUCTIONS
                ]
            )
        )
        for label in VARIANTS
    }
    print("mean validation accuracy:", {k: f"{v:.2%}" for k, v in mean.items()})
    print("mean validation rel-L2:", {k: f"{v:.3f}" for k, v in deviation.items()})
    print("chosen:", max(mean, key=lambda k: (round(mean[k], 3), -deviation[k])))


if __name__ == "__main__":
    main()
