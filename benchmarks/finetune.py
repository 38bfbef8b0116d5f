"""Fine-tuning by distillation: test accuracy of the pruned digits CNNs before and after.

Every digits CNN is pruned with `id` (intercept + recalibration, the default; `round_to=1`,
`--prune-residual`) to 70 % and 85 % fewer MACs from the 512 calibration images, then fine-tuned
(`--kinds`, each the same Adam steps, batch, learning rate, cosine schedule and early stopping on
the same 64 held-out calibration images):

- `distill`: unlabeled, distillation from the original on the 512 calibration images;
- `labels`: the same plus cross-entropy on the calibration labels;
- `extra`: unlabeled, the calibration images plus the 745 images of the digits train split that
  the calibration subset left out (their labels are not read; disjoint from the test split);
- `tp`: Torch-Pruning (L1 magnitude, uniform ratio to the same MACs target) on the torch model,
  then labeled fine-tuning (cross-entropy, BatchNorm in train mode) with the same steps on the
  same images, weights of the best held-out cross-entropy kept.

Accuracy is on the disjoint test split; CPU seconds (`time.process_time`, all threads) are
recorded per fine-tune, torch on one thread.

`--select` chooses settings without the test split: prune and fine-tune on 384 calibration
images, score the accuracy on the other 128 (stratified, seeded); every combination of the
comma-separated `--lr`, `--steps`, `--augment`, `--start` values is run.

    python benchmarks/finetune.py --out benchmarks/results/finetune.json
    python benchmarks/finetune.py --select --models mobilenetv2 --keep 0.15 --lr 1e-3,3e-3
"""

from __future__ import annotations

import argparse
import copy
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
import torch.nn.functional as F  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import onnxprune  # noqa: E402
from models.data import load as load_digits  # noqa: E402
from onnxprune.calib.data import Dataset  # noqa: E402
from onnxprune.calib.split import split_for_verification  # noqa: E402
from onnxprune.measure.cost import count  # noqa: E402
from onnxprune.measure.verify import run  # noqa: E402
from onnxprune.recover.finetune import finetune  # noqa: E402

MODELS = ("resnet", "senet", "vgg", "inception", "mobilenetv2")
KEEP = (0.30, 0.15)  # fraction of MACs kept: 70 % and 85 % fewer
KINDS = ("distill", "labels", "extra", "tp")
STARTS = {"id+bias+recalibrate": {}, "id": {"compensate": "none", "recalibrate": False}}
HOLDOUT = 0.125  # finetune's default held-out share, used for TP's early stopping too


