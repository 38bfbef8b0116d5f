"""Fine-tuning by distillation: test accuracy of the pruned digits CNNs before and after.

Every digits CNN is pruned with `id` (`--start`: `sequential`, its defaults — intercept +
recalibration, the maps refit sequentially; `id+bias+recalibrate`, the same fitted in one shot;
`id`, plain; all with `round_to=1`, `--prune-residual`) to 70 % and 85 % fewer MACs from the 512
calibration images, then fine-tuned (`--kinds`, each the same Adam steps, batch, learning rate,
cosine schedule and early stopping on the same 64 held-out calibration images, `--seed`):

- `distill`: unlabeled, distillation from the original on the 512 calibration images;
- `labels`: the same plus cross-entropy on the calibration labels;
- `extra`: unlabeled, the calibration images plus the 745 images of the digits train split that
  the calibration subset left out (their labels are not read; disjoint from the test split).
- `tp_labels`: Torch-Pruning's variant best on validation at that reduction in
  `results/tp_compare.json` (`benchmarks/tp_compare.py`), pruned again on the 512 images to the
  same MACs, BatchNorm re-estimated, exported, then fine-tuned like `labels` (no hints: its
  channels are not tracked).

Accuracy is on the disjoint test split; CPU seconds (`time.process_time`, all threads) are
recorded per fine-tune, torch on one thread.

`--select` chooses settings without the test split: prune and fine-tune on 384 calibration
images, score the accuracy on the other 128 (stratified, seeded by `--split-seed`); every
combination of the comma-separated `--lr`, `--steps`, `--augment`, `--hint-weight`, `--ema`,
`--temperature`, `--start` values is run.

    python benchmarks/finetune.py --out benchmarks/results/finetune_goals.json
    python benchmarks/finetune.py --markdown benchmarks/results/finetune_defaults.json
    python benchmarks/finetune.py --select --models mobilenetv2 --keep 0.15 --lr 1e-3,3e-3

The Inception goal cells, as chosen on held-out calibration images (docs/RESULTS.md,
"Recovering Inception at 70 and 85 %"): the one-shot start and longer schedules, i.e.
`--start id+bias+recalibrate --kinds distill --models inception --lr 3e-3 --augment 0
--hint-weight 0.1` with `--keep 0.15 --steps 5000` and `--keep 0.30 --steps 3000`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as a script, this file's folder comes first on sys.path and would shadow `torch_pruning`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import onnxprune  # noqa: E402
from models.data import load as load_digits  # noqa: E402
from onnxprune.calib.data import Dataset  # noqa: E402
from onnxprune.measure.cost import count  # noqa: E402
from onnxprune.measure.verify import run  # noqa: E402
from onnxprune.recover.finetune import finetune  # noqa: E402
from onnxprune.recover.hints import hints_from_plans  # noqa: E402

MODELS = ("resnet", "senet", "vgg", "inception", "mobilenetv2")
KEEP = (0.30, 0.15)  # fraction of MACs kept: 70 % and 85 % fewer
KINDS = ("distill", "labels", "extra", "tp_labels")
STARTS = {
    "sequential": {},  # `id`'s defaults: intercept + recalibration, maps refit sequentially
    "id+bias+recalibrate": {"sequential": False},  # the same, every map fitted in one shot
    "id": {"compensate": "none", "recalibrate": False, "sequential": False},
}


def accuracy(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of `model` on (x, labels) in ONNX Runtime."""
    return float(np.mean(logits(model, x).argmax(1) == labels))


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run(model, {"input": x})[model.graph.output[0].name]


def kl(student: onnx.ModelProto, teacher: onnx.ModelProto, x: np.ndarray, temp: float = 4.0):
    """Mean KL(softmax(t/T) ‖ softmax(s/T))·T² on `x`: a finer score than accuracy on few images."""
    s, t = (torch.from_numpy(logits(m, x)) / temp for m in (student, teacher))
    log_s, log_t = torch.log_softmax(s, 1), torch.log_softmax(t, 1)
    return float((log_t.exp() * (log_t - log_s)).sum(1).mean() * temp**2)


def prune(name: str, keep: float, x: np.ndarray, start: str) -> onnxprune.Result:
    """`models/<name>.onnx` pruned by `start` to `keep` of its MACs, fitted on `x`."""
    return onnxprune.prune(
        ROOT / f"models/{name}.onnx",
        method="id",
        target_macs=keep,
        prune_residual=True,
        round_to=1,
        data={"input": x},
        verify=False,
        **STARTS[start],
    )


def hints(result: onnxprune.Result) -> tuple:
    """Hint tensors of a pruned model: its groups' taps, graph outputs left out."""
    outputs = [o.name for o in result.model.graph.output]
    return hints_from_plans(result.groups, result.plans, skip=outputs)


