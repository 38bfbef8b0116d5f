"""Where `id` loses accuracy on a digits CNN: option variants side by side, and per-group ablation.

`--variants` (JSON: label → prune options): every variant pruned to every MAC reduction, scored
on the validation split carved from the calibration data (benchmarks/defaults.py's split):
top-1 and the logits' relative L2 deviation from the original's; test top-1 is reported beside
it, never used for a choice. `--ablate R`: the widths `id`'s defaults choose at reduction R,
then each pruned group alone at its width (every other group whole), and every group but it:
the validation deviation each group causes by itself and what is left without it.

    python benchmarks/digits_losses.py --models mobilenetv2,inception --reductions 0.5,0.7 \\
        --variants '{"default": {}, "round-to 1": {"round_to": 1}}' --out variants.json
    python benchmarks/digits_losses.py --models mobilenetv2 --ablate 0.7 --out ablation.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from benchmarks.defaults import logits, splits, top1

ROOT = Path(__file__).resolve().parents[1]


def scored(model: onnx.ModelProto, result: onnxprune.Result, val: tuple, test: tuple) -> dict:
    """Validation top-1 and logit rel-L2, test top-1, MACs kept and the allocation chosen."""
    ref, got = logits(model, val[0]), logits(result.model, val[0])
    target = result.report.target
    return {
        "validation": top1(result.model, *val),
        "validation_rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
        "test": top1(result.model, *test),
        "macs_kept": result.report.macs[1] / result.report.macs[0],
        "allocation": target.allocation if target else None,
        "kept": {g.name: g.kept for g in result.report.groups if g.status == "pruned"},
    }


def variants(name: str, reductions: list[float], options: dict) -> dict:
    model = onnx.load(ROOT / "models" / f"{name}.onnx")
    fit, val, test = splits(name)
    cells = {}
    for reduction in reductions:
        for label, extra in options.items():
            result = onnxprune.prune(
                model, method="id", target_macs=1 - reduction, data=fit, verify=False, **extra
            )
            cells[f"{label} @ {reduction}"] = cell = scored(model, result, val, test)
            print(name, label, reduction, {k: v for k, v in cell.items() if k != "kept"})
    return cells


def ablation(name: str, reduction: float) -> dict:
    model = onnx.load(ROOT / "models" / f"{name}.onnx")
    fit, val, test = splits(name)
    full = onnxprune.prune(model, method="id", target_macs=1 - reduction, data=fit, verify=False)
    rows = {g.name: g for g in full.report.groups if g.status == "pruned"}
    streams = any(g.coupled for g in full.groups if g.name in rows)
    cells = {"all": scored(model, full, val, test)}

    def pruned(names: list[str]) -> dict:
        recipe = {n: 1 - rows[n].kept / rows[n].channels for n in names}
        result = onnxprune.prune(model, method="id", ratio=0.0, data=fit, verify=False,
                                 round_to=1, prune_residual=streams, recipe=recipe)  # fmt: skip
        return scored(model, result, val, test)

    for group in rows:
        cells[group] = {
            "kept": rows[group].kept,
            "channels": rows[group].channels,
            "id_error": rows[group].error,
            "alone": pruned([group]),
            "all but it": pruned([n for n in rows if n != group]),
        }
        print(name, group, {k: v for k, v in cells[group].items() if k in ("kept", "channels")})
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2,inception")
    parser.add_argument("--reductions", default="0.5,0.7")
    parser.add_argument("--variants", default='{"default": {}}', help="JSON: label → options")
    parser.add_argument("--ablate", type=float, help="per-group ablation at this reduction")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {}
    for name in args.models.split(","):
        if args.ablate is not None:
            results[name] = ablation(name, args.ablate)
        else:
            reductions = [float(r) for r in args.reductions.split(",")]
            results[name] = variants(name, reductions, json.loads(args.variants))
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
