"""Process CPU seconds of `id` on the digits models with and without an option, interleaved.

Each round prunes every (model, reduction) once per variant, in turn, so that load drifts hit
all variants alike; the medians over rounds go beside the raw seconds into the JSON.

    OMP_NUM_THREADS=1 python benchmarks/option_cost.py --cells resnet@0.5,mobilenetv2@0.5 \\
        --variants '{"default": {}, "--cv-widths": {"cv_widths": true}}' --rounds 3 --out cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from benchmarks.defaults import splits

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="resnet@0.5,mobilenetv2@0.5", help="MODEL@REDUCTION,…")
    parser.add_argument("--variants", default='{"default": {}}', help="JSON: label → options")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    variants = json.loads(args.variants)
    cells = [(name, float(r)) for name, r in (c.split("@") for c in args.cells.split(","))]
    inputs = {name: (onnx.load(ROOT / "models" / f"{name}.onnx"), splits(name)[0])
              for name in dict.fromkeys(name for name, _ in cells)}  # fmt: skip
    seconds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, reduction in cells:
            model, fit = inputs[name]
            for label, options in variants.items():
                start = time.process_time()
                onnxprune.prune(model, method="id", target_macs=1 - reduction, data=fit,
                                verify=False, **options)  # fmt: skip
                seconds.setdefault(f"{name} @ {reduction} {label}", []).append(
                    time.process_time() - start
                )
                print(
                    name, reduction, label, round(seconds[f"{name} @ {reduction} {label}"][-1], 2)
                )
    out = {
        "meta": {
            "what": "process CPU seconds of onnxprune.prune(models/NAME.onnx, method='id', "
            "target_macs=1-R, data=<defaults.py fit split>, verify=False, **variant), "
            f"variants interleaved, {args.rounds} rounds",
            "load_average": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "cpu_seconds": seconds,
        "median": {key: float(np.median(v)) for key, v in seconds.items()},
    }
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
