"""Where a MAC target lands: the fraction of the original's MACs the near-uniform widths keep.

For every digits CNN, targets 0.5 / 0.3 / 0.15 at `--round-to` 16 and 1 (no pruning: the widths
and the exact cost model only, so it runs in seconds and on any commit that has
`budget.choose_widths`).

    python benchmarks/target_landing.py --out benchmarks/results/target_landing.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnxprune.budget import choose_widths
from onnxprune.config import PruneConfig
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import load_model, normalize
from onnxprune.options import WidthRule

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("vgg", "resnet", "mobilenetv2", "inception", "senet")
TARGETS = (0.5, 0.3, 0.15)
ROUNDING = (16, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/target_landing.json")
    parser.add_argument("--label", default="current", help="key for this commit's numbers")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    found = {}
    for name in MODELS:
        graph = normalize(load_model(ROOT / "models" / f"{name}.onnx"))
        groups = analyze(graph)
        for target in TARGETS:
            for round_to in ROUNDING:
                rule = WidthRule(round_to=round_to)
                config = PruneConfig(method="magnitude", target_macs=target, width=rule)
                reached = choose_widths(graph, groups, config).target.reached
                found[f"{name} {target} /{round_to}"] = round(reached, 4)
                print(name, target, round_to, f"{reached:.3f}", flush=True)
    results[args.label] = found
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
