"""Regression check of a change on zoo exports: the sha256 of each pruned model and its
verification numbers, for the source tree given (run once per tree and compare the lines).

    git archive <commit> | tar -x -C /tmp/before
    python benchmarks/prune_hashes.py --tree /tmp/before > before.txt
    python benchmarks/prune_hashes.py --tree . > after.txt && diff before.txt after.txt

The editable install of onnxprune is bypassed so that `--tree` is what runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

CACHE = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", "/work/zoo_cache"))
MODELS = "resnet50.b1,yolov8n,mobilenet_v3_small,yolov8n.b1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, required=True, help="source tree holding onnxprune/")
    parser.add_argument("--models", default=MODELS, help="comma-separated zoo exports")
    parser.add_argument("--methods", default="magnitude,id")
    args = parser.parse_args()
    sys.meta_path = [f for f in sys.meta_path if not _editable(f)]
    sys.path.insert(0, str(args.tree.resolve()))
    import onnxprune

    print(onnxprune.__file__, file=sys.stderr)
    for name in args.models.split(","):
        calib = CACHE / ("calib_320.npz" if name.startswith("yolo") else "calib_224.npz")
        for method in args.methods.split(","):
            result = onnxprune.prune(CACHE / f"{name}.onnx", method=method, ratio=0.25, data=calib)
            digest = hashlib.sha256(result.model.SerializeToString()).hexdigest()[:12]
            outputs = [(o.name, o.rel_l2, o.max_abs) for o in result.report.verification.outputs]
            print(name, method, digest, outputs, result.report.macs, flush=True)


def _editable(finder: object) -> bool:
    """An editable install's import hook, which would load the installed tree instead."""
    module = getattr(finder, "__module__", "") or ""
    return "editable" in type(finder).__name__.lower() or "editable" in module.lower()


if __name__ == "__main__":
    main()
