"""Torch-Pruning at its best options against onnxprune, each tool's best picked on validation.

Every digits CNN is pruned to 50 / 70 / 85 % fewer MACs by both tools, fitted on the same 384
calibration samples (benchmarks/defaults.py's split); each tool's best variant per cell is the one
with the highest accuracy on the other 128 calibration samples (validation), among those that
land within 0.01 of the MAC target; the test split (540 images) is only reported.

Torch-Pruning 1.6.1 (`MetaPruner`), TP_VARIANTS: every importance it has — L1 and L2 magnitude
(L2 is its group norm: `GroupMagnitudeImportance(p=2)`), BN scale, LAMP, FPGM, Taylor (summed
cross-entropy gradients) and Hessian (OBD: mean over samples of the squared per-sample
gradient) — both per-layer uniform and with `global_pruning` + `isomorphic`; L1 with
`global_pruning` alone; and L1 isomorphic in 5 iterative steps; each followed by BatchNorm
re-estimation on the fit samples (after every step when iterative, gradients recomputed
before every step). `pruning_ratio` is searched (regula falsi, then bisection) so that the
conv/linear MACs — onnxprune's count, computed on the torch model — land at most at, and
within 0.5 % of the original below, 1 − t (where one channel's MACs exceed that window, the
closest below 1 − t); the classifier's outputs are kept; no layer loses more than 90 %
(onnxprune's `--max-group-ratio`).
Torch-Pruning keeps its default `round_to=None` (any width: the most accurate it can be at a
given MAC count). Its variants are scored on the torch model; the best by validation is
exported (BatchNorm folded) and scored again as ONNX by ORT and onnxprune's counter.

Both tools prune the same function, the bundled `models/<name>.onnx`. Its BatchNorms are
folded, so Torch-Pruning gets models/build.py's architecture holding the file's weights
(models/weights.py; max |Δ logit| against ORT checked at float rounding): each BatchNorm is the
identity on its conv's output at that output's per-channel mean μ and variance σ² on the fit
samples (running stats μ, σ², weight √(σ² + ε), bias μ + b, the conv without bias), so its
scale is the channel's output spread, as BN-scale and group-norm importances expect, and BN
re-estimation starts from the statistics of the data. A conv before a BatchNorm can be scaled
per channel without changing the function, and magnitude importances rank by that scale, so
every Torch-Pruning variant also runs (label suffix `, unit`) on the same model with those
convs scaled to outputs of unit variance; its best is chosen among both.

onnxprune: `id` with its defaults (`--round-to 16`, sequential refit, residual groups pruned
only where the MAC target needs them), with `--prune-residual` at `--round-to` 16 and 1, and
plain `id` (`--compensate none --no-recalibrate --no-sequential`) with its defaults and with
`--prune-residual --round-to 1`.

    python benchmarks/tp_compare.py --out benchmarks/results/tp_compare.json
    python benchmarks/tp_compare.py --markdown
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from itertools import product
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

import onnxprune  # noqa: E402
from benchmarks.defaults import logits, splits, top1  # noqa: E402
from benchmarks.torch_pruning import CLASSIFIER, export, reestimate_bn  # noqa: E402
from models import weights  # noqa: E402
from onnxprune.measure.cost import count  # noqa: E402

MODELS = ("vgg", "resnet", "mobilenetv2", "inception", "senet")
REDUCTIONS = (0.5, 0.7, 0.85)
LANDING = 0.01  # a cell counts only if its kept MACs are at most 1 - t + LANDING
IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "bn-scale": lambda: tp.importance.BNScaleImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "fpgm": lambda: tp.importance.FPGMImportance(),
    "taylor": lambda: tp.importance.TaylorImportance(),
    "hessian": lambda: tp.importance.HessianImportance(),
}
TP_VARIANTS = (  # (importance, scope, iterative steps); every one with BN re-estimation
    *((importance, scope, 1) for scope in ("local", "isomorphic") for importance in IMPORTANCES),
    ("l1", "global", 1),
    ("l1", "isomorphic", 5),
)
GAUGES = {"": False, ", unit": True}  # label suffix → conv outputs scaled to unit variance
SCOPES = {
    "local": {},
    "global": {"global_pruning": True},
    "isomorphic": {"global_pruning": True, "isomorphic": True},
}
SEARCH_PRUNES = 20  # pruning_ratio search: prunes at most
SEARCH_RESOLUTION = 2e-4  # … and stops when the ratios above and below the budget are this close
HESSIAN_SAMPLES = 32  # per-sample backward passes for the OBD diagonal
OURS = {  # label → prune options (`id` alone: its defaults)
    "id": {"method": "id"},
    "id --prune-residual": {"method": "id", "prune_residual": True},
    "id --prune-residual --round-to 1": {"method": "id", "prune_residual": True, "round_to": 1},
    "id plain": {"method": "id", "compensate": "none", "recalibrate": False, "sequential": False},
    "id plain --prune-residual --round-to 1": {
        "method": "id",
        "compensate": "none",
        "recalibrate": False,
        "sequential": False,
        "prune_residual": True,
        "round_to": 1,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tp_compare.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tools", default="onnxprune,torch_pruning")
    parser.add_argument("--reductions", default=",".join(map(str, REDUCTIONS)))
    parser.add_argument("--variants", default=",".join(OURS), help="onnxprune variants to run")
    parser.add_argument("--markdown", action="store_true", help="print the tables of --out")
    args = parser.parse_args()
    for label in set(OURS) - set(args.variants.split(",")):
        del OURS[label]
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if not args.markdown:
        for name in args.models.split(","):
            model = results.setdefault(name, {})
            for tool in args.tools.split(","):
                start = time.perf_counter()
                reductions = tuple(map(float, args.reductions.split(",")))
                before = dict(model.get(tool, {}))

                def save(cells: dict, tool: str = tool, before: dict = before, model=model) -> None:
                    """Write the results with `cells` so far (after every cell)."""
                    model[tool] = {**before, **cells}
                    args.out.write_text(json.dumps(results, indent=1) + "\n")

                MEASURE[tool](name, reductions, save)
                print(f"{name} {tool}: {time.perf_counter() - start:.0f} s", flush=True)
    print(markdown(results))
    print()
    print(goals(results))


# ----------------------------------------------------------------------------- onnxprune


Save = Callable[[dict], None]


def measure_ours(name: str, reductions: tuple[float, ...], save: Save) -> None:
    """Every onnxprune variant on the bundled `models/<name>.onnx` at every reduction:
    validation, test, MACs kept."""
    model = onnx.load(ROOT / "models" / f"{name}.onnx")
    fit, val, test = splits(name)
    score = Scorer(model, val, test)
    cells = {"original": score(model)}
    for reduction in reductions:
        for label, options in OURS.items():
            key = f"{label} @ {reduction}"
            start = time.perf_counter()
            pruned = onnxprune.prune(model, target_macs=1 - reduction, data=fit, verify=False,
                                     **options)  # fmt: skip
            seconds = time.perf_counter() - start
            cells[key] = score(pruned.model, seconds=seconds)
            print(name, key, cells[key], flush=True)
            save(cells)


class Scorer:
    """Scores pruned ONNX models of one original against its validation and test splits."""

    def __init__(self, original: onnx.ModelProto, val: tuple, test: tuple) -> None:
        self.val, self.test = val, test
        self.reference = logits(original, val[0])
        self.macs = count(original).macs

    def __call__(self, model: onnx.ModelProto, **extra) -> dict:
        """Validation and test top-1, the relative L2 deviation of the validation logits from
        the original's, and the MACs kept (onnxprune's counter)."""
        got = logits(model, self.val[0])
        return {
            "validation": float(np.mean(got.argmax(1) == self.val[1])),
            "validation_rel_l2": float(
                np.linalg.norm(got - self.reference) / np.linalg.norm(self.reference)
            ),
            "test": top1(model, *self.test),
            "macs_kept": count(model).macs / self.macs,
            **extra,
        }


# ----------------------------------------------------------------------------- Torch-Pruning


def measure_tp(name: str, reductions: tuple[float, ...], save: Save) -> None:
    """Every Torch-Pruning variant in TP_VARIANTS at every reduction, after BN re-estimation:
    validation and test accuracy and MACs computed on the torch model; the best by validation
    is exported and scored again as an ONNX file (`onnx`: ORT accuracy, onnxprune's counter)."""
    fit, val, test = splits(name)
    models = {gauge: torch_original(name, fit.arrays["input"], test[0], unit_outputs=unit)
              for gauge, unit in GAUGES.items()}  # fmt: skip
    x, y = torch.from_numpy(fit.arrays["input"]), torch.from_numpy(fit.labels)
    example = x[:1]
    score = Scorer(onnx.load(ROOT / "models" / f"{name}.onnx"), val, test)
    if (torch_macs := macs(models[""], example)) != score.macs:
        raise SystemExit(f"{name}: torch-side MACs {torch_macs} ≠ onnxprune's {score.macs}")
    cells: dict[str, dict] = {}
    for reduction in reductions:
        budget = (1 - reduction) * score.macs
        uniform = Run(name, "l1", "local", 1, x, y).bisect(models[""], example, budget, None)
        pruned_models = {}
        for (importance, scope, steps), (gauge, model) in product(TP_VARIANTS, models.items()):
            start = time.perf_counter()
            run = Run(name, importance, scope, steps, x, y)
            ratio = uniform if scope == "local" else run.bisect(model, example, budget, uniform)
            pruned = run.prune(model, example, ratio, bn=True)
            label = f"{importance} {scope}" + (f" {steps} steps" if steps > 1 else "") + gauge
            cells[f"{label} @ {reduction}"] = {
                **torch_scores(pruned, example, val, test, score),
                "ratio": ratio,
                "seconds": time.perf_counter() - start,
            }
            pruned_models[label] = pruned
            print(name, label, reduction, cells[f"{label} @ {reduction}"], flush=True)
            save(cells)
        label, cell = best(cells, reduction)
        if cell is not None:
            cell["onnx"] = score(export(pruned_models[label], example))
            save(cells)


def torch_scores(model: nn.Module, example: torch.Tensor, val: tuple, test: tuple, score) -> dict:
    """The Scorer's numbers computed on the torch model itself (no export)."""
    with torch.no_grad():
        got = model(torch.from_numpy(val[0])).double().numpy()
        test_logits = model(torch.from_numpy(test[0])).numpy()
    return {
        "validation": float(np.mean(got.argmax(1) == val[1])),
        "validation_rel_l2": float(
            np.linalg.norm(got - score.reference) / np.linalg.norm(score.reference)
        ),
        "test": float(np.mean(test_logits.argmax(1) == test[1])),
        "macs_kept": macs(model, example) / score.macs,
    }


class Run:
    """One Torch-Pruning configuration: importance × scope × steps on one model's fit data."""

    def __init__(self, name: str, importance: str, scope: str, steps: int, x, y) -> None:
        self.classifier = CLASSIFIER.get(name, "fc")
        self.importance, self.scope, self.steps = importance, scope, steps
        self.x, self.y = x, y
        self._first: dict[str, torch.Tensor] | None = None  # gradients on the unpruned model

    def prune(self, model: nn.Module, example: torch.Tensor, ratio: float, bn: bool) -> nn.Module:
        """A pruned copy; with `bn`, BatchNorm statistics re-estimated after every step."""
        pruned = copy.deepcopy(model).eval()
        pruner = tp.pruner.MetaPruner(
            pruned,
            example,
            importance=IMPORTANCES[self.importance](),
            pruning_ratio=ratio,
            iterative_steps=self.steps,
            max_pruning_ratio=0.9,
            ignored_layers=[dict(pruned.named_modules())[self.classifier]],
            **SCOPES[self.scope],
        )
        for step in range(self.steps):
            if step == 0 and self._first is not None:  # every prune starts from the same model
                for name, param in pruned.named_parameters():
                    grad = self._first.get(name)
                    param.grad = None if grad is None else grad.clone()
            else:
                self._gradients(pruned)
                if step == 0:
                    self._first = {
                        n: p.grad.clone()
                        for n, p in pruned.named_parameters()
                        if p.grad is not None
                    }
            pruner.step()
            if bn:
                reestimate_bn(pruned, self.x)
        pruned.zero_grad(set_to_none=True)
        return pruned.eval()

    def bisect(
        self, model: nn.Module, example: torch.Tensor, budget: float, guess: float | None
    ) -> float:
        """A pruning_ratio whose MACs are at most `budget` and less than 0.5 % of the original's
        MACs below it: regula falsi (Illinois) from `guess` for 8 prunes, then bisection, at
        most SEARCH_PRUNES prunes in all. Where no ratio lands in that window (removing the
        next channel in the ranking takes away more than 0.5 % of the MACs), the smallest ratio
        found that fits the budget, to within SEARCH_RESOLUTION."""
        full = macs(model, example)
        lo, f_lo, hi, f_hi = 0.0, full - budget, 0.95, None  # f: MACs over budget
        ratio, last = (0.5 if guess is None else guess), ""
        for attempt in range(SEARCH_PRUNES):
            value = macs(self.prune(model, example, ratio, bn=False), example) - budget
            if value <= 0:
                if value > -0.005 * full:
                    return ratio
                hi, f_hi = ratio, value
                f_lo = f_lo / 2 if last == "hi" else f_lo
                last = "hi"
            else:
                lo, f_lo = ratio, value
                f_hi = f_hi / 2 if last == "lo" and f_hi is not None else f_hi
                last = "lo"
            if f_hi is not None and hi - lo < SEARCH_RESOLUTION:
                break
            falsi = f_hi is not None and attempt < 8
            ratio = lo + f_lo * (hi - lo) / (f_lo - f_hi) if falsi else (lo + hi) / 2
        return hi

    def _gradients(self, model: nn.Module) -> None:
        """Fill .grad for the gradient importances (model in eval mode: BN statistics fixed)."""
        model.zero_grad(set_to_none=True)
        if self.importance == "taylor":
            for xb, yb in zip(self.x.split(64), self.y.split(64), strict=True):
                F.cross_entropy(model(xb), yb, reduction="sum").backward()
        elif self.importance == "hessian":
            squares = {p: torch.zeros_like(p) for p in model.parameters()}
            for i in range(HESSIAN_SAMPLES):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(self.x[i : i + 1]), self.y[i : i + 1]).backward()
                for p, total in squares.items():
                    if p.grad is not None:
                        total += p.grad.pow(2)
            for p, total in squares.items():
                p.grad = total / HESSIAN_SAMPLES


