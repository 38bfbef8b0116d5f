"""MiniLM at ~30 % fewer MACs: which mix of FFN neurons, query/key dims and value dims, chosen on
calibration sentences, then scored on the held-out ones.

`id` (defaults: intercept + recalibration) with `--heads dims`, `round_to=1`: `ratio` = the FFN
neurons' share, `--qk-ratio` the query/key dims', `--layer-ratio attention=V` the value dims'.
Each mix is fitted on the first 192 of the 256 calibration sentences and scored (mean cosine of
mean-pooled embeddings against the original's, nearest-neighbour agreement, Spearman ρ) on the
other 64 — the validation split the choice is made on — and on the 128 held-out sentences,
which the choice never reads. The chosen mix is the best validation cosine among those at
≥ 29.5 % fewer MACs.

    ONNXPRUNE_ZOO_CACHE=/work/zoo_cache python benchmarks/minilm_mix.py

Writes `benchmarks/results/minilm_mix.json` (or `--out`) and prints one line per mix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
from benchmarks.accuracy import machine  # noqa: E402
from benchmarks.minilm_model import INPUTS, ensure_minilm  # noqa: E402
from benchmarks.transformer import _dataset  # noqa: E402
from onnxprune.calib.data import Dataset  # noqa: E402
from onnxprune.compare.sweep import Evaluator  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "minilm_mix.json"
FIT = 192  # calibration sentences the prune is fitted on; the rest choose the mix
MIXES = (  # (FFN neurons, query/key dims, value dims): shares removed
    (0.30, 0.60, 0.0),
    (0.25, 0.75, 0.1),
    (0.20, 0.85, 0.2),
    (0.25, 0.60, 0.25),
    (0.15, 0.90, 0.3),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    files = ensure_minilm()
    original = onnx.load(str(files.legacy))
    with np.load(files.calib) as calib:
        arrays = {k: calib[k] for k in INPUTS}
    fit = {k: v[:FIT] for k, v in arrays.items()}
    validation = Evaluator(original, Dataset({k: v[FIT:] for k, v in arrays.items()}))
    heldout = Evaluator(original, _dataset(files.heldout))
    out = {"machine": machine(), "load": os.getloadavg(), "fit": FIT, "mixes": []}
    for ffn, qk, values in MIXES:
        start = time.perf_counter()
        result = onnxprune.prune(
            str(files.legacy), method="id", heads="dims", ratio=ffn, qk_ratio=qk,
            layer_ratios=[("attention", values)], round_to=1, data=fit, verify=False,
        )  # fmt: skip
        before, after = result.report.macs
        row = {
            "ffn": ffn,
            "qk": qk,
            "values": values,
            "macs_reduction": 1 - after / before,
            "validation": _scores(validation(result.model)),
            "heldout": _scores(heldout(result.model)),
            "seconds": round(time.perf_counter() - start, 1),
        }
        out["mixes"].append(row)
        print(row, flush=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    eligible = [m for m in out["mixes"] if m["macs_reduction"] >= 0.295] or out["mixes"]
    out["chosen"] = max(eligible, key=lambda m: m["validation"]["cosine"])
    out["load_after"] = os.getloadavg()
    print("chosen", out["chosen"])
    args.out.write_text(json.dumps(out, indent=1) + "\n")


def _scores(s) -> dict:
    return {"cosine": s.cosine, "retrieval": s.retrieval, "spearman": s.spearman}


if __name__ == "__main__":
    main()
