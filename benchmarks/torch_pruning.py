"""onnxprune side by side with Torch-Pruning: accuracy before fine-tuning vs MACs reduction.

For every reference model: the torch model with the trained weights of `models/<name>.onnx`,
pruned by Torch-Pruning (`MetaPruner`, per-layer uniform `pruning_ratio` found by bisection so
that `count_ops_and_params` reports at most 1 − t of the MACs) with L1 magnitude,
Taylor and FPGM importance, each as is and after re-estimating BatchNorm statistics on the
calibration split (train-mode forward passes, momentum=None, no gradient steps); and the same
ONNX file pruned by onnxprune (`target_macs = 1 − t`, `round_to=1`, `prune_residual=True`).
Both tools' models are exported/saved as ONNX and scored by the same ORT accuracy function
(benchmarks/accuracy.py) on the disjoint test split; the MACs reduction shown is counted by
onnxprune's counter on those ONNX files (BN folded), so both are measured alike.

Trained weights. The legacy exporter folded BatchNorm into the convolutions, so the ONNX files do
not hold the torch state dict of the CNNs. We retrain with the exact code and seed of
`models/build.py` (deterministic) and accept the result only if its logits match the ONNX file
within 1e-4 on the test split; the MLP (no BN) is read from the ONNX initializers, whose names are
the torch parameter names. Retrained state dicts are cached (`--cache`).

    python benchmarks/torch_pruning.py             # full run, writes results/torch_pruning.json
    python benchmarks/torch_pruning.py --quick     # vgg and resnet at 50/85 %, 128 calib images
    python benchmarks/torch_pruning.py --quick --models mlp,senet   # add models to that run
    python benchmarks/torch_pruning.py --markdown  # print the tables of the last run
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as a script, this file's folder comes first on sys.path and would shadow `torch_pruning`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch_pruning as tp  # noqa: E402
from torch import nn  # noqa: E402
from torch_pruning.utils import count_ops_and_params  # noqa: E402

import onnxprune  # noqa: E402
from benchmarks.accuracy import accuracy, machine  # noqa: E402
from models import build  # noqa: E402
from models.data import load as load_digits  # noqa: E402
from onnxprune.calib.data import Dataset  # noqa: E402
from onnxprune.compare.sweep import parse_method, pyplot  # noqa: E402
from onnxprune.measure.cost import count  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REDUCTIONS = (0.3, 0.5, 0.7, 0.85)
SEEDS = (0, 1, 2, 3, 4)
OURS = ("id", "id+bias", "id+bias+recalibrate", "magnitude+recalibrate", "magnitude", "ippro+lsq",
        "taylor", "random")  # fmt: skip
ACCURACY = RESULTS / "accuracy.json"  # cells of benchmarks/accuracy.py, reused when they match
REUSE: list[Path] = [ACCURACY]
TP_CRITERIA = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "taylor": lambda: tp.importance.TaylorImportance(),
    "fpgm": lambda: tp.importance.FPGMImportance(),
}
CLASSIFIER = {"mlp": "net.4", "vgg": "classifier.3"}  # others: "fc"
TOLERANCE = 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="vgg and resnet at 50/85 % only")
    parser.add_argument("--markdown", action="store_true",
                        help="print the tables (and redraw the plots) of the last run")  # fmt: skip
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "onnxprune-bench"),
                        help="folder for retrained torch state dicts")  # fmt: skip
    parser.add_argument("--calib-samples", type=int, default=None,
                        help="first N calibration images for both tools (default: all 512; "
                        "--quick: 128)")  # fmt: skip
    parser.add_argument("--reuse", default=str(ACCURACY),
                        help="comma-separated accuracy.py result files whose matching onnxprune "
                        "cells are reused (default: %(default)s)")  # fmt: skip
    args = parser.parse_args()
    REUSE[:] = [Path(f) for f in args.reuse.split(",") if f]
    samples = args.calib_samples or (128 if args.quick else None)
    out = RESULTS / ("torch_pruning_quick.json" if args.quick else "torch_pruning.json")
    if args.markdown:
        results = json.loads(out.read_text())
        for name, model in results["models"].items():
            plot(name, model)
        print(markdown(results))
        return
    manifest = json.loads((ROOT / "models" / "manifest.json").read_text())
    names = args.models.split(",") if args.models else list(manifest["models"])
    reductions = REDUCTIONS
    if args.quick:
        names = names if args.models else ["resnet", "vgg"]
        reductions = (0.5, 0.85)
    command = "python benchmarks/torch_pruning.py" + (" --quick" if args.quick else "")
    command += f" --calib-samples {args.calib_samples}" if args.calib_samples else ""
    results = {"machine": _machine(), "command": command, "calib_samples": samples or 512,
               "models": {}}  # fmt: skip
    if args.models and out.is_file():  # a partial run adds its models to the last results
        previous = json.loads(out.read_text())
        results["models"] = previous["models"]
        results["command"] = f"{previous['command']}; {command} --models {args.models}"
        results["seconds"] = previous.get("seconds", 0.0)
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        results["models"][name] = bench_model(name, manifest["models"][name], reductions,
                                              Path(args.cache), samples)  # fmt: skip
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")  # after every model
    results["seconds"] = results.get("seconds", 0.0) + time.perf_counter() - start
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))


def bench_model(
    name: str, entry: dict, reductions: tuple[float, ...], cache: Path, samples: int | None
) -> dict:
    """Both tools on one model at every reduction; also writes the model's plot."""
    path = ROOT / "models" / entry["onnx"]
    calib = {k: v[:samples] for k, v in np.load(ROOT / "models" / entry["calib"]).items()}
    test = dict(np.load(ROOT / "models" / entry["test"]))
    torch_model, recovered = torch_reference(name, path, test, cache)
    base = accuracy(onnx.load(str(path)), test)
    out = {"base_accuracy": base, "recovered": recovered, "macs": count(onnx.load(str(path))).macs,
           "onnxprune": {}, "torch_pruning": {}}  # fmt: skip
    reused = _accuracy_cells(name, len(calib["input"]))
    for label in OURS:
        out["onnxprune"][label] = [reused.get((label, t)) or ours(path, label, t, calib, test)
                                   for t in reductions]  # fmt: skip
    x_calib = torch.from_numpy(calib["input"])
    y_calib = torch.from_numpy(calib["labels"])
    example = x_calib[:1]
    ratios = {t: tp_ratio(torch_model, example, CLASSIFIER.get(name, "fc"), t) for t in reductions}
    for criterion in TP_CRITERIA:
        for bn in (False, True):
            label = f"{criterion}" + (" + BN re-est." if bn else "")
            rows = []
            for t in reductions:
                pruned = tp_prune(torch_model, example, CLASSIFIER.get(name, "fc"), criterion,
                                  ratios[t], x_calib, y_calib)  # fmt: skip
                if bn and not reestimate_bn(pruned, x_calib):
                    rows = []
                    break  # no BatchNorm: identical to "as is"
                rows.append(_row(t, export(pruned, example), test, out["macs"], ratio=ratios[t]))
            if rows:
                out["torch_pruning"][label] = rows
    out["latency"] = {t: latency(path, calib, torch_model, example, name, ratios[t], t)
                      for t in reductions}  # fmt: skip
    plot(name, out)
    return out


