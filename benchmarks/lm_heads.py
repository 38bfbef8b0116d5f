"""Grouped-query heads against FFN neurons on a causal language model, at the same MACs.

For each method and MACs target, prunes the model twice with `target_macs` (the method's own
allocation across groups): once with every prunable group, once with the attention groups
excluded (the FFN neurons only, which is all a grouped-query model offered before its heads
were understood); then removes one key/value group of two in every layer with the FFNs kept
whole (`--ratio 0.5`, attention only). Scores on held-out windows disjoint from the
calibration ones: next-token perplexity of both models and their top-1 agreement
(slicegpt.py's), parameters and MACs (the report's).

    python benchmarks/lm_heads.py /work/zoo_cache/tiny_llama/tiny_llama.onnx \\
        --calib /work/zoo_cache/tiny_llama/calib.npz \\
        --heldout /work/zoo_cache/tiny_llama/heldout.npz --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slicegpt import first_output, next_tokens  # noqa: E402

import onnxprune  # noqa: E402

ATTENTION = "self_attn"  # transformers' module name in every LLaMA-family export
FFN = "mlp"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--methods", default="magnitude,activation,id")
    parser.add_argument("--targets", default="0.9,0.8", help="MACs kept, comma-separated")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    with np.load(args.heldout) as data:
        feeds = {k: data[k] for k in data.files}
    original = onnx.load(args.model)
    reference = first_output(original, feeds)
    rows = []
    for method in args.methods.split(","):
        for target in (float(t) for t in args.targets.split(",")):
            for scope, exclude in (("heads+ffn", []), ("ffn only", [ATTENTION])):
                options = dict(target_macs=target, exclude=exclude)
                rows.append(_row(method, scope, options, args, original, feeds, reference))
        options = dict(ratio=0.5, exclude=[FFN])
        rows.append(_row(method, "heads only", options, args, original, feeds, reference))
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


def _row(method, scope, options, args, original, feeds, reference) -> dict:
    start = time.perf_counter()
    result = onnxprune.prune(original, method=method, data=args.calib, round_to=1, **options)
    seconds = time.perf_counter() - start
    heads = [len(p.keep) for g, p in _plans(result) if g.head_dim > 1]
    row = {
        "method": method,
        "scope": scope,
        **{k: v for k, v in options.items() if k != "exclude"},
        "kv_groups_kept": heads,
        "params": list(result.report.params),
        "macs": list(result.report.macs),
        "seconds": round(seconds, 1),
    }
    row.update(next_tokens(reference, first_output(result.model, feeds), feeds["input_ids"]))
    return row


def _plans(result: onnxprune.Result):
    return [(g, result.plans[g.name]) for g in result.groups if g.name in result.plans]


if __name__ == "__main__":
    main()
