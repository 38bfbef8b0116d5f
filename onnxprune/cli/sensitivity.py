"""`onnxprune sensitivity`: the metric with one group pruned at a time, and a recipe from it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnxprune.cli.options import HelpFormatter, add_data_arguments, rounding
from onnxprune.cli.sweep import (
    add_eval_arguments,
    add_parallel_arguments,
    add_prune_arguments,
    backend,
    load_splits,
    prune_options,
    write_results,
)
from onnxprune.errors import UsageError

EXAMPLE = """example:
  onnxprune sensitivity model.onnx --method id --data calib.npz --eval test.npz --out sens/
  onnxprune sensitivity model.onnx --method magnitude+lsq --data calib.npz --eval test.npz \\
      --recipe-out recipe.json --target-macs 0.5
  onnxprune model.onnx --method magnitude --compensate lsq --data calib.npz --recipe recipe.json

The recipe keeps at most --target-macs of the MACs when pruned with the same --round-to and
--prune-residual; it lists every measured group (0 where left alone)."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `sensitivity` parser and point it at `run`."""
    parser = sub.add_parser(
        "sensitivity",
        help="measure each group's sensitivity; optionally write a recipe for a MAC target",
        description="Prune each prunable channel group alone at a few ratios and score the "
        "result on held-out data; print a table, write CSV/JSON and a heatmap, and allocate "
        "per-group ratios that meet a MAC target with the least estimated loss.",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="input .onnx file (never modified)")
    parser.add_argument("--method", default="magnitude", help="method spec, e.g. id or id+bias")
    parser.add_argument("--ratios", default="0.25,0.5,0.75", help="ratios tried per group")
    add_eval_arguments(parser)
    add_prune_arguments(parser)
    add_parallel_arguments(parser)
    add_data_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="write sensitivity.csv/.json/.png here")
    out.add_argument("--recipe-out", metavar="FILE", help="write a per-group recipe (JSON)")
    out.add_argument(
        "--target-macs", type=float, metavar="F", help="with --recipe-out: fraction of MACs to keep"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Measure, print, write outputs, allocate."""
    from onnxprune.compare.sensitivity import allocate, measure_sensitivity, plot_sensitivity
    from onnxprune.compare.sweep import parse_grid, parse_method

    if (args.recipe_out is None) != (args.target_macs is None):
        raise UsageError("--recipe-out and --target-macs go together")
    if args.target_macs is not None and not 0.0 < args.target_macs <= 1.0:
        raise UsageError(
            f"--target-macs is the fraction to keep, in (0, 1]; got {args.target_macs}"
        )
    spec = parse_method(args.method)
    ratios = parse_grid(args.ratios, "ratio")
    where = backend(args, timed=False)
    calib, evaluation = load_splits(args)
    result = measure_sensitivity(
        args.model,
        spec,
        data=calib,
        evaluation=evaluation,
        ratios=ratios,
        backend=where,
        **prune_options(args),
    )
    print(result.format_table())
    if args.out:
        write_results(result, args.out, plot_sensitivity, "sensitivity.png")
    if args.recipe_out:
        round_to = rounding(args)
        allocation = allocate(args.model, result, args.target_macs, round_to=round_to,
                              prune_residual=args.prune_residual)  # fmt: skip
        meta = {"method": spec.label, "round_to": round_to,
                "prune_residual": args.prune_residual}  # fmt: skip
        Path(args.recipe_out).write_text(json.dumps(allocation.recipe(**meta), indent=1) + "\n")
        flags = f" --round-to {round_to}" + (" --prune-residual" if args.prune_residual else "")
        print(
            f"recipe: {args.recipe_out} keeps {allocation.reached_macs:.3f} of the MACs "
            f"(target {args.target_macs:g}); prune with: onnxprune {args.model} --method "
            f"{spec.method} --recipe {args.recipe_out}{flags}"
            + "".join(f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                      for k, v in spec.options.items())
        )  # fmt: skip
    return 0
