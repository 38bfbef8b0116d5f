"""`onnxprune bench`: latency, MACs, parameters, file size and (with --eval) accuracy and agreement
of one or more models, measured interleaved."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onnxprune.cli.options import HelpFormatter, parse_input_shapes
from onnxprune.cli.sweep import add_eval_arguments
from onnxprune.errors import UsageError
from onnxprune.measure.latency import PROVIDERS

EXAMPLE = """example:
  onnxprune bench resnet50.onnx resnet50_pruned.onnx --batch 1,8,32 --json bench.json
  onnxprune bench model.onnx --input-shape pixel_values:1,3,224,224 --threads 4
  onnxprune bench model.onnx model.pruned.onnx model.pruned.int8.onnx --eval test.npz --plot b.png

The first model is the reference for the speedup columns ("ideal" is its MACs / these MACs)
and, with --eval, for top-1 agreement and rel-L2 (accuracy needs labels in the data)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` parser and point it at `run`."""
    parser = subparsers.add_parser(
        "bench",
        help="Measure ONNX Runtime latency, MACs and parameters of models side by side.",
        description="Time models interleaved (A B A B ...) with identical ONNX Runtime settings\n"
        "and seeded random inputs; report median/p90/IQR latency, throughput and speedups.",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="ONNX files; first is baseline.")
    parser.add_argument("--batch", default="1", help="Comma-separated batch sizes, e.g. 1,8,32.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Intra-op threads; None means the number of physical cores.",
    )
    parser.add_argument(
        "--provider",
        default="cpu",
        metavar="NAME[,NAME...]",
        help=f"ONNX Runtime execution provider(s), from {', '.join(PROVIDERS)}; several: every "
        "model on each, interleaved in one run, rows named by provider (default: cpu)",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME:D1,D2,...",
        help="Shape for an input with dynamic dims (repeatable); dim 0 is "
        "replaced by each --batch when the model's batch dim is dynamic.",
    )
    parser.add_argument(
        "--repeats", type=int, default=50, help="Minimum timed runs per model and batch."
    )
    parser.add_argument("--warmup", type=int, default=10, help="Untimed runs per model first.")
    parser.add_argument(
        "--min-time",
        type=float,
        default=1.0,
        help="Keep repeating until each batch's timed loop lasted this many s.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random inputs.")
    parser.add_argument(
        "--json",
        metavar="FILE|-",
        default=None,
        help="Also write results with raw times as JSON ('-' for stdout).",
    )
    add_eval_arguments(parser, required=False)
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="with --eval: draw latency vs accuracy (or agreement) per model (needs matplotlib)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Parse the options, run the benchmark, print the table and write JSON."""
    from onnxprune.measure.latency import benchmark, plot_bench

    if args.plot and not args.eval:
        raise UsageError("--plot shows latency against scores: give --eval data")
    result = benchmark(
        args.models,
        batches=parse_batches(args.batch),
        threads=args.threads,
        providers=[p.strip() for p in args.provider.split(",") if p.strip()],
        input_shapes=parse_input_shapes(args.input_shape),
        warmup=args.warmup,
        repeats=args.repeats,
        min_time=args.min_time,
        seed=args.seed,
        evaluation=_evaluation_data(args) if args.eval else None,
        evaluation_name=args.eval or "",
    )
    to_stdout = args.json == "-"
    print(result.format_table(), file=sys.stderr if to_stdout else sys.stdout)
    if args.json:
        text = json.dumps(result.to_dict(), indent=2)
        if to_stdout:
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.plot and not plot_bench(result, args.plot):
        print("onnxprune: warning: matplotlib is not installed: no plot", file=sys.stderr)
    return 0


def _evaluation_data(args: argparse.Namespace):
    """The --eval Dataset, read for the first model's inputs (as `prune --data` reads data)."""
    from onnxprune.calib.data import fed_specs, load_data
    from onnxprune.graph.load import load_model

    return load_data(
        args.eval,
        fed_specs(load_model(args.models[0], weights=False), args.eval),
        labels=args.eval_labels,
        samples=args.eval_samples,
        seed=args.seed,
        role="evaluation",
    )


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); anything else is a UsageError."""
    try:
        batches = tuple(int(part) for part in text.split(","))
    except ValueError:
        batches = ()
    if not batches or any(b < 1 for b in batches):
        raise UsageError(f"--batch '{text}' is not a comma-separated list of positive integers")
    return batches
