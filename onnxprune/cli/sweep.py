"""`onnxprune sweep`: every method spec at every ratio or MAC target, scored on held-out data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from onnxprune.cli.options import (
    HelpFormatter,
    add_data_arguments,
    add_rounding_arguments,
    load_dataset,
    reading_options,
    rounding,
)
from onnxprune.config import COMPENSATIONS
from onnxprune.errors import UsageError

if TYPE_CHECKING:  # the heavy modules load in run(), so that --help needs no onnx
    from collections.abc import Callable
    from typing import Any

    from onnxprune.calib.data import Dataset
    from onnxprune.compare.parallel import Backend
    from onnxprune.compare.sensitivity import Sensitivity
    from onnxprune.compare.sweep import SweepResult

EXAMPLE = """example:
  onnxprune sweep model.onnx --methods id,id+bias,magnitude,magnitude+lsq,taylor \\
      --ratios 0.1:0.9:0.1 --data calib.npz --eval test.npz --out sweep/
  onnxprune sweep model.onnx --methods magnitude,random --targets 0.3,0.5,0.7 --seeds 5 \\
      --eval test.npz --no-latency
  onnxprune sweep model.onnx --methods id,magnitude --data calib.npz --eval test.npz \\
      --workers 4 --no-latency --out sweep/ --save-models
  onnxprune sweep model.onnx --methods id,magnitude --data calib.npz --eval test.npz \\
      --ray ray://head:10001 --no-latency

A method spec is NAME[+MODIFIER...]; modifiers: bias, lsq (compensation), recalibrate,
sequential.
The metric is accuracy when --eval has labels, else top-1 agreement with the original
(class scores) or the relative L2 deviation of the first output."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `sweep` parser and point it at `run`."""
    parser = sub.add_parser(
        "sweep",
        help="compare methods across ratios or MAC targets on held-out data",
        description="Prune with every method spec at every ratio (or MACs-reduction target), "
        "evaluate each result on held-out data, count MACs/parameters, time it at batch 1, "
        "and write a table, CSV/JSON and a plot.",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="input .onnx file (never modified)")
    parser.add_argument(
        "--methods", default="magnitude,id", help="comma-separated method specs, e.g. id,id+bias"
    )
    points = parser.add_mutually_exclusive_group()
    points.add_argument(
        "--ratios",
        default=None,
        help="channel ratios START:STOP:STEP or A,B,C (default 0.3,0.5,0.7)",
    )
    points.add_argument(
        "--targets", default=None, help="MACs reductions, e.g. 0.3,0.5,0.7 (target_macs = 1 - t)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds for 'random' (mean ± std)")
    add_eval_arguments(parser)
    add_prune_arguments(parser)
    add_parallel_arguments(parser)
    add_data_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="write sweep.csv, sweep.json and sweep.png here")
    out.add_argument(
        "--save-models", action="store_true", help="with --out: each cell's model in DIR/models/"
    )
    out.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    out.add_argument("--repeats", type=int, default=20, help="timed runs per model and cell")
    parser.set_defaults(func=run)


