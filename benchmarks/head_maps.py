"""Attention-head maps chosen by cross-validation on torchvision ViT-B/16 (zoo cache): held-out
rel-L2 of the logits and the map each head group got.

`id` (defaults: intercept + recalibration) and `magnitude` at `--ratio` R over every prunable
group, and `id` on the heads alone (every other group excluded), calibrated on all 32 crops of
`calib_224.npz` (as `benchmarks/zoo_quick.py` does, no verification split) and scored on the 16
held-out photos of `heldout_224.npz`. For each head group the report's `map_<family>=<ridge>`
and `cv_err` (methods/heads.py) are recorded.

    ONNXPRUNE_ZOO_CACHE=/work/zoo_cache python benchmarks/head_maps.py --ratios 0.25,0.5

Writes `benchmarks/results/head_maps.json` (or `--out`) and prints one line per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
from benchmarks.accuracy import machine  # noqa: E402
from onnxprune.measure.verify import run  # noqa: E402

CACHE = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", "/work/zoo_cache"))
RESULTS = ROOT / "benchmarks" / "results" / "head_maps.json"
CELLS = {  # label: prune options
    "magnitude": {"method": "magnitude"},
    "id": {"method": "id"},
    "id heads only": {"method": "id", "heads_only": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b_16")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--cells", default=",".join(CELLS), help="labels from CELLS")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    path = str(CACHE / f"{args.model}.onnx")
    model = onnx.load(path)
    key = model.graph.input[0].name
    with np.load(CACHE / "calib_224.npz") as calib, np.load(CACHE / "heldout_224.npz") as held:
        fit, test = {key: calib[key]}, {key: held[key]}
    reference = next(iter(run(model, test).values()))
    groups = onnxprune.analyze(path).groups
    others = [f"^{re.escape(g.name)}$" for g in groups if g.head_dim == 1]
    heads = {g.name for g in groups if g.head_dim > 1}
    del model, groups  # ViT-B/16 is 330 MB a copy: every copy counts on a shared machine
    out = {"machine": machine(), "model": args.model, "load": os.getloadavg(), "cells": {}}
    for ratio in (float(r) for r in args.ratios.split(",")):
        for label in args.cells.split(","):
            options = dict(CELLS[label])
            exclude = others if options.pop("heads_only", False) else []
            start = time.perf_counter()
            result = onnxprune.prune(
                path, ratio=ratio, data=fit, verify=False, exclude=exclude, **options
            )
            got = next(iter(run(result.model, test).values()))
            before, after = result.report.macs
            maps = {
                name: dict(plan.info)
                for name, plan in result.plans.items()
                if name in heads and any(k.startswith("map_") for k in plan.info)
            }
            cell = {
                "rel_l2": float(np.linalg.norm(got - reference) / np.linalg.norm(reference)),
                "mac_cut": 1 - after / before,
                "maps": dict(Counter(_label(info) for info in maps.values())),
                "per_group": maps,
                "seconds": round(time.perf_counter() - start, 1),
            }
            out["cells"][f"{label}@{ratio}"] = cell
            summary = {k: v for k, v in cell.items() if k != "per_group"}
            print(label, ratio, summary, flush=True)
            args.out.write_text(json.dumps(out, indent=1) + "\n")
    out["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(out, indent=1) + "\n")


def _label(info: dict) -> str:
    """'family ridge' of a head group's report numbers."""
    name = next(k for k in info if k.startswith("map_"))
    return f"{name[4:]} {info[name]:.3g}"


if __name__ == "__main__":
    main()
