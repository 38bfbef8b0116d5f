"""MiniLM after ONNX Runtime's transformer optimizer: what onnxprune prunes in the fused model,
how close `id` stays, and how fast the pruned model runs, as written and fused again.

The legacy export of `benchmarks/minilm_model.py` goes through
`onnxruntime.transformers.optimizer.optimize_model(model_type="bert", num_heads=12,
hidden_size=384)` (com.microsoft EmbedLayerNormalization, Attention, SkipLayerNormalization,
BiasGelu; cached beside the export as `minilm.ortopt.onnx`). onnxprune writes those ops out as
standard ops at load (graph/fused.py). Measured: the prunable share of the MAC ops' MACs at
batch 8 × 128 (`benchmarks/minilm_heads.py::share`), `id` (defaults) at `--target-macs` scored
on `heldout.npz` against the fused original (`onnxprune.measure.embedding` through `Evaluator`),
and ORT CPU latency at batch 8 × 128 of the fused original, each pruned model as onnxprune
writes it (standard ops) and the same re-optimized by `optimize_model(model_type="bert",
num_heads=0, hidden_size=0)` (head counts read per layer from the Reshapes), interleaved.

    python benchmarks/fused_minilm.py                    # 15 % and 30 % fewer MACs
    python benchmarks/fused_minilm.py --targets 0.85 --repeats 10

Writes `benchmarks/results/fused_minilm.json` (or `--out`) and prints one line per cell and the
latency table.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

import onnxprune  # noqa: E402
from benchmarks.accuracy import machine  # noqa: E402
from benchmarks.minilm_heads import share  # noqa: E402
from benchmarks.minilm_model import INPUTS, ensure_minilm  # noqa: E402
from benchmarks.transformer import HEADS, HIDDEN, SHAPE, _dataset  # noqa: E402
from onnxprune.compare.sweep import Evaluator  # noqa: E402
from onnxprune.measure.latency import benchmark  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fused_minilm.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.85,0.70", help="fractions of MACs kept")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per model (at least)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON file to write")
    args = parser.parse_args()
    files = ensure_minilm()
    fused = ensure_fused(files.legacy)
    result = {"machine": machine(), "model": fused.name, "shape": SHAPE, "ops": ops(fused)}
    result.update(share(fused))
    print(f"{fused.name}: prunable MACs {result['share']:.1%} ({result['groups']})")
    evaluator = Evaluator(onnx.load(fused), _dataset(files.heldout))
    timed = {"fused original": fused, "legacy export": files.legacy}
    with tempfile.TemporaryDirectory() as folder:
        cells = []
        for target in (float(t) for t in args.targets.split(",")):
            row, written, refused = cell(fused, target, files.calib, evaluator, Path(folder))
            cells.append(row)
            timed[f"id {row['macs_reduction']:.0%}, as written"] = written
            timed[f"id {row['macs_reduction']:.0%}, re-optimized"] = refused
        result["cells"] = cells
        result["latency"] = latency(timed, args.repeats)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def ensure_fused(legacy: Path) -> Path:
    """The legacy export through ORT's BERT optimizer, cached beside it."""
    path = legacy.with_name("minilm.ortopt.onnx")
    if not path.exists():
        optimize(legacy, path, heads=HEADS, hidden=HIDDEN)
    return path


def optimize(source: Path, target: Path, *, heads: int = 0, hidden: int = 0) -> None:
    """`optimize_model(model_type="bert")`; 0 heads and hidden: read from the graph."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(source), model_type="bert", num_heads=heads, hidden_size=hidden)
    model.save_model_to_file(str(target))


def ops(path: Path) -> dict[str, int]:
    """How many nodes of each com.microsoft op the model holds."""
    nodes = onnx.load(path, load_external_data=False).graph.node
    return dict(collections.Counter(n.op_type for n in nodes if n.domain == "com.microsoft"))


def cell(
    fused: Path, target: float, calib: Path, evaluator: Evaluator, folder: Path
) -> tuple[dict, Path, Path]:
    """`id` (defaults) at `--target-macs target`, scored against the fused original; the
    pruned model as written and re-optimized, with their paths."""
    start = time.perf_counter()
    result = onnxprune.prune(str(fused), method="id", target_macs=target, data=str(calib))
    seconds = time.perf_counter() - start
    before, after = result.report.macs
    written = folder / f"id{target}.onnx"
    result.save(written)
    refused = folder / f"id{target}.ortopt.onnx"
    optimize(written, refused)
    scores = evaluator(result.model)
    again = evaluator(onnx.load(refused))
    row = {
        "target_macs": target,
        "macs_reduction": 1 - after / before,
        "heads_kept": {
            g.name: len(result.plans[g.name].keep)
            for g in result.groups
            if g.head_dim > 1 and g.name in result.plans
        },
        "cosine": scores.cosine,
        "retrieval": scores.retrieval,
        "spearman": scores.spearman,
        "rel_l2": scores.rel_l2,
        "reoptimized_ops": ops(refused),
        "reoptimized_cosine": again.cosine,
        "prune_seconds": seconds,
    }
    print(
        f"target {target}: {row['macs_reduction']:.1%} fewer MACs, cosine {row['cosine']:.4f}, "
        f"NN {row['retrieval']:.1%}, Spearman {row['spearman']:.4f}, heads kept "
        f"{sorted(row['heads_kept'].values())}; re-optimized: {row['reoptimized_ops']}, cosine "
        f"{row['reoptimized_cosine']:.4f}; {seconds:.0f} s"
    )
    return row, written, refused


def latency(models: dict[str, Path], repeats: int) -> dict:
    """Interleaved ORT CPU latency at batch 8 × 128 tokens."""
    shapes = dict.fromkeys(INPUTS, SHAPE)
    timing = benchmark(
        list(models.values()),
        batches=(SHAPE[0],),
        input_shapes=shapes,
        repeats=repeats,
        warmup=3,
        names=list(models),
    )
    print(timing.format_table())
    return timing.to_dict()


if __name__ == "__main__":
    main()