def _accuracy_cells(name: str, samples: int) -> dict[tuple[str, float], dict]:
    """(method, target) → row from benchmarks/accuracy.py's results for `name`, if that run
    used the same settings (all `samples` calibration images, round_to=1, prune_residual)."""
    cells: dict[tuple[str, float], dict] = {}
    for file in REUSE if samples == 512 else []:
        model = json.loads(file.read_text())["models"].get(name, {}) if file.is_file() else {}
        for label, rows in model.get("points", {}).items():
            for row in rows:
                if row.get("accuracy") is not None:
                    key = (label.replace(" ", ""), row["target"])
                    cells[key] = {**row, "from": "benchmarks/accuracy.py"}
    return cells


def latency(path: Path, calib: dict, model: nn.Module, example: torch.Tensor, name: str,
            ratio: float, t: float) -> dict:  # fmt: skip
    """Median batch-1 latency speedups (1 ORT thread, interleaved) of onnxprune's id model and
    Torch-Pruning's L1 model at reduction t over the original ONNX file."""
    from onnxprune.measure.latency import benchmark

    data = Dataset({"input": calib["input"]})
    ours_model = onnxprune.prune(path, method="id", data=data, target_macs=1 - t, round_to=1,
                                 prune_residual=True, verify=False).model  # fmt: skip
    theirs = export(tp_prune(model, example, CLASSIFIER.get(name, "fc"), "l1", ratio), example)
    rows = benchmark([onnx.load(str(path)), ours_model, theirs], threads=1, repeats=20,
                     min_time=0.3, names=("original", "onnxprune id", "tp l1")).rows  # fmt: skip
    base = rows[0].median_ms
    return {"original_ms": base, "onnxprune_id": base / rows[1].median_ms,
            "tp_l1": base / rows[2].median_ms}  # fmt: skip


