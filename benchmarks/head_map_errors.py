"""Head maps on ViT-B/16 at the head features: in-sample and held-out relative error of the old
least-squares map (heads chosen by its in-sample error) and of the cross-validated choice.

One ORT pass of the original model per data set (no pruning, so it fits in the memory a full
prune of ViT-B/16 does not always find on a shared machine): the feature-level statistics of
every head group's tap on the 32 calibration crops (`calib_224.npz`, with even/odd folds) and on
the 16 held-out photos (`heldout_224.npz`). Per group, `keep` = H − round(ratio · H) heads:

- old: `select_heads` without folds (greedy by in-sample error, full map, ridge 1e-10);
- new: `select_heads` with the folds (methods/heads.py: family and ridge by two-fold CV);

each map fitted on all calibration crops (`fit_map`, intercept as `id`'s defaults) and judged by
the relative error ‖Z − (Z_S M + 1cᵀ)‖_F / ‖Z‖_F of all head features on both data sets.

    ONNXPRUNE_ZOO_CACHE=/work/zoo_cache python benchmarks/head_map_errors.py --ratios 0.25,0.5

Writes `benchmarks/results/head_map_errors.json` (or `--out`) and prints one line per group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import machine  # noqa: E402
from onnxprune.calib.stats import collect_all  # noqa: E402
from onnxprune.graph.analyze import analyze  # noqa: E402
from onnxprune.graph.load import export, load_model, normalize  # noqa: E402
from onnxprune.methods.heads import feature_tap, fit_map, head_features, select_heads  # noqa: E402
from onnxprune.methods.linalg import reconstruction_error  # noqa: E402

CACHE = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", "/work/zoo_cache"))
RESULTS = ROOT / "benchmarks" / "results" / "head_map_errors.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b_16")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()
    graph = normalize(load_model(CACHE / f"{args.model}.onnx"))
    groups = [g for g in analyze(graph) if g.prunable and g.head_dim > 1]
    taps = [(feature_tap(g.taps[0], g.head_dim), g.channels * g.head_dim) for g in groups]
    model = export(graph)
    del graph
    key = model.graph.input[0].name
    stats = {}
    for name in ("calib", "heldout"):
        with np.load(CACHE / f"{name}_224.npz") as data:
            x = data[key]
        batches = [{key: x[i : i + 4]} for i in range(0, len(x), 4)]
        folded = {tap for tap, _ in taps} if name == "calib" else set()
        stats[name] = collect_all(model, taps, {}, batches, folded=folded).stats
    out = {"machine": machine(), "model": args.model, "load": os.getloadavg(), "cells": []}
    for ratio in (float(r) for r in args.ratios.split(",")):
        for group, (tap, _) in zip(groups, taps, strict=True):
            cell = {"ratio": ratio, "group": group.name}
            keep = group.channels - round(ratio * group.channels)
            fit, held = stats["calib"][tap], stats["heldout"][tap]
            for label, data in (("old", replace(fit, folds=())), ("new", fit)):
                heads, choice = select_heads([data], keep, group.head_dim, intercept=True)
                M, c = fit_map(fit, heads, group.head_dim, choice.family, choice.ridge,
                               intercept=True)  # fmt: skip
                S = head_features(heads, group.head_dim)
                cell[label] = {
                    "keep": heads.tolist(),
                    "map": f"{choice.family} {choice.ridge:.3g}",
                    "calib": reconstruction_error(fit.gram, fit.mean, fit.n, S, M, c),
                    "heldout": reconstruction_error(held.gram, held.mean, held.n, S, M, c),
                }
            out["cells"].append(cell)
            print(ratio, group.name, cell["old"], cell["new"], flush=True)
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