def one(name: str, keep: float, how: str, kinds: list[str], opts: dict, save) -> dict:
    """Prune `name` to `keep` of its MACs by the start `how`, fine-tune it every way in `kinds`,
    test accuracy; `save(row)` after each (a long run keeps what it measured)."""
    calib, test = (
        np.load(ROOT / "models/digits32_calib.npz"),
        np.load(ROOT / "models/digits32_test.npz"),
    )
    x, y, tx, ty = calib["input"], calib["labels"], test["input"], test["labels"]
    teacher = onnx.load(ROOT / f"models/{name}.onnx")
    start = time.process_time()
    result = prune(name, keep, x, how)
    pruned, taps = result.model, hints(result)
    row = {
        "model": name,
        "fewer_macs": round(1 - keep, 2),
        "start": how,
        "macs_kept": round(count(pruned).macs / count(teacher).macs, 3),
        "original": accuracy(teacher, tx, ty),
        "pruned": accuracy(pruned, tx, ty),
        "prune_cpu_s": round(time.process_time() - start, 1),
    }
    for kind in kinds:
        start = time.process_time()
        data = np.concatenate([x, unused_train()]) if kind == "extra" else x
        labels = y if kind in ("labels", "tp_labels") else None
        student, student_taps = pruned, taps
        if kind == "tp_labels":
            student, student_taps, row["tp"] = torch_pruned(name, keep, x, y, tx, ty)
            row["tp_macs_kept"] = round(count(student).macs / count(teacher).macs, 3)
        result = finetune(
            student, teacher, Dataset({"input": data}), labels=labels, hints=student_taps, **opts
        )
        how = f"{result.steps_run} (best {result.best_step}, {result.stopped})"
        row[kind] = accuracy(result.model, tx, ty)
        row[f"{kind}_cpu_s"] = round(time.process_time() - start, 1)
        row[f"{kind}_steps"] = how
        save(row)
    return row


def torch_pruned(name: str, keep: float, x: np.ndarray, y: np.ndarray, tx, ty) -> tuple:
    """(ONNX model, hints (none), description) of Torch-Pruning's variant that was best on
    validation at this reduction in `benchmarks/results/tp_compare.json`, pruned again here on
    `x` (labels `y` for its gradient importances) to `keep` of the MACs, BatchNorm re-estimated
    on `x`, exported with BatchNorm folded; the description holds its test accuracy before
    fine-tuning."""
    from benchmarks.torch_pruning import export
    from benchmarks.tp_compare import Run, best, macs, torch_original

    cells = json.loads((ROOT / "benchmarks/results/tp_compare.json").read_text())
    label, _ = best(cells[name]["torch_pruning"], round(1 - keep, 2))
    unit = label.endswith(", unit")
    importance, scope, *rest = label.removesuffix(", unit").split()
    steps = int(rest[0]) if rest else 1
    model = torch_original(name, x, tx, unit_outputs=unit)
    xt, example = torch.from_numpy(x), torch.from_numpy(x[:1])
    run_ = Run(name, importance, scope, steps, xt, torch.from_numpy(y.astype(np.int64)))
    ratio = run_.bisect(model, example, keep * macs(model, example), None)
    exported = export(run_.prune(model, example, ratio, bn=True), example)
    return exported, (), f"{label}, ratio {ratio:.3f}, pruned {accuracy(exported, tx, ty):.4f}"


def unused_train() -> np.ndarray:
    """The digits train-split images (32×32) that are not in the calibration subset: 745
    images, labels dropped, disjoint from the test split (the original was trained on them)."""
    digits = load_digits(flat=False)
    calib = {x.tobytes() for x in digits.calib.x}
    extra = np.stack([x for x in digits.train.x if x.tobytes() not in calib])
    assert len(extra) == len(digits.train.x) - len(digits.calib.x)
    return extra


