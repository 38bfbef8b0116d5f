"""Quick regression check on zoo exports: groups, prunable groups, and `magnitude --ratio 0.25`
(full checker, held-out rel-L2, MAC cut) — the part of `zoo.py` that takes seconds, for the
models whose full `zoo.py` run takes many minutes. 224×224 models only.

    python benchmarks/zoo_quick.py resnet50 densenet121 convnext_tiny vit_b_16
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import onnx

import onnxprune
from onnxprune.measure.verify import run

CACHE = os.environ.get("ONNXPRUNE_ZOO_CACHE", "/work/zoo_cache")


def check(name: str) -> dict:
    """Analysis counts and a checked magnitude prune at ratio 0.25 of one zoo export."""
    start = time.time()
    path = f"{CACHE}/{name}.onnx"
    analysis = onnxprune.analyze(path)
    model = onnx.load(path)
    key = model.graph.input[0].name
    with np.load(f"{CACHE}/calib_224.npz") as calib, np.load(f"{CACHE}/heldout_224.npz") as held:
        fit, test = calib[key], {key: held[key]}
    pruned = onnxprune.prune(model, method="magnitude", ratio=0.25, data={key: fit}, verify=False)
    onnx.checker.check_model(pruned.model, full_check=True)
    ref = next(iter(run(model, test).values()))
    got = next(iter(run(pruned.model, test).values()))
    before, after = pruned.report.macs
    return {
        "groups": len(analysis.groups),
        "prunable": sum(g.prunable for g in analysis.groups),
        "magnitude@0.25 rel_l2": round(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), 3),
        "mac_cut": round(1 - after / before, 3),
        "s": round(time.time() - start, 1),
    }


if __name__ == "__main__":
    for model_name in sys.argv[1:]:
        print(model_name, check(model_name), flush=True)
