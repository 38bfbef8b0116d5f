"""Test accuracy of the trained Keras exports before and after pruning through the CLI.

    python benchmarks/keras_accuracy.py [--cache DIR] [--out FILE]

The cache is `keras_models.py`'s (its digits models: the CNN, the recurrent classifier, the
ViT). Each dynamic-batch export is pruned by `onnxprune MODEL --method M --ratio R --data
calib_TAG.npz` (the default `--round-to 16`) for magnitude, magnitude `--recalibrate` and `id`
with its defaults at ratios 0.25 and 0.5, on the calibration split (the digits training split's
first images); accuracy is measured on the disjoint test split (`heldout_TAG.npz`, labels in
`heldout_TAG_labels.npy`), with the MAC cut from `zoo.py`'s independent counter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from keras_models import DEFAULT_CACHE
from zoo import independent_macs, load_npz, run_model

MODELS = {"digits_cnn": "digits", "digits_rnn": "digitrows", "digits_vit": "digits"}
RUNS = {"magnitude": [], "magnitude --recalibrate": ["--recalibrate"], "id": []}
RATIOS = (0.25, 0.5)


def main(argv: list[str] | None = None) -> None:
    """Measure every model present in the cache and write the rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="keras_models.py's folder.")
    parser.add_argument("--out", default="benchmarks/results/keras_accuracy.json")
    args = parser.parse_args(argv)
    cache, rows = Path(args.cache), []
    for name, tag in MODELS.items():
        path = cache / f"{name}.onnx"
        if not path.exists():
            continue
        test = load_npz(cache / f"heldout_{tag}.npz")
        labels = np.load(cache / f"heldout_{tag}_labels.npy")
        macs = independent_macs(onnx.load(path), test)
        rows.append({"model": name, "run": "original", **accuracy(path, test, labels, macs)})
        for run, flags in RUNS.items():
            for ratio in RATIOS:
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "pruned.onnx"
                    calib = cache / f"calib_{tag}.npz"
                    row = prune(path, run.split()[0], ratio, calib, flags, out)
                    if row["exit"] == 0:
                        row.update(accuracy(out, test, labels, macs))
                rows.append({"model": name, "run": f"{run} @{ratio}", **row})
                print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


def prune(path: Path, method: str, ratio: float, calib: Path, flags: list[str], out: Path) -> dict:
    """Prune through the CLI into `out`; its exit code, and the error's last line if any."""
    cmd = [sys.executable, "-m", "onnxprune", str(path), "--method", method, "--ratio",
           str(ratio), "--data", str(calib), "-o", str(out), *flags]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"exit": proc.returncode, "error": proc.stderr.strip().splitlines()[-1:]}
    return {"exit": 0}


def accuracy(path: Path, test: dict, labels: np.ndarray, macs: int) -> dict:
    """Top-1 accuracy on the test split and the MAC cut against the original's `macs`."""
    logits = run_model(path, test)[0]
    cut = 1 - independent_macs(onnx.load(path), test) / macs
    return {"accuracy": round(float((logits.argmax(1) == labels).mean()), 4),
            "mac_cut": round(cut, 4)}  # fmt: skip


if __name__ == "__main__":
    main()