# ----------------------------------------------------------------------------- onnxprune


def ours(path: Path, label: str, t: float, calib: dict, test: dict) -> dict:
    """onnxprune at MACs reduction t (mean ± std over SEEDS for random)."""
    spec = parse_method(label)
    data = Dataset({"input": calib["input"]}, labels=calib["labels"])
    seeds = SEEDS if spec.method == "random" else (0,)
    rows = []
    for seed in seeds:
        try:
            result = onnxprune.prune(path, method=spec.method, data=data, target_macs=1 - t,
                                     round_to=1, prune_residual=True, verify=False, seed=seed,
                                     **spec.options)  # fmt: skip
        except Exception as exc:  # a library failure is a result too: record it, go on
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            return {"target": t, "macs_reduction": None, "accuracy": None, "std": 0.0,
                    "error": f"{type(exc).__name__}: {first}"}  # fmt: skip
        before, after = result.report.macs
        rows.append((accuracy(result.model, test), 1 - after / before))
    accs = [a for a, _ in rows]
    reached = float(np.mean([m for _, m in rows]))
    return {"target": t, "macs_reduction": reached, "accuracy": float(np.mean(accs)),
            "std": float(np.std(accs)), "seeds": len(seeds)}  # fmt: skip


# ----------------------------------------------------------------------------- torch side


def torch_reference(name: str, path: Path, test: dict, cache: Path) -> tuple[nn.Module, str]:
    """The torch model computing what `path` computes, and how it was recovered."""
    spec = build.SPECS[name]
    model = spec.factory()
    weights = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
               for t in onnx.load(str(path)).graph.initializer}  # fmt: skip
    state = model.state_dict()
    if all(k in weights and weights[k].shape == v.shape for k, v in state.items()):
        model.load_state_dict({k: weights[k] for k in state})
        how = "state dict read from the ONNX initializers (names match)"
    else:
        file = cache / f"{name}.pt"
        if file.is_file():
            model.load_state_dict(torch.load(file))
            how = "retrained with models/build.py code and seed (cached)"
        else:
            build.seed_everything(build.SEED)
            model = build.train(spec.factory(), load_digits(spec.flat), spec)
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), file)
            how = "retrained with models/build.py code and seed"
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(test["input"])).numpy()
    reference = onnxprune.measure.verify.run(onnx.load(str(path)), {"input": test["input"]})
    diff = float(np.abs(logits - next(iter(reference.values()))).max())
    if diff > TOLERANCE:
        raise SystemExit(f"{name}: recovered torch model differs from {path.name} by {diff:.2e}")
    return model, f"{how}; max |logit diff| vs the ONNX file {diff:.1e}"


