"""int8 with every layer quantized vs the first and last weighted layers kept in float.

Accuracy on the digits test split (every digits CNN, original and pruned to 50 % fewer MACs with
the default `id`) and batch-1/32 latency of the same variants interleaved in one `benchmark`
call per model. Decides whether `--quantize int8` should keep the end layers float by default.

    python benchmarks/quantize_ends.py --out benchmarks/results/quantize_ends.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from quantize import digits_calibration, digits_variants

from onnxprune.calib.data import Dataset
from onnxprune.deploy.quantize import quantize
from onnxprune.measure.latency import benchmark

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ("vgg", "resnet", "mobilenetv2", "inception", "senet")


def compare(name: str, repeats: int) -> dict:
    """Accuracy and latency of float / int8 / int8 with float ends, original and pruned."""
    calib = digits_calibration()
    with np.load(ROOT / "models" / "digits32_test.npz") as data:
        test = Dataset({"input": data["input"]}, labels=data["labels"])
    built = digits_variants(name)
    variants = {}
    for label in ("original", "pruned"):
        variants[label] = built[label]
        variants[f"{label} int8"] = built["int8" if label == "original" else "pruned+int8"]
        ends = quantize(built[label], "int8", data=calib, float_ends=True)
        variants[f"{label} int8 ends float"] = ends
    result = benchmark(
        list(variants.values()), names=list(variants), batches=(1, 32), repeats=repeats,
        evaluation=test, evaluation_name="models/digits32_test.npz",
    )  # fmt: skip
    print(result.format_table())
    return result.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DIGITS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quantize_ends.json")
    args = parser.parse_args()
    out = {"load_average": os.getloadavg()}
    out["models"] = {name: compare(name, args.repeats) for name in args.models.split(",")}
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
