"""Pruning within attention heads (`--heads dims`) against removing whole heads, at equal MACs.

Digits ViT (both exports; test accuracy on the 540 test images, calibrated on
models/digits32_calib.npz) at 25 % and 50 % fewer MACs; MiniLM (legacy export, from
`benchmarks/minilm_model.py`'s cache; mean cosine of mean-pooled embeddings, nearest-neighbour
agreement and Spearman ρ against the original on heldout.npz, calibrated on calib.npz) at 15 % and
30 %. `id` with its defaults (intercept + recalibration) for every group, `round_to=1`. Whole
heads: `target_macs` (as benchmarks/vit.py and minilm_heads.py measure them). Within heads
(`VARIANTS`: values by ID or PCA, query/key dims at the same ratio or twice it): a uniform
`ratio` (heads' dims and FFN neurons alike; the width searches count whole heads), found by a
secant step on the MACs of a prune on 8 samples, then pruned on the full calibration data.

    python benchmarks/within_heads.py                   # ViT, both exports
    python benchmarks/within_heads.py --models minilm   # ~15 min on the shared 2-core VM

Writes `benchmarks/results/within_heads.json` (cells merged by model) and prints one line a cell.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
from benchmarks.accuracy import machine  # noqa: E402
from onnxprune.measure.verify import run  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "within_heads.json"
REDUCTIONS = {"vit": (0.25, 0.5), "minilm": (0.15, 0.3)}
VARIANTS: dict[str, dict] = {  # "qk": the query/key ratio as a multiple of the ratio;
    # "values kept": MiniLM's head groups (named "…/attention/…") keep their value dims
    "whole": {},
    "dims id": {"heads": "dims", "head_values": "id"},
    "dims pca": {"heads": "dims", "head_values": "pca"},
    "dims pca qk x2": {"heads": "dims", "head_values": "pca", "qk": 2.0},
    "dims qk x2 values kept": {"heads": "dims", "layer_ratios": [("attention", 0.0)], "qk": 2.0},
}

Score = Callable[[onnx.ModelProto], dict]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit.onnx,vit.dynamo.onnx", help="or minilm")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="labels from VARIANTS")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    old = json.loads(args.out.read_text()) if args.out.is_file() else {"models": {}}
    for name in args.models.split(","):
        path, data, score = _setup(name)
        kind = "minilm" if name == "minilm" else "vit"
        entry = old["models"].setdefault(name, {"cells": {}})
        entry["original"] = score(onnx.load(str(path)))
        for label in args.variants.split(","):
            for reduction in REDUCTIONS[kind]:
                cell = _cell(path, data, score, VARIANTS[label], reduction)
                entry["cells"][f"{label} {reduction}"] = cell
                print(name, label, reduction, cell, flush=True)
    old["meta"] = {**machine(), "date": time.ctime()}
    args.out.write_text(json.dumps(old, indent=1) + "\n")


def _setup(name: str) -> tuple[Path, dict[str, np.ndarray], Score]:
    """The model path, its calibration arrays and its scoring function."""
    if name == "minilm":
        from benchmarks.minilm_model import ensure_minilm
        from benchmarks.transformer import _dataset
        from onnxprune.compare.sweep import Evaluator

        files = ensure_minilm()
        evaluator = Evaluator(onnx.load(files.legacy), _dataset(files.heldout))

        def embeddings(model: onnx.ModelProto) -> dict:
            s = evaluator(model)
            return {"cosine": s.cosine, "retrieval": s.retrieval, "spearman": s.spearman}

        return files.legacy, dict(np.load(files.calib)), embeddings
    calib, test = (np.load(ROOT / "models" / f"digits32_{s}.npz") for s in ("calib", "test"))

    def accuracy(model: onnx.ModelProto) -> dict:
        logits = run(model, {"input": test["input"]})["logits"]
        return {"accuracy": round(100.0 * float((logits.argmax(1) == test["labels"]).mean()), 2)}

    return ROOT / "models" / name, {"input": calib["input"]}, accuracy


def _cell(path: Path, data: Mapping, score: Score, variant: dict, reduction: float) -> dict:
    """One pruned model at `reduction` fewer MACs: its score, the reduction reached, seconds."""
    start = time.perf_counter()
    if not variant:
        options = {"target_macs": 1 - reduction}
    else:
        options = _options_for(path, data, variant, reduction)
    result = _prune(path, data, **options)
    before, after = result.report.macs
    within = [row.status for row in result.report.groups if "within heads" in row.status]
    return {
        **score(result.model),
        "options": options,
        "reached": 1 - after / before,
        "within": sorted(set(within)),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _options_for(path: Path, data: Mapping, variant: dict, reduction: float) -> dict:
    """The variant's options with the uniform ratio whose MACs reduction lands nearest
    `reduction` (a secant step from `reduction` itself, counted on prunes fitted to 8
    samples)."""
    few = {key: value[:8] for key, value in data.items()}
    fixed = {k: v for k, v in variant.items() if k != "qk"}

    def options(ratio: float) -> dict:
        qk = {"qk_ratio": min(0.9, variant["qk"] * ratio)} if "qk" in variant else {}
        return {**fixed, "ratio": round(ratio, 4), **qk}

    reached = {}
    ratio = reduction
    for _ in range(2):
        before, after = _prune(path, few, **options(ratio)).report.macs
        reached[ratio] = 1 - after / before
        ratio = min(0.9, ratio * reduction / reached[ratio])
    return options(min(reached, key=lambda r: abs(reached[r] - reduction)))


def _prune(path: Path, data: Mapping, **options) -> onnxprune.Result:
    return onnxprune.prune(
        str(path), method="id", round_to=1, data=dict(data), verify=False, **options
    )


if __name__ == "__main__":
    main()
