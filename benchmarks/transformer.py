"""MiniLM (all-MiniLM-L6-v2): onnxprune's pruning next to Torch-Pruning's BERT pruning.

onnxprune prunes the legacy export of `benchmarks/minilm_model.py` with each method spec,
calibrated on `calib.npz` (256 sentences), either at a share of the channels of every group
(`--ratios`: the FFN neurons and, since heads are prunable, whole heads too) or at a fraction
of the MACs kept (`--targets`, `--target-macs`: heads and FFN neurons, widths chosen by the
method); Torch-Pruning prunes the same weights in transformers' BertModel — whole attention
heads and FFN neurons, uniform per layer, hidden size kept (the embeddings are ignored layers,
which leaves the residual stream's group alone), with its L2 magnitude
(`MagnitudeImportance(p=2, group_reduction="mean")`, its HF BERT example's) and Taylor
importance (gradients of ⟨r, f(x)⟩ with a seeded Gaussian r, the loss onnxprune's taylor uses
without labels) — at the largest MACs reduction onnxprune reached in that row, then exported by
the same legacy exporter. No fine-tuning anywhere.

Every model is scored by `onnxprune.measure.embedding` on `heldout.npz` (128 sentences, disjoint)
against the original: mean cosine of mean-pooled embeddings, nearest-neighbour agreement, Spearman
ρ of pairwise similarities. MACs are onnxprune's count at batch 8, sequence 128; latency is ONNX
Runtime at batch 8 × 128 tokens, one intra-op thread, all models interleaved, medians.

    python benchmarks/transformer.py               # 5 specs × 25/50 % + Torch-Pruning (≈ 40 min)
    python benchmarks/transformer.py --quick       # id and id defaults at 25 %, TP l2
    python benchmarks/transformer.py --targets 0.7,0.5 --specs id,id_defaults,taylor \
        --out benchmarks/results/transformer_targets.json
    python benchmarks/transformer.py --markdown    # the table of the last run

Writes `benchmarks/results/transformer.json` (raw) and prints a markdown table.
"""

from __future__ import annotations

import argparse
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

import onnxprune  # noqa: E402
from benchmarks.accuracy import machine  # noqa: E402
from benchmarks.minilm_model import (  # noqa: E402
    INPUTS,
    MiniLMFiles,
    ensure_minilm,
    export_legacy,
    load_torch,
)
from onnxprune.calib.data import Dataset  # noqa: E402
from onnxprune.compare.sweep import Evaluator  # noqa: E402
from onnxprune.measure.cost import count  # noqa: E402
from onnxprune.measure.latency import benchmark  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "transformer.json"
SHAPE = (8, 128)  # batch, sequence for MACs and latency
SPECS = {  # file stem: (label, prune options)
    "id": ("id", {"method": "id", "compensate": "none", "recalibrate": False, "sequential": False}),
    "id_defaults": ("id (defaults: +bias +recalibrate)", {"method": "id"}),
    "biascomp": ("biascomp (probe:4)", {"method": "biascomp", "jacobian": "probe:4"}),
    "taylor": ("taylor", {"method": "taylor"}),
    "magnitude": ("magnitude", {"method": "magnitude"}),
}
QUICK_SPECS = ("id", "id_defaults")
RATIOS = (0.25, 0.5)
TP_CRITERIA = ("l2", "taylor")
HEADS, HIDDEN, FFN = 12, 384, 1536


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="id specs at 25 %%, TP l2 only")
    parser.add_argument("--markdown", action="store_true", help="print the last run's table")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (interleaved)")
    parser.add_argument("--ratios", help="comma-separated channel ratios (default 0.25,0.5)")
    parser.add_argument("--targets", help="comma-separated fractions of MACs kept (instead)")
    parser.add_argument("--specs", help=f"comma-separated subset of {','.join(SPECS)}")
    parser.add_argument("--out", default=str(RESULTS), help="JSON file to write")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    specs = {k: SPECS[k] for k in QUICK_SPECS} if args.quick else SPECS
    ratios = RATIOS[:1] if args.quick else RATIOS
    if args.ratios:
        ratios = tuple(float(r) for r in args.ratios.split(","))
    if args.specs:
        specs = {k: SPECS[k] for k in args.specs.split(",")}
    if args.targets:
        ratios = tuple(Target(float(t)) for t in args.targets.split(","))
    criteria = TP_CRITERIA[:1] if args.quick else TP_CRITERIA
    result = run(ensure_minilm(), specs, ratios, criteria, repeats=args.repeats, out=Path(args.out))
    print(markdown(result))


class Target(float):
    """A fraction of the MACs kept (`--target-macs`), where a row would otherwise be a ratio."""


def _asked(ratio: float) -> dict[str, float]:
    """What a row asks onnxprune for, as its prune option, which is also its cells' key:
    {"target_macs": t} for a `Target`, else {"ratio": r}."""
    return {"target_macs": float(ratio)} if isinstance(ratio, Target) else {"ratio": ratio}


