"""Breadth check: more real architectures than the main zoo, each through analysis, ratio 0 and
one prune per method at `--ratio 0.5` — does the tool analyze, prune and write a valid model?

Models: `zoo_models.extra_specs()` (torchvision MobileNetV2, MNASNet, ResNet-18, RegNet-X,
GoogLeNet, Inception-v3 at 299×299, EfficientNetV2-S, Swin-T, VGG-16-BN, MobileNetV3-Large,
Wide-ResNet-50-2, MaxViT-T, Swin-V2-T, the LR-ASPP / DeepLabV3 / FCN segmenters, the R3D-18 video
model on 8×112×112 clips; ultralytics YOLOv5nu, YOLOv10n, YOLO11n, YOLO12n, YOLO26n and
YOLOv8n's segment, pose, OBB heads at 320×320, its classifier at 224×224; ResNet-18 at opset 11
and unfolded; SqueezeNet, DenseNet-121, ResNet-18, MobileNetV2, GoogLeNet, LR-ASPP and YOLOv8n
exported at opsets 7–9, converted at load), random seeded weights as in the main zoo, legacy
exporter, dynamic batch. Build them first:

    python benchmarks/zoo_models.py --models mobilenet_v2,mnasnet1_0,...   # see extra_specs()
    python benchmarks/zoo_breadth.py --out benchmarks/results/zoo_breadth.json

Per model: prunable groups, share of the MACs (Conv, ConvTranspose, Gemm, MatMul, Einsum) in
selectable groups (default and `--prune-residual`) with the top blockers, the tool's MACs
against a count from ORT's shapes, ratio-0 max |Δ| / max |y| on held-out photos, and
`magnitude` / `id` at `--ratio 0.5` through the CLI: exit code, checker, ORT run, held-out rel-L2
(plain and centred on the per-sample mean: YOLO's anchor grid makes plain rel-L2 look small), MAC
cut, pruning seconds.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import zoo
from zoo_models import DEFAULT_CACHE, extra_specs

METHODS = ("magnitude", "id")


def check_model(
    cache: Path, name: str, data_tag: str | int, ratio: float, flags: Sequence[str] = ()
) -> dict:
    """Analysis, ratio-0 exactness and one CLI prune per method (with extra CLI `flags`) of one
    exported model; its data are `calib_<data_tag>.npz` and `heldout_<data_tag>.npz`."""
    path = cache / f"{name}.onnx"
    calib = cache / f"calib_{data_tag}.npz"
    heldout = zoo.load_npz(cache / f"heldout_{data_tag}.npz")
    row: dict = {}
    summary = zoo.guarded(zoo.analysis_summary, path)
    if isinstance(summary, dict):
        row["groups"] = summary["groups"]
        row["prunable_groups"] = summary["prunable_groups"]
        for mode in ("default", "prune_residual"):
            row[f"share_{mode}"] = summary[mode]["share"]
        row["blockers"] = summary["default"]["blockers"][:3]
    else:
        row["analysis_error"] = summary
    row["macs"] = zoo.guarded(zoo.mac_check, path, heldout)
    row["ratio0"] = zoo.guarded(zoo.ratio0_deviation, path, calib, heldout)
    untimed = SimpleNamespace(repeats=0)
    for method in METHODS:
        row[method] = zoo.run_cli(path, method, ratio, calib, heldout, untimed, None, flags)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.environ.get("ONNXPRUNE_ZOO_CACHE", str(DEFAULT_CACHE))
    parser.add_argument("--cache", type=Path, default=Path(default))
    parser.add_argument("--models", default="", help="comma-separated subset of extra_specs()")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo_breadth.json"))
    args = parser.parse_args()
    specs = extra_specs()
    names = args.models.split(",") if args.models else list(specs)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in names:
        results[name] = check_model(args.cache, name, specs[name].data_tag, args.ratio)
        print(name, json.dumps(results[name])[:400], flush=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
