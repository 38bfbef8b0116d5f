"""Which criterion should `--method magnitude` rank by? Chosen on validation data, never the test.

The bundled digits models have BatchNorm folded by the exporter, so nothing of γ or σ is left in
them. This script retrains the digits CNNs exactly as `models/build.py` does (same seeds, same
schedule) and exports them with BatchNorm kept (`TrainingMode.PRESERVE`, eval statistics) into
`--cache`; onnxprune's loader then folds it and keeps γ, σ and the raw filter norms.

Every criterion (`folded`, `raw`, `gamma`, `bn-scale`) prunes every model to 50 / 70 / 85 % fewer
MACs (`--target-macs`, the same widths for every criterion), with and without `--recalibrate`
(the analogue of BatchNorm re-estimation), fitted on 384 calibration samples; the best mean
accuracy on the other 128 (benchmarks/defaults.py's split) is the default. Test accuracy is
recorded beside it, not used for the choice.

    python benchmarks/ranking.py --out benchmarks/results/ranking.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from benchmarks.defaults import pruned_cell, splits, top1

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("vgg", "resnet", "mobilenetv2", "inception", "senet")
REDUCTIONS = (0.5, 0.7, 0.85)
CRITERIA = ("folded", "raw", "gamma", "bn-scale")


def bn_model(name: str, cache: Path) -> onnx.ModelProto:
    """The digits model `name` retrained as models/build.py does, exported with BatchNorm kept."""
    path = cache / f"{name}.bn.onnx"
    if not path.is_file():
        import torch

        from models.build import SEED, SPECS, export_legacy, seed_everything, train
        from models.data import load

        spec = SPECS[name]
        seed_everything(SEED)
        model = train(spec.factory(), load(spec.flat), spec)
        cache.mkdir(parents=True, exist_ok=True)
        export_legacy(model, torch.zeros(2, 1, 32, 32), path, keep_batchnorm=True)
    model = onnx.load(path)
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        raise SystemExit(f"{path}: the export folded BatchNorm; nothing to measure")
    return model


def measure(name: str, cache: Path) -> dict:
    model = bn_model(name, cache)
    fit, val, test = splits(name)
    cells = {"original": {"validation": top1(model, *val), "test": top1(model, *test)}}
    for reduction in REDUCTIONS:
        for recalibrate in (False, True):
            for criterion in CRITERIA:
                start = time.perf_counter()
                result = onnxprune.prune(
                    model,
                    method="magnitude",
                    criterion=criterion,
                    target_macs=1 - reduction,
                    recalibrate=recalibrate,
                    data=fit,
                    verify=False,
                )
                label = criterion + (" + recalibrate" if recalibrate else "")
                cell = pruned_cell(result, val, test, start)
                cells[f"{label} @ {reduction}"] = cell
                print(name, label, reduction, {k: round(v, 4) for k, v in cell.items()}, flush=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ranking.json")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnxprune_bn_models"))
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.models.split(","):
        results[name] = measure(name, args.cache)
        args.out.write_text(json.dumps(results, indent=1))
    for recal in ("", " + recalibrate"):
        mean = {
            c: np.mean([results[m][f"{c}{recal} @ {r}"]["validation"] for m in results
                        for r in REDUCTIONS])
            for c in CRITERIA
        }  # fmt: skip
        print(f"mean validation accuracy{recal}:", {k: f"{v:.2%}" for k, v in mean.items()})


if __name__ == "__main__":
    main()
