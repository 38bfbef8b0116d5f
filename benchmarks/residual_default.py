"""Residual streams pruned by `id`'s defaults or not: the check on real exports.

A zoo export (calib_224 fits, heldout_224 is scored) is pruned by `id` with its defaults to a
MAC target, with residual streams pruned (`--prune-residual`) and left whole
(`--no-prune-residual`), and with `id`'s default (unset: the streams pruned where the target needs
it or where that deviates clearly less on the calibration photos). Recorded: held-out logit rel-L2
and top-1 agreement with the original, the MACs kept, the allocation chosen and the seconds of
the prune. The digits side of the choice (validation split) is
`benchmarks/tp_compare.py`'s `id` and `id --prune-residual` cells.

    python benchmarks/residual_default.py --models resnet50,mobilenet_v3_small --targets 0.7,0.5
    python benchmarks/residual_default.py --models mobilenet_v3_small --variants default
    python benchmarks/residual_default.py --models mobilenet_v3_small --variants default,--cv-widths
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from onnxprune.measure.cost import count
from onnxprune.measure.verify import run

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", "/work/zoo_cache"))
VARIANTS = {  # label → prune options besides the target
    "--no-prune-residual": {"prune_residual": False},
    "--prune-residual": {"prune_residual": True},
    "default": {},
    "--cv-widths": {"cv_widths": True},  # the default's candidates, scored held out
}


def measure(name: str, targets: tuple[float, ...], variants: tuple[str, ...]) -> dict:
    """Held-out rel-L2, top-1 agreement, MACs kept and seconds of both variants per target."""
    model = onnx.load(CACHE / f"{name}.onnx")
    key = model.graph.input[0].name
    with np.load(CACHE / "calib_224.npz") as calib, np.load(CACHE / "heldout_224.npz") as held:
        fit, test = {key: calib[key]}, {key: held[key]}
    reference = next(iter(run(model, test).values()))
    macs = count(model).macs
    cells = {}
    for target in targets:
        for label in variants:
            start = time.perf_counter()
            options = {"target_macs": target, "batch_size": 8, **VARIANTS[label]}
            result = onnxprune.prune(model, method="id", data=fit, verify=False, **options)
            seconds = time.perf_counter() - start
            got = next(iter(run(result.model, test).values()))
            cells[f"{label} @ {target}"] = cell = {
                "heldout_rel_l2": float(
                    np.linalg.norm(got - reference) / np.linalg.norm(reference)
                ),
                "heldout_top1_agreement": float(np.mean(got.argmax(1) == reference.argmax(1))),
                "macs_kept": count(result.model).macs / macs,
                "allocation": result.report.target.allocation,
                "seconds": seconds,
            }
            print(name, label, target, cell, flush=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v3_small")
    parser.add_argument("--targets", default="0.7,0.5", help="fractions of the MACs to keep")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/residual_default.json"
    )
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.models.split(","):
        targets, variants = tuple(map(float, args.targets.split(","))), args.variants.split(",")
        results[name] = {**results.get(name, {}), **measure(name, targets, tuple(variants))}
        results.setdefault("meta", {})[name] = {"load": os.getloadavg(), "date": time.ctime()}
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