def accuracy(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of `model` on (x, labels) in ONNX Runtime."""
    logits = run(model, {"input": x})[model.graph.output[0].name]
    return float(np.mean(logits.argmax(1) == labels))


def prune(name: str, keep: float, x: np.ndarray, start: str) -> onnx.ModelProto:
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
    ).model


def one(name: str, keep: float, kinds: list[str], opts: dict) -> dict:
    """Prune `name` to `keep` of its MACs, fine-tune it every way in `kinds`, test accuracy."""
    calib, test = (
        np.load(ROOT / "models/digits32_calib.npz"),
        np.load(ROOT / "models/digits32_test.npz"),
    )
    x, y, tx, ty = calib["input"], calib["labels"], test["input"], test["labels"]
    teacher = onnx.load(ROOT / f"models/{name}.onnx")
    start = time.process_time()
    pruned = prune(name, keep, x, "id+bias+recalibrate")
    row = {
        "model": name,
        "fewer_macs": round(1 - keep, 2),
        "macs_kept": round(count(pruned).macs / count(teacher).macs, 3),
        "original": accuracy(teacher, tx, ty),
        "pruned": accuracy(pruned, tx, ty),
        "prune_cpu_s": round(time.process_time() - start, 1),
    }
    for kind in kinds:
        start = time.process_time()
        if kind == "tp":
            tuned, how = tp_labeled(name, keep, x, y, opts)
        else:
            data = np.concatenate([x, unused_train()]) if kind == "extra" else x
            labels = y if kind == "labels" else None
            result = finetune(pruned, teacher, Dataset({"input": data}), labels=labels, **opts)
            tuned, how = (
                result.model,
                f"{result.steps_run} (best {result.best_step}, {result.stopped})",
            )
        row[kind] = accuracy(tuned, tx, ty)
        row[f"{kind}_cpu_s"] = round(time.process_time() - start, 1)
        row[f"{kind}_steps"] = how
    return row


def unused_train() -> np.ndarray:
    """The digits train-split images (32×32) that are not in the calibration subset: 745
    images, labels dropped, disjoint from the test split (the original was trained on them)."""
    digits = load_digits(flat=False)
    calib = {x.tobytes() for x in digits.calib.x}
    extra = np.stack([x for x in digits.train.x if x.tobytes() not in calib])
    assert len(extra) == len(digits.train.x) - len(digits.calib.x)
    return extra


def tp_labeled(name: str, keep: float, x: np.ndarray, y: np.ndarray, opts: dict):
    """Torch-Pruning L1 at the uniform ratio that reaches `keep` of the MACs, then `steps` Adam
    steps of cross-entropy on the labeled images finetune would train on (same held-out split,
    batch, lr, cosine schedule), the weights of the lowest held-out cross-entropy kept."""
    from benchmarks.torch_pruning import CLASSIFIER, export, torch_reference, tp_prune, tp_ratio

    test = dict(np.load(ROOT / "models/digits32_test.npz"))
    cache = Path.home() / ".cache" / "onnxprune-bench"
    model, _ = torch_reference(name, ROOT / f"models/{name}.onnx", test, cache)
    example = torch.from_numpy(x[:1])
    ratio = tp_ratio(model, example, CLASSIFIER.get(name, "fc"), 1 - keep)
    pruned = tp_prune(model, example, CLASSIFIER.get(name, "fc"), "l1", ratio)
    split = split_for_verification(
        Dataset({"input": x}, y),
        share=HOLDOUT,
        samples=len(x),
        seed=opts.get("seed", 0),
        fitted=True,
    )
    train_steps(pruned, split.fit, split.verify, opts)
    return export(pruned, example), f"{opts['steps']} (ratio {ratio:.3f})"


def train_steps(model: torch.nn.Module, fit: Dataset, held: Dataset, opts: dict) -> None:
    """Labeled fine-tuning of a torch model in place, as `finetune` schedules its steps."""
    steps, lr, batch, seed = opts["steps"], opts.get("lr", 1e-3), 32, opts.get("seed", 0)
    torch.manual_seed(seed)
    x, y = torch.from_numpy(fit.arrays["input"]), torch.from_numpy(fit.labels)
    hx, hy = torch.from_numpy(held.arrays["input"]), torch.from_numpy(held.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    rng, every = np.random.default_rng(seed), max(1, steps // 20)

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(model(hx), hy))

    best = (held_loss(), copy.deepcopy(model.state_dict()))
    order = (
        b
        for _ in itertools.count()
        for b in np.array_split(rng.permutation(len(x)), len(x) // batch)
    )
    for step in range(1, steps + 1):
        index = torch.from_numpy(np.sort(next(order)))
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
        schedule.step()
        if step % every == 0 and (loss := held_loss()) < best[0]:
            best = (loss, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[1])
    model.eval()


def select(name: str, keep: float, grid: dict[str, list]) -> list[dict]:
    """Every combination of `grid` scored on 128 held-out calibration images (never the test
    split): prune and fine-tune on the other 384."""
    calib = np.load(ROOT / "models/digits32_calib.npz")
    fit, score = train_test_split(
        np.arange(512), test_size=128, stratify=calib["labels"], random_state=1
    )
    x, sx, sy = calib["input"][fit], calib["input"][score], calib["labels"][score]
    teacher, rows, starts = onnx.load(ROOT / f"models/{name}.onnx"), [], {}
    for values in itertools.product(*grid.values()):
        opts = dict(zip(grid, values, strict=True))
        start = opts.pop("start")
        if start not in starts:
            starts[start] = prune(name, keep, x, start)
        begin = time.process_time()
        result = finetune(starts[start], teacher, Dataset({"input": x}), **opts)
        rows.append({"model": name, "fewer_macs": round(1 - keep, 2), "start": start, **opts,
                     "before": accuracy(starts[start], sx, sy),
                     "selection": accuracy(result.model, sx, sy),
                     "steps_run": f"{result.steps_run} (best {result.best_step}, {result.stopped})",
                     "cpu_s": round(time.process_time() - begin, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/finetune.json"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--keep", default=",".join(map(str, KEEP)), help="fractions of MACs kept")
    parser.add_argument("--kinds", default=",".join(KINDS), help="fine-tunes per model and keep")
    parser.add_argument("--steps", default="500")
    parser.add_argument("--lr", default="3e-3")
    parser.add_argument("--augment", default="1", help="pixels of random shift (0: none)")
    parser.add_argument("--warmup", type=float, default=0.5, help="no early stop before this share")
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument(
        "--select", action="store_true", help="score on held-out calibration images"
    )
    parser.add_argument(
        "--start", default="id+bias+recalibrate", help="--select: " + ",".join(STARTS)
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared, loaded machine: more threads only spin
    grid = {"start": args.start.split(","), "lr": [float(v) for v in args.lr.split(",")],
            "steps": [int(v) for v in args.steps.split(",")],
            "augment": [int(v) for v in args.augment.split(",")]}  # fmt: skip
    rows = []
    for name in args.models.split(","):
        for keep in (float(k) for k in args.keep.split(",")):
            if args.select:
                rows += select(name, keep, grid)
            else:
                opts = {k: v[0] for k, v in grid.items() if k != "start"}
                opts.update(warmup=args.warmup, max_seconds=args.max_seconds)
                rows.append(one(name, keep, args.kinds.split(","), opts))
                print(json.dumps(rows[-1]), flush=True)
            Path(args.out).write_text(json.dumps({"options": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
