"""Sequential corrections (`--sequential`) against the one-shot fit, with `id`'s defaults.

Digits CNNs: each model's 512 calibration samples are cut by benchmarks/defaults.py's seeded
split into 384 that fit and 128 that validate; every model is pruned to 50 / 70 / 85 % fewer
MACs (`--target-macs`) by `id` with its defaults (intercept, recalibration), with and without
`--sequential`, with and without `--prune-residual`. Recorded: validation accuracy and logit
rel-L2, test accuracy (540 images, never used for a choice), MACs kept and the seconds of the
prune. The digits ViT (models/vit.onnx, 25 / 50 % fewer MACs, `round_to=1` as in
benchmarks/vit.py) on the same split; a zoo export (calib_224 fits, heldout_224 is scored:
logit rel-L2) at ratios 0.25 / 0.5.

    python benchmarks/sequential.py --part digits --out benchmarks/results/sequential.json
    python benchmarks/sequential.py --part vit
    python benchmarks/sequential.py --part zoo --zoo mobilenet_v3_small [--no-recalibrate]
    python benchmarks/sequential.py --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
from defaults import logits, splits, top1  # benchmarks/ is on the path of a script run from it

import onnxprune
from onnxprune.measure.verify import run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sequential.json"
CACHE = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", "/work/zoo_cache"))
DIGITS = ("vgg", "resnet", "mobilenetv2", "inception", "senet")
REDUCTIONS = (0.5, 0.7, 0.85)
VARIANTS = {
    "id": {"sequential": False},
    "id --sequential": {"sequential": True},
    "id --prune-residual": {"sequential": False, "prune_residual": True},
    "id --prune-residual --sequential": {"sequential": True, "prune_residual": True},
}


def digits(name: str, reductions: tuple[float, ...], variants: dict[str, dict], **extra) -> dict:
    """Validation/test accuracy, validation rel-L2, MACs kept and seconds of every cell."""
    model = onnx.load(ROOT / "models" / f"{name}.onnx")
    fit, val, test = splits(name)
    cells = {"original": {"validation": top1(model, *val), "test": top1(model, *test)}}
    reference = logits(model, val[0])
    for reduction in reductions:
        for label, options in variants.items():
            start = time.perf_counter()
            result = onnxprune.prune(model, method="id", target_macs=1 - reduction, data=fit,
                                     verify=False, **options, **extra)  # fmt: skip
            seconds = time.perf_counter() - start
            got = logits(result.model, val[0])
            cells[f"{label} @ {reduction}"] = cell = {
                "validation": top1(result.model, *val),
                "validation_rel_l2": float(
                    np.linalg.norm(got - reference) / np.linalg.norm(reference)
                ),
                "test": top1(result.model, *test),
                "macs_kept": result.report.macs[1] / result.report.macs[0],
                "seconds": seconds,
            }
            print(name, label, reduction, {k: round(v, 4) for k, v in cell.items()}, flush=True)
    return cells


def zoo(name: str, ratios: tuple[float, ...], **extra) -> dict:
    """Held-out logit rel-L2 and seconds of `id` (defaults, or changed by `extra`) with and
    without --sequential."""
    model = onnx.load(CACHE / f"{name}.onnx")
    key = model.graph.input[0].name
    with np.load(CACHE / "calib_224.npz") as calib, np.load(CACHE / "heldout_224.npz") as held:
        fit, test = {key: calib[key]}, {key: held[key]}
    reference = next(iter(run(model, test).values()))
    cells = {}
    for ratio in ratios:
        for label, options in list(VARIANTS.items())[:2]:
            start = time.perf_counter()
            result = onnxprune.prune(model, method="id", ratio=ratio, data=fit, verify=False,
                                     batch_size=8, **options, **extra)  # fmt: skip
            seconds = time.perf_counter() - start
            got = next(iter(run(result.model, test).values()))
            error = np.linalg.norm(got - reference) / np.linalg.norm(reference)
            cells[f"{label} @ {ratio}"] = cell = {
                "heldout_rel_l2": float(error),
                "heldout_top1_agreement": float(np.mean(got.argmax(1) == reference.argmax(1))),
                "seconds": seconds,
            }
            print(name, label, ratio, {k: round(v, 4) for k, v in cell.items()}, flush=True)
    return cells


def markdown(results: dict) -> str:
    """Per digits model and reduction: validation / test accuracy of every variant."""
    labels = list(VARIANTS)
    lines = [
        "| model | MACs −% | original | " + " | ".join(f"`{v}`" for v in labels) + " |",
        "|---" * (3 + len(labels)) + "|",
    ]
    for name, cells in results.get("digits", {}).items():
        base = cells["original"]
        for reduction in REDUCTIONS:
            row = [f"{100 * cells[f'{v} @ {reduction}']['validation']:.1f} / "
                   f"{100 * cells[f'{v} @ {reduction}']['test']:.1f} "
                   f"[{cells[f'{v} @ {reduction}']['macs_kept']:.3f}]"
                   for v in labels if f"{v} @ {reduction}" in cells]  # fmt: skip
            original = f"{100 * base['validation']:.1f} / {100 * base['test']:.1f}"
            lines.append(f"| {name} | {int(100 * reduction)} | {original} | {' | '.join(row)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("digits", "vit", "zoo"), default="digits")
    parser.add_argument("--models", default=",".join(DIGITS))
    parser.add_argument("--zoo", default="mobilenet_v3_small")
    parser.add_argument("--no-recalibrate", action="store_true", help="zoo part: without it")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown", action="store_true", help="print the tables of the last run")
    args = parser.parse_args()
    if not args.markdown:
        results = json.loads(args.out.read_text()) if args.out.is_file() else {}
        if args.part == "digits":
            for name in args.models.split(","):
                results.setdefault("digits", {})[name] = digits(name, REDUCTIONS, VARIANTS)
                args.out.write_text(json.dumps(results, indent=1) + "\n")
        elif args.part == "vit":
            two = dict(list(VARIANTS.items())[:2])
            results["vit"] = digits("vit", (0.25, 0.5), two, round_to=1)
        else:
            extra = {"recalibrate": False} if args.no_recalibrate else {}
            label = args.zoo + (" --no-recalibrate" if args.no_recalibrate else "")
            results.setdefault("zoo", {})[label] = zoo(args.zoo, (0.25, 0.5), **extra)
        results.setdefault("meta", {})[args.part] = {
            "machine": platform.processor() or platform.machine(),
            "load": os.getloadavg(),
            "date": time.ctime(),
        }
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