def run(files: MiniLMFiles, specs: dict, ratios, criteria, *, repeats: int, out: Path) -> dict:
    """Per ratio (or `Target`): prune every cell, score it, time those models and the original
    interleaved, and rewrite `out` (so an interrupted run keeps the ratios it finished)."""
    original = onnx.load(files.legacy)
    evaluator = Evaluator(original, _dataset(files.heldout))
    base_macs = _macs(original)
    folder = files.legacy.parent / "transformer_bench"
    folder.mkdir(exist_ok=True)
    result = {"machine": {**machine(), "isa": _isa()}, "shape": SHAPE, "base_macs": base_macs,
              "data": [files.calib.name, files.heldout.name], "cells": []}  # fmt: skip
    for ratio in ratios:
        cells = [_ours(files, stem, spec, ratio, evaluator, base_macs, folder)
                 for stem, spec in specs.items()]  # fmt: skip
        reached = max((c["macs_reduction"] for c in cells if "error" not in c), default=ratio)
        cells += [{**_torch_pruning(files, criterion, reached, evaluator, base_macs, folder),
                   **_asked(ratio)} for criterion in criteria]  # fmt: skip
        paths = [files.legacy] + [folder / c["file"] for c in cells if "file" in c]
        times = _latency(paths, repeats)
        for cell in cells:
            cell.update(times.get(cell.get("file"), {}))
        result["cells"] += cells
        result.setdefault("base_latency_ms", {})[str(ratio)] = times[files.legacy.name]["median_ms"]
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _ours(files, stem, spec, ratio, evaluator, base_macs, folder) -> dict:
    """One onnxprune cell: prune (or reuse the file an earlier run of this cell saved), score."""
    label, options = spec
    kind = "target" if isinstance(ratio, Target) else ""
    path = folder / f"ours_{stem}_{kind}{ratio}.onnx"
    meta = path.with_suffix(".json")
    cell = {"tool": "onnxprune", "method": label, **_asked(ratio)}
    if not path.exists():
        start = time.perf_counter()
        try:
            result = onnxprune.prune(str(files.legacy), data=str(files.calib), verify=False,
                                     **_asked(ratio), **options)  # fmt: skip
        except onnxprune.OnnxPruneError as exc:
            return {**cell, "error": str(exc)}
        meta.write_text(json.dumps({"prune_seconds": time.perf_counter() - start}))
        result.save(path)
    seconds = json.loads(meta.read_text())["prune_seconds"] if meta.exists() else None
    cell["prune_seconds"] = seconds
    return {**cell, **_scores(onnx.load(path), path, evaluator, base_macs)}


def _torch_pruning(files, criterion, target, evaluator, base_macs, out) -> dict:
    """One Torch-Pruning cell at MACs reduction `target`: heads and FFN at uniform ratios."""
    head_ratio, ffn_ratio = tp_ratios(target)
    start = time.perf_counter()
    model = tp_prune(files, criterion, head_ratio, ffn_ratio)
    seconds = time.perf_counter() - start
    path = out / f"tp_{criterion}_{target:.3f}.onnx"
    import torch

    with np.load(files.heldout) as data:
        args = tuple(torch.from_numpy(data[k][:8]) for k in INPUTS)
    export_legacy(model, args, path)
    proto = onnx.load(path)
    cell = {"tool": "Torch-Pruning", "method": f"TP {criterion} (heads + FFN)",
            "heads_pruned": round(head_ratio * HEADS), "ffn_ratio": ffn_ratio,
            "prune_seconds": seconds}  # fmt: skip
    return {**cell, **_scores(proto, path, evaluator, base_macs)}


def tp_ratios(target: float) -> tuple[float, float]:
    """Head and FFN pruning ratios whose MACs reduction is `target` at sequence 128: whole heads
    (k of 12, the nearest to target) and the FFN ratio that makes up the rest. Per layer and
    token, heads carry Q, K, V, O (4·H²) and attention (2·S·H), the FFN 2·H·I."""
    heads = 4 * HIDDEN**2 + 2 * SHAPE[1] * HIDDEN
    ffn = 2 * HIDDEN * FFN
    head_ratio = round(target * HEADS) / HEADS
    ffn_ratio = (target * (heads + ffn) - head_ratio * heads) / ffn
    return head_ratio, float(np.clip(ffn_ratio, 0.0, 0.95))


