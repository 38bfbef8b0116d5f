"""Diagnostic behind docs/RESULTS.md ("ID at high reductions"): for id on one model at one
MACs reduction, the statistics are gathered once and several width allocations are pruned, then
scored on the test split and by their output deviation on 256 calibration images.

    python benchmarks/id_allocation.py resnet 0.85              # id
    python benchmarks/id_allocation.py resnet 0.85 --bias --recalibrate
    python benchmarks/id_allocation.py resnet 0.85 --alone      # also each group pruned alone

Rows: "uniform" (the near-uniform widths of the MAC search), "by error, pooled" (greedy ID error²
per MAC with a coupled group's error the mean over its taps: the only allocation before commit
c883dbf), "coupled xW" (a coupled group's error² weighted W×), "by error, taps summed" (weighted by
its number of taps). Uses the library's internal stages; a diagnostic, not an API example.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune.api import _config  # noqa: E402
from onnxprune.budget import _curve, choose_widths, cost_of  # noqa: E402
from onnxprune.calib.data import Dataset  # noqa: E402
from onnxprune.calib.gather import gather  # noqa: E402
from onnxprune.graph.analyze import analyze  # noqa: E402
from onnxprune.graph.load import export, load_model, normalize  # noqa: E402
from onnxprune.graph.rewrite import rewrite  # noqa: E402
from onnxprune.measure.verify import run  # noqa: E402
from onnxprune.methods import build_method  # noqa: E402
from onnxprune.methods.planner import make_plans  # noqa: E402
from onnxprune.methods.targets import allocate_by_error  # noqa: E402
from onnxprune.recalibrate import recalibrate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("reduction", type=float)
    parser.add_argument("--bias", action="store_true")
    parser.add_argument("--recalibrate", action="store_true")
    parser.add_argument("--alone", action="store_true")
    args = parser.parse_args()
    split = "digits64" if args.model == "mlp" else "digits32"
    calib = dict(np.load(ROOT / "models" / f"{split}_calib.npz"))
    test = dict(np.load(ROOT / "models" / f"{split}_test.npz"))
    data = Dataset({"input": calib["input"]}, labels=calib["labels"])
    config = _config("id", 0.5, {"target_macs": 1 - args.reduction, "round_to": 1,
                                 "prune_residual": True, "verify": False,
                                 "compensate": "bias" if args.bias else "none"})  # fmt: skip
    graph = normalize(load_model(ROOT / "models" / f"{args.model}.onnx"))
    groups = analyze(graph)
    widths = choose_widths(graph, groups, config)
    pruner = build_method("id", norm=1, compensate=config.compensate, id_solver="gram",
                          ippro_lambda=None)  # fmt: skip
    stats = gather(graph, groups, widths.counts, pruner.needs, data, config).stats
    cost = cost_of(graph, groups, "macs")
    original = export(graph)
    reference = first(run(original, {"input": calib["input"][:256]}))
    channels = {g.name: g.channels for g in groups if g.name in widths.counts}
    coupled = {g.name for g in groups if g.coupled}

    def evaluate(counts: dict[str, int], label: str) -> None:
        plans = make_plans(groups, counts, stats, pruner, config)
        pruned = rewrite(graph, groups, plans)
        if args.recalibrate:
            batches = lambda: (b.feeds for b in data.batches(32))  # noqa: E731
            pruned, _ = recalibrate(lambda: original, pruned, groups, plans, batches)
        model = export(pruned)
        acc = (first(run(model, {"input": test["input"]})).argmax(1) == test["labels"]).mean()
        got = first(run(model, {"input": calib["input"][:256]}))
        dev = np.linalg.norm(got - reference) / np.linalg.norm(reference)
        shape = " ".join(f"{counts[g]}/{c}" for g, c in channels.items())
        print(f"{label:24s} macs {cost(counts) / cost({}):.3f} acc {acc:.3f} "
              f"calib-dev {dev:.3f}  {shape}", flush=True)  # fmt: skip

    evaluate(widths.counts, "uniform")
    for label, weight in (("by error, pooled", 1), ("coupled x2", 2), ("coupled x4", 4),
                          ("by error, taps summed", None)):  # fmt: skip
        curves = {}
        for name in channels:
            w = len(stats[name].taps) if weight is None else weight
            curves[name] = _curve(stats[name], per_tap=False) * np.sqrt(w if name in coupled else 1)
        steps = dict.fromkeys(channels, 1)
        evaluate(allocate_by_error(channels, curves, cost, 1 - args.reduction, steps), label)
    if args.alone:
        for name in channels:
            evaluate({**channels, name: widths.counts[name]}, "alone " + name[-18:])


def first(outputs: dict) -> np.ndarray:
    return next(iter(outputs.values()))


if __name__ == "__main__":
    main()