def tp_prune(
    model: nn.Module,
    example: torch.Tensor,
    classifier: str,
    criterion: str,
    ratio: float,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> nn.Module:
    """A pruned copy: MetaPruner, uniform per-layer `ratio`, the classifier's outputs kept."""
    pruned = copy.deepcopy(model).eval()
    ignored = [dict(pruned.named_modules())[classifier]]
    pruner = tp.pruner.MetaPruner(pruned, example, importance=TP_CRITERIA[criterion](),
                                  pruning_ratio=ratio, ignored_layers=ignored)  # fmt: skip
    if criterion == "taylor":  # gradients of the calibration loss, eval mode (BN stats frozen)
        pruned.zero_grad()
        for xb, yb in zip(x.split(64), y.split(64), strict=True):
            F.cross_entropy(pruned(xb), yb, reduction="sum").backward()
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    return pruned.eval()


def tp_ratio(model: nn.Module, example: torch.Tensor, classifier: str, t: float) -> float:
    """Smallest uniform pruning_ratio whose MACs (count_ops_and_params) ≤ (1 − t)."""
    full = count_ops_and_params(model, example)[0]
    lo, hi = 0.0, 0.99
    for _ in range(10):
        mid = (lo + hi) / 2
        macs = count_ops_and_params(tp_prune(model, example, classifier, "l1", mid),
                                             example)[0]  # fmt: skip
        lo, hi = (mid, hi) if macs > (1 - t) * full else (lo, mid)
    return hi


def reestimate_bn(model: nn.Module, x: torch.Tensor) -> bool:
    """Recompute BatchNorm running statistics on `x` (cumulative average); False without BN."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for xb in x.split(64):
            model(xb)
    model.eval()
    return True


def export(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """Legacy TorchScript export, as models/build.py does (BN folded)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        build.export_legacy(model, example.repeat(2, *([1] * (example.ndim - 1))), path)
        return onnx.load(str(path))


def _row(t: float, model: onnx.ModelProto, test: dict, base_macs: int, **extra) -> dict:
    return {"target": t, "macs_reduction": 1 - count(model).macs / base_macs,
            "accuracy": accuracy(model, test), "std": 0.0, **extra}  # fmt: skip


# ----------------------------------------------------------------------------- report


def plot(name: str, result: dict) -> None:
    """Accuracy vs MACs reduction, both tools, one PNG per model (skipped without matplotlib)."""
    plt = pyplot()
    if plt is None:
        print("plot skipped: matplotlib is not installed")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for tool, style in (("onnxprune", "-"), ("torch_pruning", "--")):
        for label, rows in result[tool].items():
            rows = [r for r in rows if r["accuracy"] is not None]
            ls = ":" if "BN" in label else style
            x = [100 * r["macs_reduction"] for r in rows]
            y = [100 * r["accuracy"] for r in rows]
            err = [100 * r["std"] for r in rows]
            prefix = "TP " if tool == "torch_pruning" else ""
            ax.errorbar(x, y, yerr=err if any(err) else None, ls=ls, marker="o", ms=3,
                        label=prefix + label)  # fmt: skip
    ax.axhline(100 * result["base_accuracy"], color="grey", lw=0.8, ls=":")
    title = f"{name}: onnxprune (solid) vs Torch-Pruning (dashed; dotted = BN re-est.)"
    ax.set(xlabel="MACs reduction (%)", ylabel="test accuracy before fine-tuning (%)", title=title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / f"torch_pruning_{name}.png", dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    """Summary (best of each tool) first, then every method per model."""
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, Python {m['python']}, ORT {m['onnxruntime']}, "
        f"torch {m.get('torch')}, torch-pruning {m.get('torch_pruning')}. "
        f"Command: `{results['command']}` ({results.get('seconds', 0):.0f} s).",
        "",
    ]
    lines += _table(results) + [""] + _summary(results) + [""]
    for name, model in results["models"].items():
        targets = [r["target"] for r in next(iter(model["onnxprune"].values()))]
        lines.append(f"**{name}** (unpruned {100 * model['base_accuracy']:.1f} %; "
                     f"torch model: {model['recovered']})")  # fmt: skip
        lines += ["", "| tool | method | " + " | ".join(f"{100 * t:.0f} %" for t in targets) + " |",
                  "|---" * (len(targets) + 2) + "|"]  # fmt: skip
        for tool, title in (("onnxprune", "onnxprune"), ("torch_pruning", "Torch-Pruning")):
            for label, rows in model[tool].items():
                lines.append(f"| {title} | {label} | " + " | ".join(map(_cell, rows)) + " |")
        lines.append("")
    return "\n".join(lines)


def _table(results: dict, shown: tuple[float, ...] = (0.3, 0.5, 0.7)) -> list[str]:
    """One table: per model, every method of both tools at the `shown` reductions, then the
    measured batch-1 speedups of onnxprune's id and Torch-Pruning's L1 models."""
    head = "| model | tool | method | " + " | ".join(f"{100 * t:.0f} %" for t in shown) + " |"
    lines = [head, "|---" * (len(shown) + 3) + "|"]
    for name, model in results["models"].items():
        for tool, title in (("onnxprune", "onnxprune"), ("torch_pruning", "Torch-Pruning")):
            for label, rows in model[tool].items():
                by_target = {r["target"]: r for r in rows}
                cells = [_cell(by_target[t]) if t in by_target else "–" for t in shown]
                lines.append(f"| {name} | {title} | {label} | " + " | ".join(cells) + " |")
        speed = {float(k): v for k, v in model.get("latency", {}).items()}
        for key, title in (("onnxprune_id", "onnxprune id"), ("tp_l1", "Torch-Pruning l1")):
            cells = [f"{speed[t][key]:.2f}×" if t in speed else "–" for t in shown]
            lines.append(f"| {name} | speedup | {title} (batch 1) | " + " | ".join(cells) + " |")
    return lines


def _summary(results: dict) -> list[str]:
    """Per model and reduction: the best method of each tool (TP with BN re-estimation where the
    model has BN) and the margin."""
    lines = ["| model | MACs −% | onnxprune best | Torch-Pruning best | margin (points) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, model in results["models"].items():
        tp_rows = {k: v for k, v in model["torch_pruning"].items() if "BN" in k}
        tp_rows = tp_rows or model["torch_pruning"]
        for i, row in enumerate(next(iter(model["onnxprune"].values()))):
            ours_best = max(model["onnxprune"].items(), key=lambda kv: _acc(kv[1][i]))
            tp_best = max(tp_rows.items(), key=lambda kv: _acc(kv[1][i]))
            a, b = ours_best[1][i]["accuracy"], tp_best[1][i]["accuracy"]
            lines.append(f"| {name} | {100 * row['target']:.0f} | {100 * a:.1f} ({ours_best[0]}) "
                         f"| {100 * b:.1f} ({tp_best[0]}) | {100 * (a - b):+.1f} |")  # fmt: skip
    return lines


def _acc(row: dict) -> float:
    return -1.0 if row["accuracy"] is None else row["accuracy"]


def _cell(row: dict) -> str:
    if row["accuracy"] is None:
        return "fails¹"
    text = f"{100 * row['accuracy']:.1f}" + (f" ± {100 * row['std']:.1f}" if row["std"] else "")
    if abs(row["macs_reduction"] - row["target"]) > 0.02:
        text += f" [{100 * row['macs_reduction']:.0f} %]"
    return text


def _machine() -> dict:
    from importlib.metadata import version

    return {**machine(), "torch": torch.__version__, "torch_pruning": version("torch-pruning"),
            "threads": torch.get_num_threads()}  # fmt: skip


if __name__ == "__main__":
    main()