def tp_prune(files: MiniLMFiles, criterion: str, head_ratio: float, ffn_ratio: float):
    """transformers' BertModel pruned by Torch-Pruning's MetaPruner (heads + FFN, hidden kept)."""
    import torch
    import torch_pruning as tp

    model = load_torch(files.model_dir)  # imports transformers behind the torchvision stub
    from transformers.models.bert.modeling_bert import BertSelfAttention

    with np.load(files.calib) as data:
        calib = {k: torch.from_numpy(data[k]) for k in INPUTS}
    attention = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    num_heads = {lin: a.num_attention_heads for a in attention for lin in (a.query, a.key, a.value)}
    if criterion == "taylor":
        importance = tp.importance.TaylorImportance()
        _accumulate_gradients(model, calib)
    else:
        importance = tp.importance.MagnitudeImportance(p=2, group_reduction="mean")
    pruner = tp.pruner.MetaPruner(
        model, {k: v[:8] for k, v in calib.items()}, importance=importance,
        global_pruning=False, pruning_ratio=ffn_ratio, num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio,
        ignored_layers=[model.bert.embeddings],
    )  # fmt: skip
    for group in pruner.step(interactive=True):
        group.prune()
    for a in attention:
        a.num_attention_heads = pruner.num_heads[a.query]
        a.all_head_size = a.query.out_features
    model.zero_grad(set_to_none=True)
    return model.eval()


def _accumulate_gradients(model, calib: dict, batch: int = 32, seed: int = 0) -> None:
    """Gradients of Σ ⟨r, f(x)⟩ over the calibration set, r ~ N(0, 1) of shape (S, H), seeded."""
    import torch

    rng = np.random.default_rng(seed)
    n, seq = calib["input_ids"].shape
    probe = torch.as_tensor(rng.standard_normal((seq, HIDDEN)), dtype=torch.float32)
    model.zero_grad()
    for start in range(0, n, batch):
        feeds = {k: v[start : start + batch] for k, v in calib.items()}
        (model(**feeds) * probe).sum().backward()


def _scores(proto: onnx.ModelProto, path: Path, evaluator: Evaluator, base_macs: int) -> dict:
    evaluation = evaluator(proto)
    macs = _macs(proto)
    return {"file": path.name, "macs": macs, "macs_reduction": 1 - macs / base_macs,
            "params": count(proto).params, "cosine": evaluation.cosine,
            "retrieval": evaluation.retrieval, "spearman": evaluation.spearman,
            "rel_l2": evaluation.rel_l2}  # fmt: skip


def _macs(proto: onnx.ModelProto) -> int:
    return count(proto, input_shapes={name: SHAPE for name in INPUTS}).macs


def _isa() -> str:
    """AVX-512 or AVX2 (ONNX Runtime's kernels differ), from /proc/cpuinfo's flags."""
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), "")  # fmt: skip
    return "AVX-512" if "avx512f" in flags.split() else "AVX2" if "avx2" in flags.split() else "?"


def _dataset(path: Path) -> Dataset:
    with np.load(path) as data:
        return Dataset({k: data[k] for k in INPUTS}, source=str(path))


def _latency(paths: list[Path], repeats: int) -> dict[str, dict]:
    """Median latency and speedup over the first model, every model interleaved."""
    rows = benchmark([str(p) for p in paths], batches=(SHAPE[0],), threads=1, warmup=2,
                     repeats=repeats, min_time=0.0,
                     input_shapes={name: SHAPE for name in INPUTS}).rows  # fmt: skip
    return {Path(p).name: {"median_ms": r.median_ms, "iqr_ms": r.iqr_ms, "speedup": r.speedup,
                           "ideal_speedup": r.ideal_speedup}
            for p, r in zip(paths, rows, strict=True)}  # fmt: skip


def markdown(result: dict) -> str:
    """One row per cell: tool, method, FFN/heads pruned, MACs cut, scores, latency."""
    head = ("| tool | method | pruned | MACs −% | cosine | NN agree | Spearman | rel-L2 | "
            "ms (b8×128) | speedup | ideal | prune s |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for c in result["cells"]:
        asked = (f"--ratio {c['ratio']:g}" if "ratio" in c
                 else f"--target-macs {c['target_macs']:g}")  # fmt: skip
        if "error" in c:
            lines.append(f"| {c['tool']} | {c['method']} | {asked} | error: "
                         f"{c['error'][:80]} |" + " |" * 8)  # fmt: skip
            continue
        pruned = (asked if c["tool"] == "onnxprune"
                  else f"{c['heads_pruned']}/12 heads, {c['ffn_ratio']:.0%} FFN")  # fmt: skip
        lines.append(
            f"| {c['tool']} | {c['method']} | {pruned} | {100 * c['macs_reduction']:.1f} | "
            f"{c['cosine']:.4f} | {100 * c['retrieval']:.1f} % | {c['spearman']:.4f} | "
            f"{c['rel_l2']:.3f} | {c.get('median_ms', float('nan')):.0f} | "
            f"{c.get('speedup', float('nan')):.2f}× | {c.get('ideal_speedup', float('nan')):.2f}× "
            f"| {'-' if c['prune_seconds'] is None else round(c['prune_seconds'])} |"
        )
    m = result["machine"]
    base = ", ".join(f"{v:.0f}" for v in result["base_latency_ms"].values())
    lines.append(f"\noriginal: {base} ms at batch 8 × 128 tokens (timed with each ratio's rows), "
                 f"{result['base_macs'] / 1e9:.2f} G MACs; {m['cpu']} ({m['isa']}), "
                 f"onnxruntime {m['onnxruntime']}, 1 thread")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
