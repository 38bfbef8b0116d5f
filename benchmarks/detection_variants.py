"""Option variants of `onnxprune --method id --ratio 0.25` on one detector export of
`detection.py`, for a given source tree: the share of the original's best boxes found again on
the held-out crops and on "val" crops (16 other crops of the calibration photos, seed 3: where a
choice between variants is made), and the parameters.

    python benchmarks/detection_variants.py --cache /work/tmp/s40/det --model fcos \\
        --tree . --variants "--no-sequential --no-recalibrate;--no-sequential" --out v.json

The CLI runs in the tree given (`python -m onnxprune` from there), so two trees compare.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detection import SIZE, _unnormalised, detections, found_again  # noqa: E402
from photos import CALIB_PHOTOS, HELDOUT_PHOTOS, photo_crops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="detection.py's --cache")
    parser.add_argument("--model", default="fcos")
    parser.add_argument("--tree", type=Path, default=Path("."))
    parser.add_argument("--variants", default="", help="option sets separated by ';'")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    path = args.cache / f"{args.model}.onnx"
    crops = {
        "heldout": _unnormalised(photo_crops(HELDOUT_PHOTOS, 16, SIZE, 2)),
        "val": _unnormalised(photo_crops(CALIB_PHOTOS, 16, SIZE, 3)),
    }
    original = {name: detections(path, images) for name, images in crops.items()}
    rows = []
    for variant in args.variants.split(";"):
        row = {"tree": str(args.tree), "model": args.model, "variant": variant.strip()}
        row.update(_run(path, args, variant.split(), crops, original))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


def _run(path: Path, args: argparse.Namespace, options: list[str], crops, original) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out, report = Path(folder) / "pruned.onnx", Path(folder) / "report.json"
        command = [sys.executable, "-m", "onnxprune", str(path.resolve()), "--method", "id",
                   "--ratio", "0.25", "--data", str((args.cache / "calib.npz").resolve()),
                   "-o", str(out), "--report", str(report), *options]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=args.tree, check=False)
        row: dict = {"exit": done.returncode, "seconds": round(time.perf_counter() - start, 1)}
        if done.returncode:
            return {**row, "error": done.stderr.strip().splitlines()[-1:]}
        row["params"] = json.loads(report.read_text())["params"]
        for name, images in crops.items():
            pairs = zip(original[name], detections(out, images), strict=True)
            row[name] = float(np.mean([found_again(a, b) for a, b in pairs]))
    return row


if __name__ == "__main__":
    main()