def select(name: str, keep: float, grid: dict[str, list], split: int = 1) -> list[dict]:
    """Every combination of `grid` scored on 128 held-out calibration images (never the test
    split): prune and fine-tune on the other 384; `split` seeds which 128 are held out."""
    calib = np.load(ROOT / "models/digits32_calib.npz")
    fit, score = train_test_split(
        np.arange(512), test_size=128, stratify=calib["labels"], random_state=split
    )
    x, sx, sy = calib["input"][fit], calib["input"][score], calib["labels"][score]
    teacher, rows, starts = onnx.load(ROOT / f"models/{name}.onnx"), [], {}
    for values in itertools.product(*grid.values()):
        opts = dict(zip(grid, values, strict=True))
        start = opts.pop("start")
        if start not in starts:
            starts[start] = prune(name, keep, x, start)
        pruned, taps = starts[start].model, hints(starts[start])
        begin = time.process_time()
        result = finetune(pruned, teacher, Dataset({"input": x}), hints=taps, **opts)
        rows.append({"model": name, "fewer_macs": round(1 - keep, 2), "start": start, **opts,
                     "split": split,
                     "hints": len(taps), "before": accuracy(pruned, sx, sy),
                     "selection": accuracy(result.model, sx, sy),
                     "selection_kl": round(kl(result.model, teacher, sx), 5),
                     "steps_run": f"{result.steps_run} (best {result.best_step}, {result.stopped})",
                     "cpu_s": round(time.process_time() - begin, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def goals_table(results: list[dict]) -> str:
    """Markdown table of `one`'s rows from the JSON outputs `results`: accuracies in % with the
    test images behind them, the gaps the goals are about, CPU seconds per fine-tune."""
    head = (
        "| model | fewer MACs (kept) | start | steps | original | pruned | + distillation "
        "| distill − original | + labels | distill − labels "
        "| Torch-Pruning: pruned → + labels | distill − TP "
        "| CPU s (distill / labels / TP) |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for result in results:
        steps = result["options"]["steps"]
        for row in result["rows"]:
            pct = {k: f"{100 * row[k]:.1f} %" if k in row else "–" for k in KINDS}
            tp = row.get("tp", "").rsplit("pruned ", 1)[-1]
            tp = f"{100 * float(tp):.1f} % → {pct['tp_labels']}" if tp else "–"
            cpu = " / ".join(
                str(row.get(f"{k}_cpu_s", "–")) for k in ("distill", "labels", "tp_labels")
            )
            lines.append(
                f"| {row['model']} | {100 * row['fewer_macs']:.0f} % ({row['macs_kept']}) "
                f"| {row.get('start', '–')} | {steps} | {100 * row['original']:.1f} % "
                f"| {100 * row['pruned']:.1f} % | {pct['distill']} "
                f"| {_gap(row, 'distill', 'original')} | {pct['labels']} "
                f"| {_gap(row, 'distill', 'labels')} "
                f"| {tp} | {_gap(row, 'distill', 'tp_labels')} | {cpu} |"
            )
    return "\n".join(lines)


def _gap(row: dict, a: str, b: str) -> str:
    """row[a] − row[b] in points and in test images (540), or – where one is missing."""
    if a not in row or b not in row:
        return "–"
    images = round((row[a] - row[b]) * 540)
    return f"{100 * (row[a] - row[b]):+.1f} ({images:+d} img)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/finetune_goals.json"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--keep", default=",".join(map(str, KEEP)), help="fractions of MACs kept")
    parser.add_argument("--kinds", default=",".join(KINDS), help="fine-tunes per model and keep")
    parser.add_argument("--steps", default="500")
    parser.add_argument("--lr", default="3e-3")
    parser.add_argument("--augment", default="1", help="pixels of random shift (0: none)")
    parser.add_argument("--ema", default="0", help="decay of the weights' moving average (0: none)")
    parser.add_argument("--hint-weight", default="0", help="weight of the hint loss (0: none)")
    parser.add_argument("--temperature", default="4", help="distillation temperature T")
    parser.add_argument("--warmup", type=float, default=0.5, help="no early stop before this share")
    parser.add_argument(
        "--seed", type=int, default=0, help="fine-tuning's batch order and hold-out"
    )
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument(
        "--select", action="store_true", help="score on held-out calibration images"
    )
    parser.add_argument(
        "--split-seed", type=int, default=1, help="with --select: seeds the 384/128 split"
    )
    parser.add_argument(
        "--start", default="sequential", help="one, or with --select several: " + ",".join(STARTS)
    )
    parser.add_argument("--markdown", nargs="+", help="print the goals table of these outputs")
    args = parser.parse_args()
    if args.markdown:
        outputs = [json.loads(Path(p).read_text()) for p in args.markdown]  # one run or a list
        print(goals_table([r for o in outputs for r in (o if isinstance(o, list) else [o])]))
        return
    torch.set_num_threads(1)  # a shared, loaded machine: more threads only spin
    grid = {"start": args.start.split(","), "lr": [float(v) for v in args.lr.split(",")],
            "steps": [int(v) for v in args.steps.split(",")],
            "augment": [int(v) for v in args.augment.split(",")],
            "hint_weight": [float(v) for v in args.hint_weight.split(",")],
            "ema": [float(v) for v in args.ema.split(",")],
            "temperature": [float(v) for v in args.temperature.split(",")]}  # fmt: skip
    rows: list[dict] = []

    def save(row: dict | None = None) -> None:
        """Print `row` as the last row so far (None: rows as they are), write them all."""
        if row is not None:
            rows[-1] = dict(row)
            print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps({"options": vars(args), "rows": rows}, indent=1))

    for name in args.models.split(","):
        for keep in (float(k) for k in args.keep.split(",")):
            if args.select:
                rows += select(name, keep, grid, args.split_seed)
                save()
            else:
                opts = {k: v[0] for k, v in grid.items() if k != "start"}
                opts.update(warmup=args.warmup, max_seconds=args.max_seconds, seed=args.seed)
                rows.append({})
                one(name, keep, args.start, args.kinds.split(","), opts, save)


if __name__ == "__main__":
    main()
