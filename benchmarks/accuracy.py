"""Accuracy before fine-tuning vs MACs reduction, every method on every digits reference model.

All methods run in the same process on the same calibration split (models/digits*_calib.npz) and
are evaluated on the disjoint test split (540 images). Each point prunes to a MAC target
(`target_macs` = 1 − reduction) with `round_to=1` and `prune_residual=True` (residual streams
and SE gates pruned too, as other pruners do), so every method lands on the same MACs; a cell
whose reached reduction misses the target by more than 2 points shows it in brackets.
Random is the mean ± std over 5 seeds. Wall time and the Python-side peak memory (tracemalloc) of
one prune per method at 50 % are recorded too. A failing prune is recorded as a failed cell.

    python benchmarks/accuracy.py                 # full run, writes results/accuracy.json
    python benchmarks/accuracy.py --quick         # two models, two reductions
    python benchmarks/accuracy.py --markdown      # print the tables of the last run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxprune
from onnxprune.measure.verify import run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "accuracy.json"
REDUCTIONS = (0.1, 0.3, 0.5, 0.7, 0.85)
SEEDS = (0, 1, 2, 3, 4)
METHODS: dict[str, dict] = {
    "id": {"method": "id"},
    "id + bias": {"method": "id", "compensate": "bias"},
    "id + recalibrate": {"method": "id", "recalibrate": True},
    "id + bias + recalibrate": {"method": "id", "compensate": "bias", "recalibrate": True},
    "magnitude": {"method": "magnitude"},
    "magnitude + lsq": {"method": "magnitude", "compensate": "lsq"},
    "magnitude + recalibrate": {"method": "magnitude", "recalibrate": True},
    "taylor": {"method": "taylor"},
    "random": {"method": "random"},
}
EXTRA: dict[str, dict] = {  # with --all: ablations and the other selection criteria
    "id (uniform widths)": {"method": "id", "uniform": True},
    "fpgm": {"method": "fpgm"},
    "activation": {"method": "activation"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="vgg and resnet at 50/85 % only")
    parser.add_argument("--markdown", action="store_true", help="print tables of the last run")
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--all", action="store_true", help="also the ablations in EXTRA")
    parser.add_argument("--out", default=str(RESULTS), help="results file (default: %(default)s)")
    parser.add_argument("--skip", default="", help="comma-separated method labels to leave out")
    parser.add_argument(
        "--exact-borders",
        action="store_true",
        help="prune with exact_borders=True (exact shifts at padded borders)",
    )
    parser.add_argument("--reductions", help="comma-separated MACs reductions (default: "
                        + ",".join(map(str, REDUCTIONS)) + ")")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    manifest = json.loads((ROOT / "models" / "manifest.json").read_text())
    order = ("vgg", "resnet", "mobilenetv2", "senet", "mlp", "inception")  # the rest after these
    names = (
        args.models.split(",")
        if args.models
        else sorted(
            manifest["models"], key=lambda n: (order.index(n) if n in order else len(order), n)
        )
    )
    reductions = tuple(map(float, args.reductions.split(","))) if args.reductions else REDUCTIONS
    if args.quick:
        names, reductions = [n for n in names if n in ("vgg", "resnet")], (0.5, 0.85)
    methods = {k: v for k, v in {**METHODS, **(EXTRA if args.all else {})}.items()
               if k not in args.skip.split(",")}  # fmt: skip
    if args.exact_borders:
        methods = {k: {**v, "exact_borders": True} for k, v in methods.items()}
    command = "python benchmarks/accuracy.py" + (" --all" if args.all else "")
    command += " --exact-borders" if args.exact_borders else ""
    results = {"machine": machine(), "command": command, "models": {}, "seconds": {}}
    if args.models and out.is_file():  # a partial run adds its models to the last results
        previous = json.loads(out.read_text())
        results["models"], results["seconds"] = previous["models"], previous.get("seconds", {})
        results["command"] = previous["command"] + f"; {command} --models {args.models}"
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        start = time.perf_counter()
        results["models"][name] = bench_model(manifest["models"][name], reductions, methods)
        results["seconds"][name] = time.perf_counter() - start
        out.write_text(json.dumps(results, indent=1) + "\n")  # after every model
        print(f"{name}: done in {results['seconds'][name]:.0f} s", flush=True)
    print(markdown(results))


def bench_model(entry: dict, reductions: tuple[float, ...], methods: dict[str, dict]) -> dict:
    path = ROOT / "models" / entry["onnx"]
    calib = dict(np.load(ROOT / "models" / entry["calib"]))
    test = dict(np.load(ROOT / "models" / entry["test"]))
    calib_data = {"input": calib["input"], "labels": calib["labels"]}
    base = accuracy(onnxprune.prune(path, ratio=0.0, round_to=1, verify=False).model, test)
    out = {"base_accuracy": base, "points": {}, "cost": {}}
    for label, spec in methods.items():
        out["points"][label] = [point(path, spec, r, calib_data, test) for r in reductions]
        print(f"  {label}: " + " ".join(_cell(row) for row in out["points"][label]), flush=True)
        if all(row.get("error") for row in out["points"][label]):
            out["cost"][label] = {"seconds_at_50": None, "python_peak_mib_at_50": None}
        else:
            out["cost"][label] = peak_cost(path, spec, calib_data)
    return out


def point(path: Path, spec: dict, reduction: float, data: dict, test: dict) -> dict:
    """One (method, reduction) cell; random over SEEDS; a library failure is recorded."""
    seeds = SEEDS if spec["method"] == "random" else (0,)
    accs, macs, seconds = [], [], []
    for seed in seeds:
        start = time.perf_counter()
        try:
            result = prune(path, spec, 1 - reduction, data, seed)
        except Exception as exc:  # noqa: BLE001 - a failure is a result too
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            return {"target": reduction, "macs_reduction": None, "accuracy": None, "std": 0.0,
                    "seconds": None, "error": f"{type(exc).__name__}: {first}"}  # fmt: skip
        seconds.append(time.perf_counter() - start)
        accs.append(accuracy(result.model, test))
        before, after = result.report.macs
        macs.append(1 - after / before)
    return {"target": reduction, "macs_reduction": float(np.mean(macs)),
            "accuracy": float(np.mean(accs)), "std": float(np.std(accs)),
            "seconds": float(np.mean(seconds)), "seeds": len(seeds)}  # fmt: skip


def prune(path: Path, spec: dict, keep: float, data: dict, seed: int):
    options = {k: v for k, v in spec.items() if k not in ("method", "uniform")}
    dataset = onnxprune.calib.data.Dataset({"input": data["input"]}, labels=data["labels"])
    if spec.get("uniform"):
        return onnxprune.prune(
            path,
            method=spec["method"],
            data=dataset,
            round_to=1,
            seed=seed,
            verify=False,
            ratio=uniform_ratio(path, keep),
            prune_residual=True,
            **options,
        )
    return onnxprune.prune(
        path,
        method=spec["method"],
        data=dataset,
        target_macs=keep,
        round_to=1,
        seed=seed,
        verify=False,
        prune_residual=True,
        **options,
    )


def uniform_ratio(path: Path, keep: float) -> float:
    """The uniform channel ratio magnitude would use for this MAC target."""
    result = onnxprune.prune(
        path, method="magnitude", target_macs=keep, round_to=1, verify=False, prune_residual=True
    )
    return result.report.target.ratio


def peak_cost(path: Path, spec: dict, data: dict) -> dict:
    tracemalloc.start()
    start = time.perf_counter()
    prune(path, spec, 0.5, data, 0)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds_at_50": seconds, "python_peak_mib_at_50": peak / 2**20}


def accuracy(model, test: dict) -> float:
    logits = next(iter(run(model, {"input": test["input"]}).values()))
    return float((logits.argmax(axis=1) == test["labels"]).mean())


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxprune": onnxprune.__version__,
    }


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']['cpu']}, ORT {results['machine']['onnxruntime']}. "
        f"Command: `{results['command']}`.",
        "",
    ]
    for name, model in results["models"].items():
        targets = [row["target"] for row in next(iter(model["points"].values()))]
        lines.append(f"**{name}** (unpruned test accuracy {100 * model['base_accuracy']:.1f} %)")
        lines.append("")
        lines.append(
            "| method | "
            + " | ".join(f"{100 * t:.0f} %" for t in targets)
            + " | s at 50 % | peak MiB |"
        )
        lines.append("|---" * (len(targets) + 3) + "|")
        for label, rows in model["points"].items():
            cells = [_cell(r) for r in rows]
            cost = model["cost"][label]
            if cost["seconds_at_50"] is None:
                tail = " | – | – |"
            else:
                tail = f" | {cost['seconds_at_50']:.1f} | {cost['python_peak_mib_at_50']:.0f} |"
            lines.append(f"| {label} | " + " | ".join(cells) + tail)
        lines.append("")
    return "\n".join(lines)


def _cell(row: dict) -> str:
    if row["accuracy"] is None:
        return "fails"
    text = f"{100 * row['accuracy']:.1f}" + (f" ± {100 * row['std']:.1f}" if row["std"] else "")
    if abs(row["macs_reduction"] - row["target"]) > 0.02:
        text += f" [{100 * row['macs_reduction']:.0f} %]"
    return text


if __name__ == "__main__":
    main()
