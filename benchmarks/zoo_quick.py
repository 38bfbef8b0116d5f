"""Quick regression check on zoo exports: groups, prunable groups, and one prune at `--ratio`
(default `magnitude --ratio 0.25`; full checker, held-out rel-L2, MAC cut) — the part of
`zoo.py` that takes seconds, for the models whose full `zoo.py` run takes many minutes. The
calibration file follows the model's input size (calib_224.npz or calib_320.npz).

    python benchmarks/zoo_quick.py resnet50 densenet121 convnext_tiny vit_b_16 yolov8n
    python benchmarks/zoo_quick.py --method id resnet50
    python benchmarks/zoo_quick.py --method id --ratio 0.5 --exclude stem,mlp,proj timm_levit_128s
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx

import onnxprune
from onnxprune.measure.verify import run

CACHE = os.environ.get("ONNXPRUNE_ZOO_CACHE", "/work/zoo_cache")


def check(
    name: str, method: str = "magnitude", ratio: float = 0.25, exclude: tuple[str, ...] = ()
) -> dict:
    """Analysis counts and a checked prune by `method` at `ratio` of one zoo export, the groups
    matching `exclude` (the CLI's `--exclude` patterns) left whole."""
    start = time.time()
    path = f"{CACHE}/{name}.onnx"
    analysis = onnxprune.analyze(path)
    model = onnx.load(path)
    key = model.graph.input[0].name
    size = model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    with np.load(f"{CACHE}/calib_{size}.npz") as calib:
        fit = calib[key]
    with np.load(f"{CACHE}/heldout_{size}.npz") as held:
        test = {key: held[key]}
    pruned = onnxprune.prune(
        model, method=method, ratio=ratio, data={key: fit}, verify=False, exclude=list(exclude)
    )
    onnx.checker.check_model(pruned.model, full_check=True)
    ref = next(iter(run(model, test).values()))
    got = next(iter(run(pruned.model, test).values()))
    before, after = pruned.report.macs
    return {
        "groups": len(analysis.groups),
        "prunable": sum(g.prunable for g in analysis.groups),
        f"{method}@{ratio} rel_l2": round(_rel_l2(got, ref), 3),
        "mac_cut": round(1 - after / before, 3),
        "s": round(time.time() - start, 1),
    }


def _rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help=f"zoo export names (files in {CACHE})")
    parser.add_argument("--method", default="magnitude")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--exclude", default="", help="comma-separated group name patterns")
    args = parser.parse_args()
    exclude = tuple(p for p in args.exclude.split(",") if p)
    for model_name in args.models:
        print(model_name, check(model_name, args.method, args.ratio, exclude), flush=True)
