"""Fine-tuning by distillation: test accuracy of the pruned digits CNNs before and after.

Every digits CNN is pruned with `id` (intercept + recalibration, the default) to 70 % and 85 %
fewer MACs (`--prune-residual`) from the 512 calibration images, then fine-tuned on those same
images only:
unlabeled (distillation from the original) and labeled (+ cross-entropy on the calibration
labels). Accuracy is measured on the disjoint test split; each fine-tune has a step count and a
wall-time cap so a model costs about two minutes of CPU (torch on one thread).

    python benchmarks/finetune.py --out benchmarks/results/finetune.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.measure.verify import run
from onnxprune.recover.finetune import finetune

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet", "senet", "vgg", "inception", "mobilenetv2")
KEEP = (0.30, 0.15)  # fraction of MACs kept: 70 % and 85 % fewer


def accuracy(model: onnx.ModelProto, test: np.lib.npyio.NpzFile) -> float:
    """Top-1 accuracy on the test split."""
    logits = run(model, {"input": test["input"]})[model.graph.output[0].name]
    return float(np.mean(logits.argmax(1) == test["labels"]))


def one(name: str, keep: float, steps: int, seconds: float, lr: float, warmup: float) -> dict:
    """Prune `name` to `keep` of its MACs, fine-tune it both ways, measure test accuracy."""
    calib = np.load(ROOT / "models/digits32_calib.npz")
    test = np.load(ROOT / "models/digits32_test.npz")
    teacher = onnx.load(ROOT / f"models/{name}.onnx")
    data = Dataset({"input": calib["input"]}, source="digits32_calib")
    start = time.monotonic()
    result = onnxprune.prune(
        teacher, method="id", target_macs=keep, prune_residual=True, data=dict(data.arrays)
    )
    pruned, macs = result.model, result.report.macs
    row = {
        "model": name,
        "fewer_macs": round(1 - keep, 2),
        "macs_kept": round(macs[1] / macs[0], 3),
        "original": accuracy(teacher, test),
        "pruned": accuracy(pruned, test),
        "prune_s": round(time.monotonic() - start, 1),
    }
    for kind, labels in (("distill", None), ("labels", calib["labels"])):
        result = finetune(
            pruned,
            teacher,
            data,
            steps=steps,
            lr=lr,
            labels=labels,
            max_seconds=seconds,
            warmup=warmup,
        )
        row[kind] = accuracy(result.model, test)
        row[f"{kind}_s"] = round(result.seconds, 1)
        row[f"{kind}_steps"] = f"{result.steps_run} (best {result.best_step}, {result.stopped})"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/finetune.json"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--max-seconds", type=float, default=45.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=0.5, help="no early stop before this share")
    parser.add_argument("--keep", default=",".join(map(str, KEEP)), help="fractions of MACs kept")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared, loaded machine: more threads only spin
    rows = []
    for name in args.models.split(","):
        for keep in (float(k) for k in args.keep.split(",")):
            rows.append(one(name, keep, args.steps, args.max_seconds, args.lr, args.warmup))
            print(json.dumps(rows[-1]), flush=True)
            Path(args.out).write_text(json.dumps({"options": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
