"""SE-Net digits: `id` (defaults) at MAC targets 0.5 and 0.3, test accuracy, on one tree.

Run it with the tree to measure on PYTHONPATH (before/after a change of the analyzer):

    PYTHONPATH=<tree> python benchmarks/gated_groups.py LABEL

The fit uses the calibration split; the test split is only reported, never used to choose.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import onnxprune
from onnxprune.measure.verify import run

MODELS = Path(__file__).resolve().parents[1] / "models"


def main(label: str) -> None:
    calib = np.load(MODELS / "digits32_calib.npz")
    test = np.load(MODELS / "digits32_test.npz")
    for target in (0.5, 0.3):
        result = onnxprune.prune(
            MODELS / "senet.onnx",
            method="id",
            target_macs=target,
            data={"input": calib["input"]},
            verify=False,
        )
        out = next(iter(run(result.model, {"input": test["input"]}).values()))
        accuracy = float(np.mean(out.argmax(1) == test["labels"]))
        reached = result.report.target.reached
        print(f"{label} target {target} reached {reached:.3f} accuracy {100 * accuracy:.2f} %")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "current")