def add_eval_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--eval and how to read it (image options are shared with --data)."""
    group = parser.add_argument_group("evaluation data")
    group.add_argument(
        "--eval",
        required=required,
        metavar="PATH",
        help="held-out data (.npz with labels, .npy, images)",
    )
    group.add_argument("--eval-labels", metavar="FILE", help="labels for --eval")
    group.add_argument("--eval-samples", type=int, metavar="N", help="evaluate on N samples")


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """The prune options a comparison passes through to every cell."""
    group = parser.add_argument_group("prune options (for every cell)")
    add_rounding_arguments(group)
    group.add_argument("--prune-residual", action="store_true", help="also prune residual streams")
    group.add_argument(
        "--compensate", choices=COMPENSATIONS, default="none", help="default compensation"
    )
    group.add_argument("--recalibrate", action="store_true", help="recalibrate after pruning")


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """--workers and --ray: where the cells run (the results do not depend on it)."""
    group = parser.add_argument_group("parallel cells (same results as one after another)")
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run cells in N local processes (threads per process: cores // N)",
    )
    group.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run cells as Ray tasks on the cluster at ADDRESS; without one, on a local Ray with "
        "--workers CPUs (all cores if 1; needs the `ray` extra)",
    )


def backend(args: argparse.Namespace, *, timed: bool) -> Backend:
    """The Backend from --workers/--ray; warns when cells are timed while others run."""
    from onnxprune.compare.parallel import Backend

    chosen = Backend(args.workers, args.ray)
    if timed and chosen.parallel:
        print(
            "onnxprune: warning: latencies are timed while other cells run in parallel; "
            "use --no-latency, or time without --workers/--ray",
            file=sys.stderr,
        )
    return chosen


def prune_options(args: argparse.Namespace) -> dict:
    """The keyword options for `onnxprune.prune` from the parsed arguments."""
    return {
        "round_to": rounding(args),
        "prune_residual": args.prune_residual,
        "compensate": args.compensate,
        "recalibrate": args.recalibrate,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }


def load_splits(args: argparse.Namespace) -> tuple[Dataset | None, Dataset]:
    """Calibration (None without --data) and evaluation data; warns once if they overlap."""
    from onnxprune.calib.data import input_specs, load_data
    from onnxprune.compare.sweep import overlap_warning
    from onnxprune.graph.load import load_model

    model = load_model(args.model, weights=False)
    calib = load_dataset(args, model) if args.data else None
    evaluation = load_data(
        args.eval,
        input_specs(model),
        labels=args.eval_labels,
        samples=args.eval_samples,
        role="evaluation",
        **reading_options(args),
    )
    if calib is not None:
        warning = overlap_warning(calib, evaluation, args.data, args.eval)
        if warning:
            print(f"onnxprune: warning: {warning}", file=sys.stderr)
    return calib, evaluation


def run(args: argparse.Namespace) -> int:
    """Run the sweep, print the table, write CSV/JSON/plot into --out."""
    from onnxprune.compare.sweep import parse_grid, parse_method, plot_sweep, sweep

    if args.ratios is None and args.targets is None:
        args.ratios = "0.3,0.5,0.7"
    ratios = parse_grid(args.ratios, "ratio") if args.ratios else None
    targets = parse_grid(args.targets, "target") if args.targets else None
    specs = [parse_method(m) for m in args.methods.split(",") if m.strip()]
    if not specs:
        raise UsageError("--methods is empty")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1; got {args.repeats}")
    if args.save_models and not args.out:
        raise UsageError("--save-models needs --out DIR")
    where = backend(args, timed=not args.no_latency)
    calib, evaluation = load_splits(args)
    result = sweep(
        args.model,
        specs,
        data=calib,
        evaluation=evaluation,
        ratios=ratios,
        targets=targets,
        seeds=args.seeds,
        latency=not args.no_latency,
        latency_repeats=args.repeats,
        backend=where,
        models_dir=Path(args.out) / "models" if args.save_models else None,
        **prune_options(args),
    )
    print(result.format_table())
    if args.out:
        write_results(result, args.out, plot_sweep, "sweep.png")
    return 0


def write_results(
    result: SweepResult | Sensitivity,
    out: str,
    plot: Callable[[Any, Path], bool],
    name: str,
) -> None:
    """Write `result`'s CSV/JSON into `out` and its `plot` there as `name` (said to be skipped
    without matplotlib), and print what was written: the output step of sweep and sensitivity."""
    paths = result.write(out)
    path = Path(out) / name
    if plot(result, path):
        paths += (path,)
    else:
        print("plot skipped: matplotlib is not installed (pip install onnxprune[plot])")
    print("written: " + ", ".join(str(p) for p in paths))