def macs(model: nn.Module, example: torch.Tensor) -> int:
    """Conv and Linear MACs per sample as onnxprune counts them: |Y| · prod(W.shape[1:])."""
    total = 0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * int(np.prod(module.weight.shape[1:]))

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(example)
    for handle in handles:
        handle.remove()
    return total


def torch_original(name: str, fit: np.ndarray, test: np.ndarray, unit_outputs: bool) -> nn.Module:
    """The torch digits model computing what the bundled `models/<name>.onnx` computes: its
    folded weights in models/build.py's architecture (with `unit_outputs`, each conv before a
    BatchNorm scaled to outputs of unit variance), every BatchNorm the identity at the
    statistics of its conv's outputs on `fit` (models/weights.py), checked against ORT on
    `test` (max |Δ logit| at float rounding, else an error)."""
    try:
        return weights.load(name, fit, check=test, unit_outputs=unit_outputs)
    except ValueError as err:
        raise SystemExit(f"{name}: {err}") from err


MEASURE = {
    "onnxprune": measure_ours,
    "torch_pruning": measure_tp,
}


# ----------------------------------------------------------------------------- report


def best(cells: dict, reduction: float, keep: Callable[[str], bool] = lambda label: True) -> tuple:
    """(label, cell) with the highest validation accuracy (ties: the smaller validation rel-L2)
    among the cells at `reduction` whose label `keep` accepts and that land within LANDING of
    the MAC target; (None, None) if none does."""
    suffix = f" @ {reduction}"
    landed = [
        (k.removesuffix(suffix), c)
        for k, c in cells.items()
        if k.endswith(suffix)
        and keep(k.removesuffix(suffix))
        and c["macs_kept"] <= 1 - reduction + LANDING
    ]
    if not landed:
        return None, None
    return max(landed, key=lambda kc: (kc[1]["validation"], -kc[1]["validation_rel_l2"]))


