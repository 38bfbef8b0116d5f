"""MiniLM pruned by `id` over heads and FFN, then recovered by distillation from the original on
unlabeled sentences (`onnxprune.recover.finetune`), at several learning rates and fit-set sizes.

The prune is the plain `id` cell of `minilm_mask.py` (`--target-macs`, `--no-sequential
--no-recalibrate`, the first 256 sentences of `minilm_calib.py`'s pool). Each fine-tune trains
on the first N sentences of the same pool (its own 1/8 held out for early stopping), matching the
last hidden state and, with `hints`, the pruned taps' kept channels. Scores against the original
(mean cosine of mean-pooled embeddings, nearest-neighbour agreement, Spearman ρ) on validation
sentences (the pool's next 256 after the largest fit set: where a variant is chosen) and on
`heldout.npz` (the test sentences, never read by a fit or a choice).

    ONNXPRUNE_ZOO_CACHE=/work/zoo_cache python benchmarks/minilm_finetune.py --targets 0.7 \
        --sizes 2048 --lrs 1e-4,3e-4 --steps 400

Writes `benchmarks/results/minilm_finetune.json` (or `--out`), rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
from benchmarks.accuracy import machine  # noqa: E402
from benchmarks.minilm_mask import VALIDATION, legacy_and_pool, scored, split_scorers  # noqa: E402
from benchmarks.minilm_model import INPUTS  # noqa: E402
from onnxprune.calib.data import Dataset  # noqa: E402
from onnxprune.recover.finetune import finetune  # noqa: E402
from onnxprune.recover.hints import hints_from_plans  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "minilm_finetune.json"
PRUNE_SENTENCES = 256  # the id fit, as in minilm_mask.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="0.7", help="MAC targets of the id prune")
    parser.add_argument("--sizes", default="2048", help="fine-tuning sentences per run")
    parser.add_argument("--lrs", default="1e-4,3e-4", help="Adam learning rates")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hints", default="on", help="on, off, or on,off")
    parser.add_argument(
        "--masks", default="off", help="on (the loss reads real tokens only), off, or both"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    files, original, pool = legacy_and_pool()
    sizes = [int(s) for s in args.sizes.split(",")]
    scorers = split_scorers(original, files, pool, max(*sizes, PRUNE_SENTENCES))
    out = {"machine": machine(), "pool": len(pool["input_ids"]), "validation": VALIDATION}
    out["command"] = " ".join(sys.argv[1:])
    out["runs"] = []

    def record(row: dict, model: onnx.ModelProto) -> None:
        row.update(scored(scorers, model))
        row["load"] = os.getloadavg()
        out["runs"].append(row)
        print(row, flush=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")

    for target in (float(t) for t in args.targets.split(",")):
        data = {k: pool[k][:PRUNE_SENTENCES] for k in INPUTS}
        start = time.perf_counter()
        pruned = onnxprune.prune(original, method="id", target_macs=target, data=data,
                                 verify=False, sequential=False, recalibrate=False)  # fmt: skip
        before, after = pruned.report.macs
        base = {"target": target, "macs_reduction": 1 - after / before}
        record({**base, "stage": "pruned", "seconds": time.perf_counter() - start}, pruned.model)
        outputs = [o.name for o in pruned.model.graph.output]
        plans = hints_from_plans(pruned.groups, pruned.plans, skip=outputs)
        for size in sizes:
            fit = Dataset({k: pool[k][:size] for k in INPUTS}, source="pool")
            runs = [(h, m, float(lr)) for h in args.hints.split(",")
                    for m in args.masks.split(",") for lr in args.lrs.split(",")]  # fmt: skip
            for hint, mask, lr in runs:
                tuned = finetune(pruned.model, original, fit, steps=args.steps, lr=lr,
                                 batch_size=args.batch, hints=plans if hint == "on" else (),
                                 row_mask="attention_mask" if mask == "on" else None)  # fmt: skip
                row = {**base, "stage": "finetuned", "sentences": size, "lr": lr, "hints": hint,
                       "mask": mask, "steps": args.steps, "steps_run": tuned.steps_run,
                       "best_step": tuned.best_step, "stopped": tuned.stopped,
                       "seconds": tuned.seconds,
                       "holdout_loss": [tuned.initial_loss, tuned.best_loss]}  # fmt: skip
                record(row, tuned.model)


if __name__ == "__main__":
    main()
