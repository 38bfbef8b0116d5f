"""LSTM hidden-unit pruning on the CRNN recogniser: string accuracy against LSTM parameters.

    python benchmarks/crnn.py                     # the table of docs/RESULTS.md ("CRNN")
    python benchmarks/crnn.py --share-only        # share of the weights in prunable groups

Only the LSTM groups are pruned (`--exclude Conv`, `--round-to 1`); widths are the same in
every LSTM group (both directions of both layers). Calibration: the 512 calibration strings;
metric: exact-string accuracy of the greedy CTC decode on the 1000 test strings (disjoint
digit images). The ratio 21/64 removes 50 % of the LSTM parameters (43 of 64 units kept:
32k² + 544k parameters for k units per direction).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxprune
from onnxprune.graph.load import normalize

MODELS = Path(__file__).resolve().parents[1] / "models"
METHODS = {
    "magnitude": {"method": "magnitude"},
    "activation": {"method": "activation"},
    "taylor": {"method": "taylor"},  # ~150 s a run here (torch LSTM steps): --taylor-ratios
    "id (plain)": {"method": "id", "compensate": "none", "recalibrate": False, "sequential": False},
    "id (defaults)": {"method": "id"},
}
RATIOS = (0.25, 21 / 64, 0.5, 0.75)


def lstm_params(model: onnx.ModelProto) -> int:
    """Weights of the LSTM nodes (W, R, B, peepholes), after constant folding (the dynamo
    export computes some of them from initializers)."""
    graph = normalize(model)
    return sum(
        int(np.prod(i.values.shape))
        for n in graph.nodes
        if n.op == "LSTM"
        for i in n.inputs
        if hasattr(i, "values")
    )


def accuracy(model: onnx.ModelProto | str, x: np.ndarray, labels: np.ndarray) -> float:
    """String accuracy (%) in ONNX Runtime."""
    from models.crnn import string_accuracy  # not at the top: --share-only runs on other trees

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return string_accuracy(session.run(None, {"input": x})[0], labels)


def prunable_share(path: Path) -> tuple[int, int]:
    """(weights of the nodes a prunable group slices or folds into, all weights)."""
    model = onnx.load(str(path))
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    analysis = onnxprune.analyze(str(path))
    touched = {n for g in analysis.groups if g.prunable for n in (*g.producers, *g.consumers)}
    graph = normalize(model)  # node names as the analyzer sees them
    weights = {
        n.name: sum(int(np.prod(i.values.shape)) for i in n.inputs if hasattr(i, "values"))
        for n in graph.nodes
    }
    return sum(weights.get(n, 0) for n in touched), sum(sizes.values())


def run(exporter: str, ratios: tuple[float, ...], taylor: tuple[float, ...]) -> list[dict]:
    path = MODELS / ("crnn.onnx" if exporter == "legacy" else "crnn.dynamo.onnx")
    with np.load(MODELS / "strings_test.npz") as test:
        x, labels = test["input"], test["labels"]
    with np.load(MODELS / "strings_calib.npz") as calib:
        fit = {"input": calib["input"]}  # no labels: the (N, 5) strings are no per-output target
    base_params = lstm_params(onnx.load(str(path)))
    rows = [{"exporter": exporter, "method": "original", "ratio": 0.0,
             "lstm_params": base_params, "string_acc": accuracy(str(path), x, labels)}]  # fmt: skip
    for name, options in METHODS.items():
        for ratio in taylor if name == "taylor" else ratios:
            start = time.perf_counter()
            result = onnxprune.prune(
                str(path), ratio=ratio, round_to=1, exclude=["Conv"],
                data=fit, **options,
            )  # fmt: skip
            row = {
                "exporter": exporter,
                "method": name,
                "ratio": ratio,
                "lstm_params": lstm_params(result.model),
                "string_acc": accuracy(result.model, x, labels),
                "rel_l2": result.report.verification.rel_l2,
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def whole(targets: tuple[float, ...]) -> list[dict]:
    """`id` (defaults) on every group, convs included, at MAC targets (legacy export)."""
    path = MODELS / "crnn.onnx"
    with np.load(MODELS / "strings_test.npz") as test, np.load(MODELS / "strings_calib.npz") as c:
        x, labels, fit = test["input"], test["labels"], {"input": c["input"]}
    rows = []
    for target in targets:
        result = onnxprune.prune(str(path), method="id", target_macs=target, round_to=1, data=fit)
        params, macs = result.report.params, result.report.macs
        rows.append({
            "target_macs": target,
            "widths": {name: len(plan.keep) for name, plan in result.plans.items()},
            "params_kept": params[1] / params[0],
            "macs_kept": macs[1] / macs[0],
            "string_acc": accuracy(result.model, x, labels),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ablation(ratios: tuple[float, ...]) -> list[dict]:
    """Plain ID (legacy export, LSTM groups) with the recurrence corrected (R' = R Mᵀ, the
    tool's rule) and with R's columns of the removed units only dropped (the rewrite is
    patched to pass the recurrence no correction; consumers keep theirs)."""
    from onnxprune.graph import recurrent, rewrite

    def dropped(node, arrays, units):
        plain = {d: recurrent.Units(u.keep) for d, u in units.items()}
        return recurrent.pruned_arrays(node, arrays, plain)

    rows = []
    for variant in ("folded", "dropped"):
        rewrite.pruned_arrays = recurrent.pruned_arrays if variant == "folded" else dropped
        rows += [{**r, "method": f"id (plain), recurrence {variant}"} for r in _id_rows(ratios)]
    rewrite.pruned_arrays = recurrent.pruned_arrays
    return rows


def _id_rows(ratios: tuple[float, ...]) -> list[dict]:
    saved = dict(METHODS)
    METHODS.clear()
    METHODS["id (plain)"] = saved["id (plain)"]
    try:
        return run("legacy", ratios, ())[1:]
    finally:
        METHODS.clear()
        METHODS.update(saved)


def table(rows: list[dict]) -> str:
    base = rows[0]["lstm_params"]
    lines = [
        "| exporter | method | ratio | LSTM params | fewer | string acc (%) | rel-L2 (held out) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fewer = 100 * (1 - r["lstm_params"] / base)
        rel = f"{r['rel_l2']:.4f}" if "rel_l2" in r else ""
        lines.append(
            f"| {r['exporter']} | {r['method']} | {r['ratio']:.3f} | {r['lstm_params']} | "
            f"{fewer:.1f} % | {r['string_acc']:.1f} | {rel} |"
        )
    return "\n".join(lines)


def from_log(path: Path) -> list[dict]:
    """The rows a run printed (one JSON object per line)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share-only", action="store_true")
    parser.add_argument("--exporters", default="legacy,dynamo")
    parser.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    parser.add_argument("--taylor-ratios", default=str(21 / 64), help="'' for none")
    parser.add_argument("--whole-targets", default="", help="e.g. 0.5,0.3: all groups, id")
    parser.add_argument("--ablation", action="store_true", help="recurrence folded vs dropped")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    for exporter in args.exporters.split(","):
        path = MODELS / ("crnn.onnx" if exporter == "legacy" else "crnn.dynamo.onnx")
        touched, total = prunable_share(path)
        print(f"{exporter}: {touched} of {total} weights in prunable groups "
              f"({100 * touched / total:.1f} %)")  # fmt: skip
    if args.share_only:
        return
    if args.ablation:
        rows = ablation(tuple(float(r) for r in args.ratios.split(",")))
        base = lstm_params(onnx.load(str(MODELS / "crnn.onnx")))
        print(table([{"exporter": "legacy", "method": "original", "ratio": 0.0,
                      "lstm_params": base, "string_acc": float("nan")}, *rows]))  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return
    if args.whole_targets:
        rows = whole(tuple(float(t) for t in args.whole_targets.split(",")))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return
    ratios = tuple(float(r) for r in args.ratios.split(","))
    taylor = tuple(float(r) for r in args.taylor_ratios.split(",") if r)
    rows = [r for e in args.exporters.split(",") for r in run(e, ratios, taylor)]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
