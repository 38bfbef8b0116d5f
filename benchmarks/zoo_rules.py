"""How much of each zoo model the channel rules reach, and what a pruned model deviates by.

For every model of the zoo (`benchmarks/zoo_models.py` writes it, default /work/zoo_cache):
the groups found and prunable, and the share of MACs a uniform ratio 0.5 removes (round_to 1,
the exact width cost of `budget.cost_of`; alone and with --prune-residual). With `--prune R`,
each model named there is pruned at ratio R (--prune-residual, default round_to) by magnitude
and by ID on the calibration crops, and the logits are compared on the held-out crops.

    python benchmarks/zoo_rules.py                                   # the analysis, ~1 min
    python benchmarks/zoo_rules.py --prune 0.3 --models regnet_y_400mf,resnext50_32x4d
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxprune  # noqa: E402
from onnxprune.budget import cost_of  # noqa: E402
from onnxprune.graph.analyze import analyze  # noqa: E402
from onnxprune.graph.load import load_model, normalize  # noqa: E402
from onnxprune.methods.width import keep_counts  # noqa: E402
from onnxprune.options import WidthRule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_rules.json"


def reach(path: Path) -> dict:
    """Groups found and prunable, and the MAC share ratio 0.5 removes (alone, residual)."""
    graph = normalize(load_model(path))
    groups = analyze(graph)
    cost = cost_of(graph, groups, "macs")
    removed = {}
    for residual in (False, True):
        counts = keep_counts(groups, WidthRule(ratio=0.5, round_to=1, prune_residual=residual))
        removed["residual" if residual else "alone"] = 1 - cost(counts) / cost({})
    return {"groups": len(groups), "prunable": sum(g.prunable for g in groups), **removed}


def _logits(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def deviation(path: Path, ratio: float, zoo: Path) -> dict:
    """Held-out relative L2 deviation and top-1 agreement of magnitude and ID at `ratio`."""
    calib = dict(np.load(zoo / "calib_224.npz"))
    held = np.load(zoo / "heldout_224.npz")["input"]
    reference = _logits(str(path), held)
    found = {}
    for method in ("magnitude", "id"):
        start = time.perf_counter()
        result = onnxprune.prune(
            path, method=method, ratio=ratio, prune_residual=True, data=calib, verify=False
        )
        out = _logits(result.model, held)
        found[method] = {
            "macs": result.report.macs[1] / result.report.macs[0],
            "rel_l2": float(np.linalg.norm(out - reference) / np.linalg.norm(reference)),
            "top1": float(np.mean(out.argmax(1) == reference.argmax(1))),
            "seconds": time.perf_counter() - start,
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("/work/zoo_cache"))
    parser.add_argument("--prune", type=float, default=None, help="ratio for the deviation runs")
    parser.add_argument("--models", default="regnet_y_400mf,resnext50_32x4d")
    args = parser.parse_args()
    results: dict = {"reach": {}, "deviation": {}}
    for path in sorted(p for p in args.zoo.glob("*.onnx") if ".b1." not in p.name):
        row = results["reach"][path.stem] = reach(path)
        share = f"ratio 0.5 removes {row['alone']:.1%} of MACs ({row['residual']:.1%} residual)"
        print(f"{path.stem:32} {row['prunable']:>5}/{row['groups']:<5} prunable; {share}")
    for name in args.models.split(",") if args.prune is not None else []:
        rows = deviation(args.zoo / f"{name}.onnx", args.prune, args.zoo)
        results["deviation"][name] = rows
        for method, row in rows.items():
            print(
                f"{name} {method}: {row['macs']:.3f} of the MACs, held-out rel L2 "
                f"{row['rel_l2']:.3f}, top-1 agreement {row['top1']:.0%} ({row['seconds']:.0f} s)"
            )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
