"""CoB on the rotation-invariant TSRA-VGG: accuracy before fine-tuning vs parameters removed.

    python benchmarks/cob.py            # about 3 minutes on 2 shared cores

For each parameter-reduction target P (10–95 %), every group loses the channel fraction
p = 1 − √(1 − P) (the paper's rule, `--param-ratio`) and the pruned model is scored on the
digits test split without fine-tuning. Calibration uses the disjoint calibration split (512
images). Methods on the same TSRA model: cob (PCA rotation per TSRA subspace), cob with the
RMS-divisor correction, activation (mean |a|, no rotation: the paper's TSRA baseline) and id
(interpolative decomposition, the strongest rotation-free method here). The ReLU+BN+MaxPool
control is pruned with activation and id at the same P. Threshold rules run on cob alone.
The second part is CoB beyond the paper, on linear chains of an ordinary network. In
MobileNetV2 the linear bottleneck streams (projection conv → residual Add → next 1×1 expand)
have no nonlinearity, so cob uses the centred PCA with the mean folded into the consumer
biases: the optimal rank-k affine approximation of the taps. Only those two rotatable groups are
pruned (`--prune-residual`, every other group at ratio 0), against id with and without an
intercept, activation and magnitude. The third part is the opposite case: the digits ViT (both
exporters), whose patch conv, attention heads and FFN neurons cannot be rotated (a Transpose, the
softmax, the GELU), so cob rotates and slices its residual streams and plans the rest as id does;
against id (its defaults) and magnitude at the same channel ratio.
`--part tsra|linear|unrotatable` runs one part; results are merged.
Writes benchmarks/results/cob.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxprune
from onnxprune.methods.cob import channel_ratio_for_params

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CALIB = MODELS / "digits32_calib.npz"
TEST = MODELS / "digits32_test.npz"
TARGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
VARIANTS = {  # name: (model, method, options)
    "cob": ("tsra_vgg", "cob", {}),
    "cob+rms": ("tsra_vgg", "cob", {"rms_correction": True}),
    "activation": ("tsra_vgg", "activation", {}),
    "id": ("tsra_vgg", "id", {}),
    "relu activation": ("relu_vgg", "activation", {}),
    "relu id": ("relu_vgg", "id", {}),
}
LINEAR_GROUPS = ("/features/features.3/body/body.6/Conv", "/features/features.5/body/body.6/Conv")
LINEAR_METHODS = {
    "cob": ("cob", {}),
    "id": ("id", {}),
    "id+intercept": ("id", {"compensate": "bias"}),
    "activation": ("activation", {}),
    "magnitude": ("magnitude", {}),
}
UNROTATABLE_MODELS = ("vit", "vit.dynamo")
UNROTATABLE_METHODS = ("cob", "id", "magnitude")
THRESHOLDS = ("max:0.05", "max:0.1", "max:0.2", "mean:0.5", "median:0.5", "zscore:-0.5")


def logits(model: onnx.ModelProto | Path) -> np.ndarray:
    """Logits on the digits test split in ONNX Runtime (CPU, 2 threads)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    with np.load(TEST) as data:
        return session.run(None, {"input": data["input"]})[0].astype(np.float64)


def accuracy(values: np.ndarray) -> float:
    """Top-1 accuracy (%) of test-split logits."""
    with np.load(TEST) as data:
        return float(100 * np.mean(values.argmax(1) == data["labels"]))


def run(model: str, method: str, **options: object) -> dict:
    """Prune `model` and return its accuracy, parameters removed and the kept widths."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = onnxprune.prune(
            MODELS / f"{model}.onnx", method=method, data=str(CALIB), round_to=1,
            verify=False, **options,
        )  # fmt: skip
    before, after = result.report.params
    macs_before, macs_after = result.report.macs
    pruned, original = logits(result.model), logits(MODELS / f"{model}.onnx")
    errors = [p.info["err"] for p in result.plans.values() if "err" in p.info]
    return {
        "accuracy": accuracy(pruned),
        "logit_rel_l2": float(np.linalg.norm(pruned - original) / np.linalg.norm(original)),
        "params_removed": 1 - after / before,
        "macs_removed": 1 - macs_after / macs_before,
        "params": after,
        "widths": {name: len(plan.keep) for name, plan in result.plans.items()},
        "tap_error_max": max(errors) if errors else None,
        "seconds": time.perf_counter() - start,
    }


def linear_chains() -> dict:
    """MobileNetV2's two linear bottleneck streams pruned alone, by ratio and method."""
    out = {"groups": list(LINEAR_GROUPS), "baseline": accuracy(logits(MODELS / "mobilenetv2.onnx"))}
    for ratio in (0.25, 0.5, 0.75):
        recipe = {name: ratio for name in LINEAR_GROUPS}
        row = {
            name: run("mobilenetv2", method, ratio=0.0, recipe=recipe, prune_residual=True, **kw)
            for name, (method, kw) in LINEAR_METHODS.items()
        }
        out[f"{ratio:.2f}"] = row
        print("linear", ratio, {k: round(v["accuracy"], 2) for k, v in row.items()}, flush=True)
    return out


def unrotatable() -> dict:
    """The digits ViTs by cob (streams rotated, the rest planned as id), id and magnitude."""
    out: dict = {
        m: {"baseline": accuracy(logits(MODELS / f"{m}.onnx"))} for m in UNROTATABLE_MODELS
    }
    for model in UNROTATABLE_MODELS:
        for ratio in (0.1, 0.25, 0.5):
            row = {method: run(model, method, ratio=ratio) for method in UNROTATABLE_METHODS}
            out[model][f"{ratio:.2f}"] = row
            print(model, ratio, {k: round(v["accuracy"], 2) for k, v in row.items()}, flush=True)
    return out


def tsra() -> dict:
    """TSRA-VGG: fixed-ratio sweep and threshold rules, with the ReLU control."""
    out: dict = {
        "baseline": {m: accuracy(logits(MODELS / f"{m}.onnx")) for m in ("tsra_vgg", "relu_vgg")},
        "test_images": int(np.load(TEST)["labels"].size),
        "fixed": {},
        "threshold": {},
    }
    for target in TARGETS:
        ratio = channel_ratio_for_params(target)
        row = {}
        for name, (model, method, options) in VARIANTS.items():
            row[name] = run(model, method, ratio=ratio, **options)
        out["fixed"][f"{target:.2f}"] = {"channel_ratio": ratio, **row}
        print(target, {k: round(v["accuracy"], 2) for k, v in row.items()}, flush=True)
    for rule in THRESHOLDS:
        for rms in (False, True):
            key = rule + (" +rms" if rms else "")
            out["threshold"][key] = run("tsra_vgg", "cob", threshold=rule, rms_correction=rms)
            print(key, round(out["threshold"][key]["accuracy"], 2), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "tsra", "linear", "unrotatable"), default="all")
    part = parser.parse_args().part
    path = ROOT / "benchmarks" / "results" / "cob.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} cores (shared), {platform.system()}"
    out["calibration"] = str(CALIB.relative_to(ROOT))
    out["test"] = str(TEST.relative_to(ROOT))
    if part in ("all", "tsra"):
        out.update(tsra())
    if part in ("all", "linear"):
        out["linear_chains"] = linear_chains()
    if part in ("all", "unrotatable"):
        out["unrotatable"] = unrotatable()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
