"""`onnxprune analyze`: show the channel groups before anything is changed."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from onnxprune.cli.options import add_input_shape_argument, parse_input_shapes

if TYPE_CHECKING:
    from onnxprune.api import Analysis


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "analyze",
        help="list channel groups, their cost, and why any is unprunable",
        description="Show which channels onnxprune may remove and what touches them.",
        epilog="example:\n  onnxprune analyze model.onnx --json groups.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="input .onnx file")
    parser.add_argument(
        "--json", metavar="FILE", help="also write the groups as JSON ('-' = stdout)"
    )
    add_input_shape_argument(parser)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="list producers, consumers and taps of every group",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from onnxprune.api import analyze  # lazy: --help needs no onnx

    result = analyze(args.model, input_shapes=parse_input_shapes(args.input_shape))
    if args.json == "-":
        print(json.dumps(to_dict(result), indent=2))
        return 0
    print(format_analysis(result, verbose=args.verbose))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(to_dict(result), handle, indent=2)
    return 0


def format_analysis(result: Analysis, *, verbose: bool = False) -> str:
    """A table of groups: name, channels, MACs they touch, prunable or why not."""
    from onnxprune.measure.cost import format_count

    width = max([len(g.name) for g in result.groups] + [5])
    lines = [f"{'group':<{width}}  {'channels':>8}  {'MACs':>8}  status"]
    for g in result.groups:
        status = "prunable" + (" (coupled: --prune-residual)" if g.coupled else "")
        if g.head_dim > 1:
            unit = "GroupNorm groups of {} channels" if g.norm_group else "attention heads of {}"
            status += f" ({unit.format(g.head_dim)})"
        if g.copies > 1:
            status += f" ({g.copies} readers of a shared weight, pruned as one)"
        if not g.prunable:
            status = f"unprunable: {g.reason}" + (f" at '{g.blocker}'" if g.blocker else "")
        elif g.rotation_block:
            status += f"; not rotatable: {g.rotation_block}"
        else:
            status += "; rotatable" + (
                f" (subspaces split at {list(g.subspaces)})" if g.subspaces else ""
            )
        touched = {*g.producers, *g.passthrough, *g.consumers}
        macs = "?" if touched & set(result.unknown) else format_count(result.group_macs[g.name])
        lines.append(f"{g.name:<{width}}  {g.channels:>8}  {macs:>8}  {status}")
        if verbose:
            lines.append(f"    producers: {', '.join(g.producers)}")
            lines.append(f"    consumers: {', '.join(g.consumers) or '-'}")
            lines.append(f"    taps: {', '.join(t.key for t in g.taps) or '-'}")
            if g.ties:
                lines.append(f"    equal widths with: {', '.join(g.ties)}")
    prunable = sum(g.prunable for g in result.groups)
    lines.append("")
    lines.append(
        f"{prunable} of {len(result.groups)} groups prunable; "
        f"{format_count(result.params)} parameters, {format_count(result.macs)} MACs"
    )
    if result.unknown:
        lines.append(
            f"? = {len(result.unknown)} nodes of unknown shape are not counted "
            "(inputs with symbolic dims? --input-shape NAME:1x3x224x224)"
        )
    if result.shared:
        name, readers = result.shared[0]
        lines.append(
            f"{len(result.shared)} weight(s) are shared by several nodes (e.g. '{name}', read by "
            f"{readers}): pruning their groups gives each node its own copy, so parameters can "
            "grow; --exclude their groups to keep them shared"
        )
    if result.quantized:
        from onnxprune.graph.quantized import quantized_message

        lines.append(quantized_message(result.quantized))
    return "\n".join(lines)


def to_dict(result: Analysis) -> dict:
    return {
        "params": result.params,
        "macs": result.macs,
        "unknown_shape_nodes": list(result.unknown),  # their MACs are missing from the counts
        "quantized_weight_nodes": list(result.quantized),
        "shared_weights": [{"name": n, "readers": k} for n, k in result.shared],
        "groups": [
            {
                "name": g.name,
                "channels": g.channels,
                "prunable": g.prunable,
                "coupled": g.coupled,
                "reason": g.reason,
                "blocker": g.blocker,
                "producers": list(g.producers),
                "consumers": list(g.consumers),
                "macs": result.group_macs.get(g.name, 0),
                "taps": [t.key for t in g.taps],
                "rotatable": g.rotatable,
                "rotation_block": g.rotation_block,
                "subspaces": list(g.subspaces),
                "ties": list(g.ties),
                "head_dim": g.head_dim,
                "norm_group": g.norm_group,
                "copies": g.copies,
                "pooled_taps": [list(keys) for keys in g.pooled],
            }
            for g in result.groups
        ],
    }
