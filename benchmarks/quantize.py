"""Prune → quantize: latency of every variant side by side, and accuracy on the digits models.

Part 1 (latency, batch 1, interleaved in one `benchmark` call): the ResNet-18-like and
MobileNetV2-like 224×224 nets of `archs224.py` as original float32, int8 alone, pruned to
50 % fewer MACs, and pruned + int8 (static QDQ, per-channel weights, calibrated on 64 seeded
random inputs — latency does not depend on the calibration values).

Part 2 (accuracy on the held-out digits split): every digits CNN pruned to 50 % fewer MACs
(`id --compensate bias --recalibrate`, calibrated on the calibration split), then quantized to
int8 on the same calibration samples; test-split accuracy of original, original int8, pruned and
pruned int8.

    python benchmarks/quantize.py --out benchmarks/results/quantize.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.deploy.quantize import quantize
from onnxprune.measure.latency import benchmark
from onnxprune.measure.verify import run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ("vgg", "resnet", "mobilenetv2", "inception", "senet")


def latency(arch: str, repeats: int) -> dict:
    """Batch-1 latency of original / int8 / pruned / pruned+int8, one interleaved run."""
    from archs224 import export

    original = onnx.load(export(arch))
    rng = np.random.default_rng(0)
    calib = Dataset({"input": rng.standard_normal((64, 3, 224, 224)).astype(np.float32)})
    pruned = onnxprune.prune(
        original, method="magnitude", target_macs=0.5, verify=False, data=calib
    ).model
    variants = {
        "original": original,
        "int8": quantize(original, "int8", data=calib, batch_size=8),
        "pruned": pruned,
        "pruned+int8": quantize(pruned, "int8", data=calib, batch_size=8),
    }
    result = benchmark(list(variants.values()), names=list(variants), repeats=repeats)
    print(result.format_table())
    return {"rows": result.to_dict()["rows"], "settings": result.settings}


def digits_calibration() -> Dataset:
    """The 512 digits calibration images (pruning and int8 calibration both read them)."""
    with np.load(ROOT / "models" / "digits32_calib.npz") as data:
        return Dataset({"input": data["input"]})


def digits_variants(name: str) -> dict[str, onnx.ModelProto]:
    """Original, int8, pruned (`id --compensate bias --recalibrate`, the defaults, to 50 % fewer
    MACs) and pruned + int8 of the digits model `name`, all calibrated on the calibration split."""
    model = onnx.load(ROOT / "models" / f"{name}.onnx")
    calib = digits_calibration()
    pruned = onnxprune.prune(
        model, method="id", target_macs=0.5, compensate="bias", recalibrate=True, data=calib,
        verify=False,
    ).model  # fmt: skip
    return {
        "original": model,
        "int8": quantize(model, "int8", data=calib),
        "pruned": pruned,
        "pruned+int8": quantize(pruned, "int8", data=calib),
    }


def accuracy(name: str) -> dict:
    """Test-split top-1 of the digits model `name` before/after pruning and int8."""
    with np.load(ROOT / "models" / "digits32_test.npz") as data:
        x, labels = data["input"], data["labels"]
    variants = digits_variants(name)
    top1 = {}
    for label, variant in variants.items():
        logits = next(iter(run(variant, {"input": x}).values()))
        top1[label] = float(np.mean(logits.argmax(1) == labels))
    print(name, {k: f"{v:.2%}" for k, v in top1.items()})
    return top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quantize.json")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0]
    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "simd": "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other",
        },
        "accuracy": {name: accuracy(name) for name in DIGITS},
    }
    if not args.skip_latency:
        result["latency"] = {
            arch: latency(arch, args.repeats) for arch in ("resnet18", "mobilenetv2")
        }
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
