"""MiniLM with attention heads prunable: the share of MACs onnxprune can prune, and `id` (defaults:
intercept + recalibration) over heads and FFN neurons at a MACs target.

Each export of `benchmarks/minilm_model.py` (legacy, and dynamo with `--dynamo`) is analyzed at
batch 8 × 128 tokens (the share of MatMul/Gemm MACs in nodes a selectable group produces,
passes or consumes: `benchmarks/zoo.py::mac_share`), then pruned with `--target-macs` (fraction
kept) on `calib.npz` and scored on `heldout.npz` against the original by
`onnxprune.measure.embedding` (mean cosine of mean-pooled embeddings, nearest-neighbour
agreement, Spearman ρ of pairwise similarities).

    python benchmarks/minilm_heads.py             # legacy export, 15 % and 30 % fewer MACs
    python benchmarks/minilm_heads.py --global    # widths across groups
    python benchmarks/minilm_heads.py --dynamo --targets 0.85

Writes `benchmarks/results/minilm_heads.json` (or `--out`) and prints one line per cell.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

import onnxprune  # noqa: E402
from benchmarks.accuracy import machine  # noqa: E402
from benchmarks.minilm_model import INPUTS, ensure_minilm  # noqa: E402
from benchmarks.transformer import SHAPE, _dataset  # noqa: E402
from benchmarks.zoo import MAC_OPS, mac_share  # noqa: E402
from onnxprune.compare.sweep import Evaluator  # noqa: E402
from onnxprune.graph.load import export, load_model, normalize  # noqa: E402
from onnxprune.measure.cost import count  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "minilm_heads.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dynamo", action="store_true", help="the dynamo export")
    parser.add_argument("--targets", default="0.85,0.70", help="fractions of MACs kept")
    parser.add_argument("--global", dest="global_", action="store_true", help="widths by damage")
    parser.add_argument("--out", default=str(RESULTS), help="JSON file to write")
    args = parser.parse_args()
    files = ensure_minilm()
    path = files.dynamo if args.dynamo else files.legacy
    result = {"machine": machine(), "model": path.name, "shape": SHAPE, "global": args.global_}
    result.update(share(path))
    print(f"{path.name}: prunable MACs {result['share']:.1%} ({result['groups']})")
    evaluator = Evaluator(onnx.load(path), _dataset(files.heldout))
    targets = [float(t) for t in args.targets.split(",")]
    result["cells"] = [cell(path, t, files.calib, evaluator, args.global_) for t in targets]
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def share(path: Path) -> dict:
    """Prunable share of the MAC ops' MACs at SHAPE, and the group counts."""
    shapes = {name: SHAPE for name in INPUTS}
    groups = onnxprune.analyze(str(path), input_shapes=shapes).groups
    cost = count(export(normalize(load_model(path))), input_shapes=shapes)
    ops = {n.name: n.op_type for n in cost.per_node}
    macs = {n.name: n.macs for n in cost.per_node if n.op_type in MAC_OPS}
    heads = sum(g.prunable and g.head_dim > 1 for g in groups)
    prunable = sum(g.prunable for g in groups)
    return {
        "share": mac_share(groups, macs, ops, prune_residual=False)["share"],
        "groups": f"{prunable} of {len(groups)} groups prunable, {heads} of them heads",
    }


def cell(path: Path, target: float, calib: Path, evaluator: Evaluator, global_: bool) -> dict:
    """`id` (defaults) at `--target-macs target` (`--global`: widths across groups by ID
    error per MAC), scored against the original."""
    start = time.perf_counter()
    result = onnxprune.prune(
        str(path), method="id", target_macs=target, data=str(calib), global_ranking=global_
    )
    seconds = time.perf_counter() - start
    before, after = result.report.macs
    scores = evaluator(result.model)
    row = {
        "target_macs": target,
        "macs_reduction": 1 - after / before,
        "heads_kept": {
            g.name: len(result.plans[g.name].keep)
            for g in result.groups
            if g.head_dim > 1 and g.name in result.plans
        },
        "head_maps": {  # the map each head group got (methods/heads.py: family=ridge, cv_err)
            name: dict(result.plans[name].info)
            for name in (g.name for g in result.groups if g.head_dim > 1)
            if name in result.plans
        },
        "cosine": scores.cosine,
        "retrieval": scores.retrieval,
        "spearman": scores.spearman,
        "rel_l2": scores.rel_l2,
        "prune_seconds": seconds,
    }
    print(
        f"target {target}: {row['macs_reduction']:.1%} fewer MACs, cosine {row['cosine']:.4f}, "
        f"NN {row['retrieval']:.1%}, Spearman {row['spearman']:.4f}, heads kept "
        f"{sorted(row['heads_kept'].values())}, {seconds:.0f} s"
    )
    return row


if __name__ == "__main__":
    main()