def markdown(results: dict) -> str:
    """Per model and reduction: onnxprune's best by validation at --round-to 16 and at 1,
    Torch-Pruning's best by validation, the test margins, and `id` with its defaults and plain."""
    lines = [
        "| model | MACs −% | onnxprune best, `--round-to 16` | onnxprune best, `--round-to 1` "
        "| Torch-Pruning best | margin 16 / 1 (test) | `id` (defaults) | plain `id` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, model in results.items():
        ours = model.get("onnxprune", {})
        theirs = model.get("torch_pruning", {})
        for reduction in REDUCTIONS:
            picks = [
                best(ours, reduction, lambda label: "--round-to 1" not in label),
                best(ours, reduction, lambda label: "--round-to 1" in label),
                best(theirs, reduction),
            ]
            row = [name, f"{100 * reduction:.0f}"]
            row += ["–" if cell is None else _cell(label, cell) for label, cell in picks]
            margins = [
                f"{100 * (cell['test'] - picks[2][1]['test']):+.1f}"
                if cell and picks[2][1]
                else "–"
                for _, cell in picks[:2]
            ]
            row.append(" / ".join(margins))
            for label in ("id", "id plain"):
                cell = ours.get(f"{label} @ {reduction}")
                row.append("–" if cell is None else _cell("", cell))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def goals(results: dict) -> str:
    """Test accuracy of `id` with its defaults, and with --prune-residual, against the original:
    the goal is within 1 point at 50 % fewer MACs and within 3 at 70 %."""
    lines = [
        "| model | MACs −% | original | `id` (defaults) | Δ | `id --prune-residual` | Δ |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, model in results.items():
        ours = model.get("onnxprune", {})
        if "original" not in ours:
            continue
        base = ours["original"]["test"]
        for reduction in REDUCTIONS:
            row = [name, f"{100 * reduction:.0f}", f"{100 * base:.1f}"]
            for label in ("id", "id --prune-residual"):
                cell = ours.get(f"{label} @ {reduction}")
                row += ["–", "–"] if cell is None else [_cell("", cell), _delta(cell, base)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _delta(cell: dict, base: float) -> str:
    """Test accuracy against the original's, in points."""
    return f"{100 * (cell['test'] - base):+.1f}"


def _cell(label: str, cell: dict) -> str:
    """'validation / test [MACs kept] label', accuracies in %."""
    text = f"{100 * cell['validation']:.1f} / {100 * cell['test']:.1f} [{cell['macs_kept']:.3f}]"
    return f"{text} {label}".strip()


if __name__ == "__main__":
    main()
