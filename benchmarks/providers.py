"""Execution providers side by side: original / int8 / pruned / pruned + int8 on every provider
this onnxruntime offers, timed interleaved in one `benchmark` call, scored on the test split.

The default onnxruntime wheel has only the CPU provider; the other rows need another wheel in
its own environment (they all install the `onnxruntime` module), for example OpenVINO's:

    python -m venv ov && ov/bin/pip install onnxruntime-openvino onnx onnx-graphsurgeon scipy \
        threadpoolctl
    PYTHONPATH=. ov/bin/python benchmarks/providers.py --out benchmarks/results/providers.json

Variants per digits model: pruned with the default `id` to 50 % fewer MACs on the calibration
split, int8 = static QDQ with per-channel weights calibrated on the same split. Accuracy is each
provider's own, on the held-out test split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort
from quantize import digits_variants

from onnxprune.calib.data import Dataset
from onnxprune.measure.latency import PROVIDERS, benchmark

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,mobilenetv2")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/providers.json")
    args = parser.parse_args()
    available = set(ort.get_available_providers())
    providers = [key for key, (name, _) in PROVIDERS.items() if name in available]
    with np.load(ROOT / "models" / "digits32_test.npz") as data:
        test = Dataset({"input": data["input"]}, labels=data["labels"])
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0]
    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "simd": "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other",
            "load_average": os.getloadavg(),
            "onnxruntime": ort.__version__,
            "providers": providers,
        },
        "models": {},
    }
    for name in args.models.split(","):
        built = digits_variants(name).items()
        models = {name if k == "original" else f"{name} {k}": m for k, m in built}
        bench = benchmark(
            list(models.values()),
            names=list(models),
            providers=providers,
            batches=tuple(int(b) for b in args.batch.split(",")),
            repeats=args.repeats,
            evaluation=test,
            evaluation_name="models/digits32_test.npz",
        )
        print(bench.format_table())
        result["models"][name] = bench.to_dict()
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
