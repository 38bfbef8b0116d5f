"""Per-weight pruning of transformer Linear layers: magnitude, Wanda, elimination–compensation.

    python benchmarks/wanda.py                  # MiniLM (30 %, 50 %, 2:4) and the digits ViT
    python benchmarks/wanda.py --models vit     # the ViT only (a minute)
    python benchmarks/wanda.py --markdown       # the tables of the last run

The Linear layers of the transformer blocks lose a share of their weights (MiniLM: the 36
q/k/v/attention-output/FFN MatMuls, 10.6 M weights; digits ViT: its 24 block MatMuls, with the
patch-embedding Conv and the classifier Gemm kept dense, `--exclude '^/embed/' --exclude '^/fc/'`,
as Wanda keeps embeddings and head dense) — 30 %, 50 %, or 2 of every 4 consecutive weights of a
row (2:4). Variants (selection criterion, scope, bias shift):

- `magnitude`: |W_ij| per output row, no shift;
- `wanda`: |W_ij|·‖X_j‖₂ per output row, no shift (Sun et al. 2023);
- `wanda+shift`, `magnitude+shift`: the same selection, each unit's bias shifted by
  elimination–compensation's optimum δ_i = Σ_removed w_ij S1_ij/S0_i (`--compensate bias`);
- `ec`: elimination–compensation (`--method biascomp`): I_ij = w_ij²(S2_ij − S1_ij²/S0_i) ranked
  over all layers together (the paper's global ranking), with its shift; `ec_row`: per row.

The statistics (EC's output-Jacobian sums — probes on MiniLM, exact on the ViT's 10 logits —
and Wanda's input norms, both over every token) are gathered once per model on the calibration
data and reused for every cell; each cell is `sparsify` of the same graph, the model that
`onnxprune MODEL --granularity weight …` writes for it. MiniLM is scored on `heldout.npz` (128
sentences, disjoint from the calibration ones: a seeded 128 of the 256) against the original by
`onnxprune.measure.embedding`; the ViT by test accuracy (540 digits; calibration: 512 others).
One latency check (batch 8 × 128 tokens): a 50 % sparse MiniLM against the original.
Writes `benchmarks/results/wanda.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from benchmarks.accuracy import machine  # noqa: E402
from benchmarks.minilm_model import INPUTS, ensure_minilm  # noqa: E402
from onnxprune.calib.data import Dataset  # noqa: E402
from onnxprune.calib.gather import gather_norms, gather_weights  # noqa: E402
from onnxprune.compare.sweep import Evaluator  # noqa: E402
from onnxprune.config import PruneConfig  # noqa: E402
from onnxprune.graph.load import export, normalize  # noqa: E402
from onnxprune.graph.sparsify import layer_weights, selected_layers, sparsify  # noqa: E402
from onnxprune.measure.latency import benchmark  # noqa: E402
from onnxprune.methods.sparse import bias_shifts, choose_removed, weight_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "wanda.json"
LEVELS = ("0.3", "0.5", "2:4")
VARIANTS = {  # name: (scores of, scope, shift)
    "magnitude": ("magnitude", "row", False),
    "wanda": ("wanda", "row", False),
    "magnitude+shift": ("magnitude", "row", True),
    "wanda+shift": ("wanda", "row", True),
    "ec": ("biascomp", "global", True),
    "ec_row": ("biascomp", "row", True),
}
VIT_EXCLUDE = ("^/embed/", "^/fc/")  # patch embedding and classifier stay dense (Wanda's too)
SHAPE = (8, 128)  # batch, sequence for the latency check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,vit", help="minilm, vit or both")
    parser.add_argument("--probes", type=int, default=4, help="Jacobian probes on MiniLM")
    parser.add_argument(
        "--sentences", type=int, default=128, help="MiniLM calibration sentences (of 256)"
    )
    parser.add_argument("--markdown", action="store_true", help="print the last run's tables")
    parser.add_argument("--out", default=str(RESULTS), help="JSON file to write")
    args = parser.parse_args()
    out = Path(args.out)
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["machine"] = machine()
    for name in args.models.split(","):
        result[name] = minilm(args.probes, args.sentences) if name == "minilm" else vit()
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


def minilm(probes: int, sentences: int) -> dict:
    """Embedding scores of every variant and level on MiniLM, and one latency check."""
    files = ensure_minilm()
    calib, heldout = (_sentences(path) for path in (files.calib, files.heldout))
    calib = calib.subset(sentences)  # seeded random sample
    original = onnx.load(files.legacy)
    evaluator = Evaluator(original, heldout)
    cells, models, seconds = sweep(original, calib, f"probe:{probes}", evaluator.__call__)
    scores = {
        key: {f: getattr(e, f) for f in ("cosine", "retrieval", "spearman", "rel_l2")}
        for key, e in cells.items()
    }
    path = files.legacy.parent / "wanda_50.onnx"
    onnx.save(models["wanda@0.5"], path)
    shapes = {n: SHAPE for n in INPUTS}
    paths = [str(files.legacy), str(path)]
    run = benchmark(paths, batches=(SHAPE[0],), threads=1, warmup=2, repeats=5, min_time=0.0,
                    input_shapes=shapes)  # fmt: skip
    rows = run.rows
    latency = {"original_ms": rows[0].median_ms, "sparse_ms": rows[1].median_ms,
               "speedup": rows[1].speedup}  # fmt: skip
    return {"jacobian": f"probe:{probes}", "sentences": sentences, "statistics_s": seconds,
            "cells": scores, "latency_b8_s128": latency}  # fmt: skip


def vit() -> dict:
    """Test accuracy of every variant and level on the digits ViT (legacy export)."""
    calib, test = (np.load(ROOT / "models" / f"digits32_{s}.npz") for s in ("calib", "test"))
    model = onnx.load(ROOT / "models" / "vit.onnx")
    data = Dataset({"input": calib["input"]}, labels=calib["labels"])
    evaluator = Evaluator(model, Dataset({"input": test["input"]}, labels=test["labels"]))
    cells, _, seconds = sweep(model, data, "exact", evaluator.__call__, VIT_EXCLUDE)
    scores = {key: {"accuracy": e.accuracy, "rel_l2": e.rel_l2} for key, e in cells.items()}
    return {"original": evaluator.base.accuracy, "jacobian": "exact", "statistics_s": seconds,
            "cells": scores}  # fmt: skip


def sweep(model: onnx.ModelProto, data: Dataset, jacobian: str, evaluate, exclude=()) -> tuple:
    """Every variant at every level from one gathering of the statistics: evaluations and
    models by 'variant@level', and the seconds the statistics took."""
    graph = normalize(model)
    layers = selected_layers(graph, exclude)
    config = PruneConfig(method="biascomp", granularity="weight", sparsity=0.5, jacobian=jacobian)
    start = time.perf_counter()
    stats, _, _ = gather_weights(graph, layers, frozenset({"jacobian"}), data, config)
    norms = gather_norms(graph, layers, data, config)
    seconds = round(time.perf_counter() - start, 1)
    weights = layer_weights(graph, layers)
    scores = {m: weight_scores(m, weights, stats, {}, norms=norms) for m in ("magnitude", "wanda")}
    scores["biascomp"] = weight_scores("biascomp", weights, stats, {})
    cells, models = {}, {}
    for level in LEVELS:
        for name, (criterion, scope, shift) in VARIANTS.items():
            if level == "2:4" and scope == "global":
                continue  # a pattern is per row
            fraction = 0.5 if level == "2:4" else float(level)
            removed = choose_removed(
                scores[criterion], fraction, scope=level if ":" in level else scope
            )
            shifts = bias_shifts(weights, stats, removed) if shift else {}
            key = f"{name}@{level}"
            models[key] = export(sparsify(graph, layers, removed, shifts))
            cells[key] = evaluate(models[key])
            print(key, cells[key], flush=True)
            if key != "wanda@0.5":
                del models[key]
    return cells, models, seconds


def _sentences(path: Path) -> Dataset:
    with np.load(path) as data:
        return Dataset({k: data[k] for k in INPUTS}, source=str(path))


def markdown(result: dict) -> str:
    """One table per model: each variant's scores per level."""
    lines = []
    if "minilm" in result:
        title = "MiniLM: embedding cosine / nearest-neighbour agreement / Spearman ρ"
        lines += _table(title, result["minilm"]["cells"], _embedding_cell) + [""]
    if "vit" in result:
        title = f"digits ViT: test accuracy % (original {100 * result['vit']['original']:.2f})"
        lines += _table(title, result["vit"]["cells"], lambda c: f"{100 * c['accuracy']:.2f}")
    return "\n".join(lines)


def _embedding_cell(cell: dict) -> str:
    return f"{cell['cosine']:.3f} / {cell['retrieval']:.3f} / {cell['spearman']:.3f}"


def _table(title: str, cells: dict, show) -> list[str]:
    lines = [title, "", "| variant | " + " | ".join(LEVELS) + " |", "|---|" + "---:|" * len(LEVELS)]
    for name in VARIANTS:
        row = [cells.get(f"{name}@{level}") for level in LEVELS]
        lines.append(f"| {name} | " + " | ".join("—" if c is None else show(c) for c in row) + " |")
    return lines


if __name__ == "__main__":
    main()
