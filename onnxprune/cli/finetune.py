"""`onnxprune finetune`: recover a pruned model's accuracy by distillation from the original."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from onnxprune.cli.options import HelpFormatter, add_data_arguments, load_dataset
from onnxprune.errors import UsageError

if TYPE_CHECKING:  # loaded in run(), so that --help needs no onnx or torch
    from onnxprune.measure.verify import Verification
    from onnxprune.recover.finetune import FinetuneResult

EXAMPLE = """examples:
  onnxprune finetune model.pruned.onnx --teacher model.onnx --data inputs.npz -o model.ft.onnx
  onnxprune finetune model.pruned.onnx --teacher model.onnx --data calib.npz --labels --steps 500
  onnxprune finetune model.pruned.onnx --teacher model.onnx --data calib.npz --augment 1 --lr 3e-3
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `finetune` parser and point it at `run`."""
    parser = sub.add_parser(
        "finetune",
        help="fine-tune a pruned model by distillation from the original (needs torch)",
        description="Train the pruned model's float weights to reproduce the original's outputs "
        "on --data (no labels needed); the graph is unchanged, only weight values change. A "
        "seeded --holdout share of --data is kept out for early stopping and the final check.",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
        conflict_handler="resolve",  # --labels below replaces the data group's --labels FILE
    )
    parser.add_argument("model", help="pruned .onnx file (never modified)")
    parser.add_argument("--teacher", required=True, help="the original .onnx the model came from")
    parser.add_argument("-o", "--output", help="output path (default: MODEL.finetuned.onnx)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay)")
    parser.add_argument(
        "--temperature", type=float, default=4.0, help="softmax temperature of the KL term"
    )
    parser.add_argument("--max-seconds", type=float, help="stop training after this wall time")
    parser.add_argument(
        "--holdout", type=float, default=0.125, help="share of --data held out for early stopping"
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=5,
        help="held-out evaluations (20 per run) without a new best before stopping early",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.5,
        help="share of --steps run before early stopping may end the run",
    )
    parser.add_argument(
        "--augment",
        type=int,
        default=0,
        metavar="PIXELS",
        help="shift image inputs (4-D float N×C×H×W) by up to PIXELS random pixels per axis in "
        "every training batch, edges replicated; the teacher runs on the shifted batch",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="evaluate and write an exponential moving average of the weights with this decay "
        "per step (e.g. 0.99; 0: the weights themselves)",
    )
    parser.add_argument(
        "--row-mask",
        metavar="INPUT",
        help="leave out of the loss the token rows whose entry of the 2-D input INPUT (samples, "
        "positions) is 0, e.g. a transformer's padding: attention_mask; 'auto': the integer "
        "input named attention_mask if there is one",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--labels",
        nargs="?",
        const="data",
        metavar="FILE",
        help="add cross-entropy on labels: those stored in --data (npz key 'labels') or FILE",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load both models and the data, fine-tune, verify on the held-out part, write."""
    from onnxprune.graph.load import load_model, save_model
    from onnxprune.measure.verify import verify
    from onnxprune.recover.finetune import finetune

    student, teacher = load_model(args.model), load_model(args.teacher)
    wanted = args.labels
    args.labels = None if wanted in (None, "data") else wanted
    dataset = load_dataset(args, student)
    if wanted and dataset.labels is None:
        raise UsageError("--labels given but --data holds no 'labels' key", hint="--labels FILE")
    if dataset.synthetic:
        print(
            "onnxprune: warning: fine-tuning on random data (distillation on noise)",
            file=sys.stderr,
        )
    result = finetune(
        student,
        teacher,
        dataset,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        temperature=args.temperature,
        labels=dataset.labels if wanted else None,
        max_seconds=args.max_seconds,
        seed=args.seed,
        holdout=args.holdout,
        patience=args.patience,
        warmup=args.warmup,
        augment=args.augment,
        ema=args.ema,
        row_mask=args.row_mask,
    )
    before = verify(teacher, student, result.holdout.arrays, data=result.holdout.source)
    after = verify(teacher, result.model, result.holdout.arrays, data=result.holdout.source)
    path = Path(args.model)
    output = Path(args.output) if args.output else path.with_name(f"{path.stem}.finetuned.onnx")
    save_model(result.model, output)
    _summary(result, before, after, output)
    return 0


def _summary(
    result: FinetuneResult, before: Verification, after: Verification, output: Path
) -> None:
    """The loss curve in a few rows and the check against the teacher before/after."""
    history = result.history
    shown = [*history[:: max(1, len(history) // 5)], history[-1]]
    print(
        f"fine-tuned {result.steps_run} steps in {result.seconds:.1f} s ({result.stopped}); "
        f"kept the weights of step {result.best_step}"
    )
    for row in dict((h["step"], h) for h in shown).values():
        train = "     -" if row["train"] is None else f"{row['train']:.4f}"
        print(f"  step {row['step']:>5}: train {train}  held-out {row['holdout']:.4f}")
    if result.frozen:
        print(
            f"frozen: {len(result.frozen)} node(s) the torch interpreter lacks ran in ONNX Runtime "
            f"with no gradient through them ({', '.join(result.frozen[:5])}"
            f"{' …' if len(result.frozen) > 5 else ''}); {len(result.trained)} initializer(s) "
            "trained"
        )
    where = "held out" if result.independent else "TRAINED ON (no hold-out possible)"
    print(f"against the teacher on {after.samples} samples {where}:")
    for old, new in zip(before.outputs, after.outputs, strict=True):
        agree = ""
        if new.top1_agreement is not None:
            agree = f", top-1 agreement {old.top1_agreement:.1%} → {new.top1_agreement:.1%}"
        print(f"  {new.name}: rel-L2 {old.rel_l2:.4f} → {new.rel_l2:.4f}{agree}")
    print(f"written to {output}")
