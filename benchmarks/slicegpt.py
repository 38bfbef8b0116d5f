"""SliceGPT-style slicing of a transformer's residual streams with `--method cob`.

For each ratio, prunes the model with cob (LayerNorms become RMSNorms on mean-free streams,
every stream rotated by the PCA of its Gram and sliced; graph/layernorm.py) and scores it on
held-out inputs against the original:

- a text encoder whose inputs have an `attention_mask` (MiniLM): cosine of the mask-weighted
  mean-pooled embeddings of the first output, mean and minimum over the held-out sentences;
- a classifier with `labels` in the held-out npz or `--labels` (the digits ViTs): top-1
  accuracy and agreement;
- a causal language model (`--lm`: logits over the vocabulary for every position of
  `input_ids`; tiny_llama.py's): next-token perplexity of both models on the held-out text, and
  the share of positions where their top-1 next tokens agree.

Also recorded: the stream width after slicing, parameters and MACs (the report's), seconds
of pruning, and the median ORT latency of both models on the first `--time-batch` held-out
inputs (interleaved runs, 2 threads).

    python benchmarks/slicegpt.py MODEL --calib calib.npz --heldout heldout.npz \\
        --ratios 0.1,0.25 --streams-only --json out.json

`--streams-only` slices only the residual streams (the groups passing a converted norm), not
the FFN neurons, whatever the exporter named the nodes; `--exclude` keeps more groups (regex on
group or producer names) at full width.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxprune  # noqa: E402
from onnxprune.graph.analyze import analyze  # noqa: E402
from onnxprune.graph.layernorm import to_rmsnorm  # noqa: E402
from onnxprune.graph.load import normalize  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    with np.load(args.heldout) as data:
        heldout = {k: data[k] for k in data.files}
    if args.labels:
        heldout["labels"] = np.load(args.labels)
    original = onnx.load(args.model)
    if args.streams_only:
        args.exclude.append(_all_but_streams(original))
    rows = [_measure(args, original, heldout, float(r)) for r in args.ratios.split(",")]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calib", required=True, help="calibration npz (keyed by input name)")
    parser.add_argument("--heldout", required=True, help="held-out npz (optional `labels`)")
    parser.add_argument("--labels", help="held-out labels as an .npy (keras_models.py's)")
    parser.add_argument("--ratios", default="0.25", help="comma-separated channel ratios")
    parser.add_argument("--exclude", action="append", default=[], help="regex kept unpruned")
    parser.add_argument("--streams-only", action="store_true", help="slice only the streams")
    parser.add_argument("--round-to", type=int, default=16)
    parser.add_argument("--rms-correction", action="store_true", help="cob's --rms-correction")
    parser.add_argument(
        "--global",
        dest="global_ranking",
        action="store_true",
        help="--global: the ratio over all streams, widths by each stream's removed energy",
    )
    parser.add_argument("--lm", action="store_true", help="score next-token predictions")
    parser.add_argument("--time-batch", type=int, default=8, help="held-out inputs per timed run")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per model")
    parser.add_argument("--json", help="write the rows here")
    return parser.parse_args(argv)


def _measure(args, original: onnx.ModelProto, heldout: dict, ratio: float) -> dict:
    start = time.perf_counter()
    result = onnxprune.prune(original, method="cob", ratio=ratio, data=args.calib,
                             exclude=args.exclude, round_to=args.round_to,
                             rms_correction=args.rms_correction,
                             global_ranking=args.global_ranking)  # fmt: skip
    seconds = time.perf_counter() - start
    report = result.report
    row = {
        "ratio": ratio,
        "streams_only": args.streams_only,
        "rms_correction": args.rms_correction,
        "global": args.global_ranking,
        "stream_widths": _stream_widths(result),
        "params": list(report.params),
        "macs": list(report.macs),
        "seconds": round(seconds, 1),
    }
    feeds = {k: v for k, v in heldout.items() if k != "labels"}
    before, after = first_output(original, feeds), first_output(result.model, feeds)
    if args.lm:
        row.update(next_tokens(before, after, feeds["input_ids"]))
    elif "attention_mask" in feeds:
        row.update(_cosines(before, after, feeds["attention_mask"]))
    batch = {k: v[: args.time_batch] for k, v in feeds.items()}
    row["latency_ms"] = _latency([original, result.model], batch, args.repeats)
    if "labels" in heldout:
        labels = heldout["labels"]
        row["accuracy"] = [float((o.argmax(1) == labels).mean()) for o in (before, after)]
        row["agreement"] = float((before.argmax(1) == after.argmax(1)).mean())
    return row


def _all_but_streams(model: onnx.ModelProto) -> str:
    """A regex matching every group name except those of the streams cob makes rotatable."""
    graph = to_rmsnorm(normalize(model)).graph
    names = [n for g in analyze(graph) if g.invariants for n in (g.name, *g.producers)]
    return f"^(?!(?:{'|'.join(map(re.escape, names))})$)"


def _stream_widths(result: onnxprune.Result) -> list[int]:
    """The widths of the residual streams: the groups that pass a (converted) RMSNorm."""
    groups = [g for g in result.groups if g.invariants and g.name in result.plans]
    return sorted({len(result.plans[g.name].keep) for g in groups})


def _latency(models: list[onnx.ModelProto], feeds: dict, repeats: int) -> list[float]:
    """Median milliseconds per run of each model, runs interleaved (after 3 warm-up runs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sessions = [
        ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for m in models
    ]
    times: list[list[float]] = [[] for _ in sessions]
    for step in range(repeats + 3):
        for session, timed in zip(sessions, times, strict=True):
            start = time.perf_counter()
            session.run(None, feeds)
            if step >= 3:
                timed.append(1000 * (time.perf_counter() - start))
    return [round(float(np.median(t)), 2) for t in times]


def first_output(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _cosines(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Cosine between the mask-weighted mean-pooled embeddings, mean and minimum."""
    weights = mask[..., None].astype(np.float64)
    pooled = [(h * weights).sum(1) / weights.sum(1) for h in (before, after)]
    cos = (pooled[0] * pooled[1]).sum(1)
    cos /= np.linalg.norm(pooled[0], axis=1) * np.linalg.norm(pooled[1], axis=1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def next_tokens(before: np.ndarray, after: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """Perplexity of each model's next-token predictions, and their top-1 agreement."""
    targets = ids[:, 1:]

    def perplexity(logits: np.ndarray) -> float:
        z = logits[:, :-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float(np.exp(-np.take_along_axis(log_p, targets[..., None], -1).mean()))

    agree = (before[:, :-1].argmax(-1) == after[:, :-1].argmax(-1)).mean()
    return {"perplexity": [perplexity(before), perplexity(after)], "top1_agreement": float(agree)}


if __name__ == "__main__":
    main()
