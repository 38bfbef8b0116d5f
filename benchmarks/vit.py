"""Digits ViT (models/vit.onnx, both exporters): prunable MACs and accuracy at MAC targets.

Per export: the share of MatMul/Gemm/Conv MACs in nodes a selectable group touches (by default
and with --prune-residual; `benchmarks/zoo.py`'s measure), then for every method the test
accuracy (540 images) after pruning to 25 % and 50 % fewer MACs (`round_to=1`), calibrated on
models/digits32_calib.npz. Attention heads and FFN neurons are the prunable groups; the residual
stream stays (LayerNormalization).

    python benchmarks/vit.py                      # writes benchmarks/results/vit.json
    python benchmarks/vit.py --markdown           # print the table of the last run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import onnx
from zoo import analysis_summary  # benchmarks/ is on the path of a script run from it

import onnxprune
from onnxprune.measure.verify import run

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
RESULTS = ROOT / "benchmarks" / "results" / "vit.json"
REDUCTIONS = (0.25, 0.5)
METHODS: dict[str, dict] = {
    "magnitude": {"method": "magnitude"},
    "id": {"method": "id", "compensate": "none", "recalibrate": False, "sequential": False},
    "id defaults": {"method": "id"},  # + intercept, recalibration
    "taylor": {"method": "taylor"},
    "activation": {"method": "activation"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the table of the last run")
    parser.add_argument("--exports", default="vit.onnx,vit.dynamo.onnx")
    parser.add_argument("--methods", default=",".join(METHODS), help="labels from METHODS")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.markdown:
        methods = {label: METHODS[label] for label in args.methods.split(",")}
        old = json.loads(args.out.read_text()) if args.out.is_file() else {"exports": {}}
        for name in args.exports.split(","):  # what is not measured keeps its earlier numbers
            new = measure(MODELS / name, methods)
            entry = old["exports"].setdefault(name, {"methods": {}})
            entry.update({**new, "methods": {**entry["methods"], **new["methods"]}})
        old["meta"] = {"machine": platform.processor() or platform.machine(), "date": time.ctime()}
        args.out.write_text(json.dumps(old, indent=1) + "\n")
    print(markdown(json.loads(args.out.read_text())["exports"]))


def measure(path: Path, methods: dict[str, dict]) -> dict:
    """Prunable shares and, per method and reduction, accuracy, MACs reached and seconds."""
    calib, test = (np.load(MODELS / f"digits32_{s}.npz") for s in ("calib", "test"))
    summary = analysis_summary(path)
    out = {
        "share_default": summary["default"]["share"],
        "share_prune_residual": summary["prune_residual"]["share"],
        "original": accuracy(onnx.load(str(path)), test),
        "methods": {},
    }
    for label, options in methods.items():
        for reduction in REDUCTIONS:
            start = time.perf_counter()
            result = onnxprune.prune(
                path,
                target_macs=1 - reduction,
                round_to=1,  # land on the target (heads are one step each anyway)
                data={"input": calib["input"]},
                labels=calib["labels"],
                verify=False,
                **options,
            )
            before, after = result.report.macs
            out["methods"].setdefault(label, {})[str(reduction)] = {
                "accuracy": accuracy(result.model, test),
                "reached": 1 - after / before,
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(path.name, label, reduction, out["methods"][label][str(reduction)], flush=True)
    return out


def accuracy(model: onnx.ModelProto, test) -> float:
    """Top-1 accuracy in percent on the test split."""
    logits = run(model, {"input": test["input"]})["logits"]
    return round(100.0 * float((logits.argmax(1) == test["labels"]).mean()), 2)


def markdown(results: dict) -> str:
    """One table per export: accuracy (MACs reduction reached) per method and target."""
    lines = []
    for name, r in results.items():
        lines += [
            f"**{name}**: original {r['original']:.2f} %, prunable MACs "
            f"{100 * r['share_default']:.1f} % (default), "
            f"{100 * r['share_prune_residual']:.1f} % (--prune-residual)",
            "",
            "| method | "
            + " | ".join(f"{100 * float(t):.0f} % fewer MACs" for t in REDUCTIONS)
            + " |",
            "|---|" + "---|" * len(REDUCTIONS),
        ]
        for label, cells in r["methods"].items():
            row = [
                f"{c['accuracy']:.2f} % ({100 * c['reached']:.1f} %)"
                for c in (cells[str(t)] for t in REDUCTIONS)
            ]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
