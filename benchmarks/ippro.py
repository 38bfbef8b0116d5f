"""IPPRO against the baselines: score correlations per layer, accuracy vs ratio before fine-tuning.

(a) Spearman correlation, per prunable group, of PROscore with the filter L1 norm (magnitude),
the Taylor importance and FPGM's distance sum, all from one calibration pass (the IPPRO paper's
Table 4 reports ≈ 0.0–0.06 for ResNet-50 on ImageNet). (b) Test accuracy before fine-tuning vs the
channel ratio for ippro layer-wise and global, magnitude, taylor and fpgm, plain and with the
least-squares correction (`--compensate lsq`), on the digits CNNs.

    python benchmarks/ippro.py            # writes results/ippro.json and prints markdown
    python benchmarks/ippro.py --quick    # vgg only, two ratios
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist
from scipy.stats import spearmanr

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.calib.gather import gather
from onnxprune.config import PruneConfig
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import load_model, normalize
from onnxprune.measure.verify import run
from onnxprune.methods.ippro import IPPRO

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ippro.json"
RATIOS = (0.3, 0.5, 0.7)
VARIANTS = {
    "ippro": {"method": "ippro"},
    "ippro --global": {"method": "ippro", "global_ranking": True},
    "magnitude": {"method": "magnitude"},
    "taylor": {"method": "taylor"},
    "fpgm": {"method": "fpgm"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    names = ["vgg"] if args.quick else ["vgg", "resnet", "mobilenetv2", "inception", "senet"]
    ratios = (0.3, 0.5) if args.quick else RATIOS
    out = {"command": "python benchmarks/ippro.py", "models": {}}
    for name in names:
        calib = np.load(ROOT / "models" / "digits32_calib.npz")
        test = np.load(ROOT / "models" / "digits32_test.npz")
        data = Dataset({"input": calib["input"]}, labels=calib["labels"])
        path = ROOT / "models" / f"{name}.onnx"
        out["models"][name] = {
            "correlations": correlations(path, data),
            "accuracy": accuracy_table(path, data, test, ratios),
        }
        print(f"{name}: done", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print(markdown(out))


def correlations(path: Path, data: Dataset) -> dict[str, dict[str, float]]:
    """Per group: Spearman ρ of PROscore with L1, Taylor and FPGM scores."""
    graph = normalize(load_model(path))
    groups = analyze(graph)
    counts = {g.name: g.channels for g in groups if g.prunable and not g.coupled}
    needs = frozenset({"weights", "ippro", "grad"})
    stats = gather(graph, groups, counts, needs, data, PruneConfig(method="ippro")).stats
    table = {}
    for name, s in stats.items():
        pro = IPPRO().scores_at(s)
        filters = np.concatenate(s.weights, axis=1)
        others = {
            "magnitude": np.abs(filters).sum(axis=1),
            "taylor": s.grads["taylor"],
            "fpgm": cdist(filters, filters).sum(axis=1),
        }
        table[name] = {k: float(spearmanr(pro, v).statistic) for k, v in others.items()}
    return table


def accuracy_table(path: Path, data: Dataset, test, ratios) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for label, spec in VARIANTS.items():
        for compensate in ("none", "lsq"):
            key = label if compensate == "none" else f"{label} + lsq"
            table[key] = {}
            for ratio in ratios:
                result = onnxprune.prune(
                    path,
                    data=data,
                    ratio=ratio,
                    round_to=1,
                    verify=False,
                    compensate=compensate,
                    **spec,
                )
                logits = next(iter(run(result.model, {"input": test["input"]}).values()))
                table[key][str(ratio)] = float((logits.argmax(1) == test["labels"]).mean())
    return table


def markdown(out: dict) -> str:
    lines = [f"Command: `{out['command']}`", ""]
    lines += [
        "| model | group | ρ(ippro, L1) | ρ(ippro, taylor) | ρ(ippro, fpgm) |",
        "|---|---|---|---|---|",
    ]
    for name, model in out["models"].items():
        for group, rho in model["correlations"].items():
            lines.append(
                f"| {name} | {group} | {rho['magnitude']:.2f} | {rho['taylor']:.2f} "
                f"| {rho['fpgm']:.2f} |"
            )
    lines.append("")
    for name, model in out["models"].items():
        ratios = list(next(iter(model["accuracy"].values())))
        lines += [
            f"**{name}**: test accuracy (%) before fine-tuning vs channel ratio",
            "",
            "| method | " + " | ".join(ratios) + " |",
            "|---" * (len(ratios) + 1) + "|",
        ]
        for label, row in model["accuracy"].items():
            lines.append(
                f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in row.values()) + " |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
