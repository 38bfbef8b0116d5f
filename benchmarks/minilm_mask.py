"""MiniLM with calibration statistics masked to the real tokens (`--row-mask`) and with
cross-validated FFN maps (`--cv-maps`), or not.

~60 % of the calibration tokens are padding, whose states the mean-pooled embedding never reads.
Each cell prunes the legacy export on the first N sentences of `minilm_calib.py`'s pool in each
variant: `plain` (every token row in the statistics), `mask` (`row_mask="attention_mask"`:
padding rows left out), `cv` (`cv_maps=True`: each FFN group's map, a ridge or means only, by
two-fold cross-validation on the calibration sentences), `mask+cv`; and scores them against the
original (mean cosine of mean-pooled embeddings,
nearest-neighbour agreement, Spearman ρ) on validation sentences (the next 256 of the pool,
never fitted: where a choice is made) and on `heldout.npz` (the test sentences, never read by a
fit or a choice). Cells: heads + FFN with plain `id` (`--no-sequential --no-recalibrate`) at
`--target-macs`, and SliceGPT-style `cob` slicing only the residual streams.

    ONNXPRUNE_ZOO_CACHE=/work/zoo_cache python benchmarks/minilm_mask.py --sizes 256 \
        --cells id:0.7,id:0.5,cob:0.25 --variants plain,mask

Writes `benchmarks/results/minilm_mask.json` (or `--out`), rewritten after every prune.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
from benchmarks.accuracy import machine  # noqa: E402
from benchmarks.minilm_calib import calibration_pool  # noqa: E402
from benchmarks.minilm_model import INPUTS, ensure_minilm  # noqa: E402
from benchmarks.slicegpt import _all_but_streams  # noqa: E402
from benchmarks.transformer import _dataset  # noqa: E402
from onnxprune.calib.data import Dataset  # noqa: E402
from onnxprune.compare.sweep import Evaluator  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "minilm_mask.json"
VALIDATION = 256  # pool sentences after the largest fit set, for choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256", help="calibration sentences per cell")
    parser.add_argument("--cells", default="id:0.7,id:0.5,cob:0.25", help="method:target,...")
    parser.add_argument("--variants", default="plain,mask", help="plain, mask, cv, mask+cv")
    parser.add_argument(
        "--widths-from",
        type=Path,
        help="JSON of this script: id at the widths "
        "of its first plain id cell (`--layer-ratio` per group) instead of a target",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    files, original, pool = legacy_and_pool()
    sizes = [int(s) for s in args.sizes.split(",")]
    scorers = split_scorers(original, files, pool, max(sizes))
    streams = _all_but_streams(original)
    fixed = _fixed_widths(original, args.widths_from) if args.widths_from else None
    out = {"machine": machine(), "pool": len(pool["input_ids"]), "validation": VALIDATION}
    out["cells"] = []
    for cell in args.cells.split(","):
        method, target = cell.split(":")
        for size in sizes:
            data = {k: pool[k][:size] for k in INPUTS}
            for variant in args.variants.split(","):
                options = {
                    "row_mask": "attention_mask" if "mask" in variant else None,
                    "cv_maps": "cv" in variant,
                }
                start = time.perf_counter()
                result = _prune(original, method, float(target), data, options, streams, fixed)
                before, after = result.report.macs
                row = {
                    "method": method,
                    "target": float(target),
                    "sentences": size,
                    "real_tokens": int(data["attention_mask"].sum()),
                    "variant": variant,
                    "macs_reduction": 1 - after / before,
                    "seconds": round(time.perf_counter() - start, 1),
                    "load": os.getloadavg(),
                }
                row.update(scored(scorers, result.model))
                row["widths"] = {g.name: len(p.keep) for g, p in _plans(result)}
                row["maps"] = {g.name: p.info for g, p in _plans(result) if "cv_err" in p.info}
                out["cells"].append(row)
                print({k: v for k, v in row.items() if k != "widths"}, flush=True)
                args.out.write_text(json.dumps(out, indent=1) + "\n")


def legacy_and_pool():
    """MiniLM's files, its legacy export and the calibration pool (`minilm_calib.py`)."""
    files = ensure_minilm()
    return files, onnx.load(str(files.legacy)), calibration_pool(files.model_dir)


def split_scorers(original, files, pool: dict, end: int) -> dict[str, Evaluator]:
    """Scorers against the original on the validation sentences (the pool's `VALIDATION` after
    index `end`) and on the test sentences (`heldout.npz`)."""
    validation = Dataset({k: pool[k][end : end + VALIDATION] for k in INPUTS}, source="pool")
    return {
        "validation": Evaluator(original, validation),
        "test": Evaluator(original, _dataset(files.heldout)),
    }


def scored(scorers: dict[str, Evaluator], model) -> dict[str, dict[str, float]]:
    """Per split: mean cosine, nearest-neighbour agreement and Spearman ρ against the original."""
    scores = {split: scorer(model) for split, scorer in scorers.items()}
    return {split: {"cosine": s.cosine, "retrieval": s.retrieval, "spearman": s.spearman}
            for split, s in scores.items()}  # fmt: skip


def _prune(original, method, target, data, options, streams, fixed) -> onnxprune.Result:
    """`id` over heads and FFN at `target_macs=target` (or at the `fixed` layer ratios), or cob
    slicing the streams by `target`."""
    if method == "id" and fixed:
        return onnxprune.prune(original, method="id", data=data, verify=False, ratio=0.0,
                               layer_ratios=fixed, round_to=1, sequential=False,
                               recalibrate=False, **options)  # fmt: skip
    if method == "cob":
        return onnxprune.prune(original, method="cob", ratio=target, data=data, exclude=[streams],
                               round_to=16, verify=False, **options)  # fmt: skip
    return onnxprune.prune(original, method="id", target_macs=target, data=data, verify=False,
                           sequential=False, recalibrate=False, **options)  # fmt: skip


def _fixed_widths(original, path: Path) -> tuple[tuple[str, float], ...]:
    """Per group of the first plain id cell in `path`: (its exact name, the ratio that keeps
    its width at round_to 1)."""
    cells = json.loads(path.read_text())["cells"]
    cell = next(c for c in cells if c["method"] == "id" and c["variant"] in ("plain", None))
    channels = {g.name: g.channels for g in onnxprune.analyze(original).groups}
    return tuple(
        (f"^{re.escape(name)}$", (channels[name] - width) / channels[name])
        for name, width in cell["widths"].items()
    )


def _plans(result):
    return [(g, result.plans[g.name]) for g in result.groups if g.name in result.plans]


if __name__ == "__main__":
    main()
