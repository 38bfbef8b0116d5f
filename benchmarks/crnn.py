"""Hidden-unit pruning on the recurrent reference models: accuracy against recurrent parameters.

    python benchmarks/crnn.py                     # the table of docs/RESULTS.md ("CRNN")
    python benchmarks/crnn.py --share-only        # share of the weights in prunable groups
    python benchmarks/crnn.py --model crnn_gru    # the GRU CRNN; --model bilstm: the classifier

Only the recurrent groups are pruned (`--exclude Conv`, `--round-to 1`); widths are the same in
every recurrent group (both directions of both layers). Calibration: the model's calibration
split (512 strings or digits); metric: the manifest's, on the test split (disjoint digit
images): exact-string accuracy of the greedy CTC decode on the 1000 test strings for the
CRNNs, top-1 accuracy on the 540 test digits for `bilstm` (a bidirectional LSTM read as
cat(h_n[-2], h_n[-1])). The ratio 21/64 removes 50 % of the CRNN's LSTM or GRU parameters (43 of
64 units kept: 32k² + 544k LSTM, 24k² + 408k GRU parameters for k units per direction), 20/64
50 % of `bilstm`'s (44 kept: 32k² + 288k).
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
RECURRENT = ("LSTM", "GRU", "RNN")
METHODS = {
    "magnitude": {"method": "magnitude"},
    "activation": {"method": "activation"},
    "taylor": {"method": "taylor"},  # ~150 s a run here (torch LSTM steps): --taylor-ratios
    "id (plain)": {"method": "id", "compensate": "none", "recalibrate": False, "sequential": False},
    "id (defaults)": {"method": "id"},
}
RATIOS = (0.25, 21 / 64, 0.5, 0.75)


def recurrent_params(model: onnx.ModelProto) -> int:
    """Weights of the recurrent nodes (W, R, B, peepholes), after constant folding (the dynamo
    export computes some of them from initializers)."""
    graph = normalize(model)
    return sum(
        int(np.prod(i.values.shape))
        for n in graph.nodes
        if n.op in RECURRENT
        for i in n.inputs
        if hasattr(i, "values")
    )


def accuracy(model: onnx.ModelProto | str, x: np.ndarray, labels: np.ndarray) -> float:
    """String accuracy (%) of CTC scores (time, batch, classes), else top-1 accuracy (%), in
    ONNX Runtime."""
    from models.crnn import string_accuracy  # not at the top: --share-only runs on other trees

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x})[0]
    if logits.ndim == 3:
        return string_accuracy(logits, labels)
    return 100.0 * float(np.mean(logits.argmax(-1) == labels))


def splits(model: str) -> tuple[Path, Path]:
    """The calibration and test files of reference model `model` (from the manifest)."""
    entry = json.loads((MODELS / "manifest.json").read_text())["models"][model]
    return MODELS / entry["calib"], MODELS / entry["test"]


def model_path(model: str, exporter: str) -> Path:
    return MODELS / (f"{model}.onnx" if exporter == "legacy" else f"{model}.dynamo.onnx")


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


def run(
    exporter: str,
    ratios: tuple[float, ...],
    taylor: tuple[float, ...],
    model: str = "crnn",
    methods: tuple[str, ...] = tuple(METHODS),
) -> list[dict]:
    path = model_path(model, exporter)
    calib_path, test_path = splits(model)
    with np.load(test_path) as test:
        x, labels = test["input"], test["labels"]
    with np.load(calib_path) as calib:
        fit = {"input": calib["input"]}  # no labels: as for a model without its training data
    base_params = recurrent_params(onnx.load(str(path)))
    original = accuracy(str(path), x, labels)
    rows = [{"model": model, "exporter": exporter, "method": "original", "ratio": 0.0,
             "recurrent_params": base_params, "accuracy": original}]  # fmt: skip
    for name in methods:
        options = METHODS[name]
        for ratio in taylor if name == "taylor" else ratios:
            start = time.perf_counter()
            result = onnxprune.prune(
                str(path), ratio=ratio, round_to=1, exclude=["Conv"],
                data=fit, **options,
            )  # fmt: skip
            row = {
                "model": model,
                "exporter": exporter,
                "method": name,
                "ratio": ratio,
                "recurrent_params": recurrent_params(result.model),
                "accuracy": accuracy(result.model, x, labels),
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
            "accuracy": accuracy(result.model, x, labels),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ablation(ratios: tuple[float, ...], model: str = "crnn") -> list[dict]:
    """Plain ID (legacy export, recurrent groups) with the recurrence corrected (R' = R Mᵀ,
    the tool's rule) and with R's columns of the removed units only dropped (the rewrite is
    patched to pass the recurrence no correction; consumers keep theirs); for a GRU also with
    the candidate block's columns only selected, the rule for `linear_before_reset = 0`
    applied to this model (torch's GRU is `linear_before_reset = 1`)."""
    from types import SimpleNamespace

    from onnxprune.graph import rewrite
    from onnxprune.ops import recurrent

    def dropped(node, arrays, units):
        plain = {d: recurrent.Units(u.keep) for d, u in units.items()}
        return recurrent.pruned_arrays(node, arrays, plain)

    def candidate_selected(node, arrays, units):
        attrs = {**node.attrs, "linear_before_reset": 0}
        return recurrent.pruned_arrays(SimpleNamespace(op=node.op, name=node.name, attrs=attrs),
                                       arrays, units)  # fmt: skip

    variants = {"folded": recurrent.pruned_arrays, "dropped": dropped}
    if model == "crnn_gru":
        variants["candidate selected"] = candidate_selected
    rows = []
    for variant, rule in variants.items():
        rewrite.pruned_arrays = rule
        rows += [
            {**r, "method": f"id (plain), recurrence {variant}"} for r in _id_rows(ratios, model)
        ]
    rewrite.pruned_arrays = recurrent.pruned_arrays
    return rows


def _id_rows(ratios: tuple[float, ...], model: str) -> list[dict]:
    return run("legacy", ratios, (), model, ("id (plain)",))[1:]


def table(rows: list[dict]) -> str:
    base = rows[0]["recurrent_params"]
    lines = [
        "| exporter | method | ratio | recurrent params | fewer | accuracy (%) | rel-L2 held out |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fewer = 100 * (1 - r["recurrent_params"] / base)
        rel = f"{r['rel_l2']:.4f}" if "rel_l2" in r else ""
        lines.append(
            f"| {r['exporter']} | {r['method']} | {r['ratio']:.3f} | {r['recurrent_params']} | "
            f"{fewer:.1f} % | {r['accuracy']:.1f} | {rel} |"
        )
    return "\n".join(lines)


def from_log(path: Path) -> list[dict]:
    """The rows a run printed (one JSON object per line)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crnn", help="crnn, crnn_gru or bilstm")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--share-only", action="store_true")
    parser.add_argument("--exporters", default="legacy,dynamo")
    parser.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    parser.add_argument("--taylor-ratios", default=str(21 / 64), help="'' for none")
    parser.add_argument("--whole-targets", default="", help="e.g. 0.5,0.3: all groups, id")
    parser.add_argument("--ablation", action="store_true", help="recurrence folded vs dropped")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    for exporter in args.exporters.split(","):
        path = model_path(args.model, exporter)
        touched, total = prunable_share(path)
        print(f"{exporter}: {touched} of {total} weights in prunable groups "
              f"({100 * touched / total:.1f} %)")  # fmt: skip
    if args.share_only:
        return
    if args.ablation:
        rows = ablation(tuple(float(r) for r in args.ratios.split(",")), args.model)
        base = recurrent_params(onnx.load(str(model_path(args.model, "legacy"))))
        print(table([{"exporter": "legacy", "method": "original", "ratio": 0.0,
                      "recurrent_params": base, "accuracy": float("nan")}, *rows]))  # fmt: skip
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
    methods = tuple(args.methods.split(","))
    rows = [
        r for e in args.exporters.split(",") for r in run(e, ratios, taylor, args.model, methods)
    ]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
