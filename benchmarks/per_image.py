"""Per-image deviations behind an aggregate rel-L2: which photos set it, on calibration and
held-out data.

The zoo checks report one rel-L2 over all photos, ‖Y' − Y‖ / ‖Y‖. Where a few photos' outputs are
orders of magnitude larger than the rest (a random-weight net whose activations blow up on some
inputs), that number measures those photos alone. Per model and CLI flag set this prunes once
and records, on the calibration and the held-out photos: the original's logit norm per photo,
the pruned model's logit norm and rel-L2 per photo, the aggregate rel-L2, the median of the
per-photo ones, and the share of ‖Y‖² held by the largest photo.

The model is a zoo export, or a small timm ConvMixer built here as the zoo builds its exports
(`--convmixer DIM,DEPTH`: kernel 9, patch 7, 224×224; timm installed with --no-deps):

    python benchmarks/per_image.py --model timm_convmixer_768_32 --out benchmarks/results/x.json
    python benchmarks/per_image.py --convmixer 256,32 --variants "--method id;--method magnitude"
    python benchmarks/per_image.py --model timm_dla34 --variants ""   # the original's norms only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from zoo import load_npz, run_model
from zoo_models import SEED, ZooSpec, export_legacy, import_torchvision, randomise_norms

CACHE = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", "/work/zoo_cache"))
VARIANTS = "--method magnitude;--method id"


def per_image(reference: np.ndarray, pruned: np.ndarray) -> dict[str, object]:
    """Aggregate and per-photo deviation of `pruned` from `reference` (photos × outputs). The
    share of ‖Y‖² held by the largest photo depends on the reference alone: `reference_norms`
    records it once per split."""
    ref, out = (v.reshape(len(v), -1).astype(np.float64) for v in (reference, pruned))
    ref_norm, out_norm = np.linalg.norm(ref, axis=1), np.linalg.norm(out, axis=1)
    rel = np.linalg.norm(out - ref, axis=1) / ref_norm
    return {
        "rel_l2": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        "median_rel_l2": float(np.median(rel)),
        "rel_l2_per_image": [round(float(v), 4) for v in rel],
        "norm_per_image": [round(float(v), 2) for v in out_norm],
    }


def reference_norms(reference: np.ndarray) -> dict[str, object]:
    """The original's logit norm per photo and the share of ‖Y‖² held by the largest."""
    norms = np.linalg.norm(reference.reshape(len(reference), -1).astype(np.float64), axis=1)
    return {
        "top_share": float(norms.max() ** 2 / (norms**2).sum()),
        "norm_per_image": [round(float(n), 2) for n in norms],
    }


def build_convmixer(dim: int, depth: int, path: Path, calib: np.ndarray) -> None:
    """timm's ConvMixer(dim, depth, kernel 9, patch 7) with the zoo's randomised norms, exported
    by the zoo's legacy exporter (opset 17, dynamic batch)."""
    import torch

    import_torchvision()
    from timm.models.convmixer import ConvMixer

    torch.manual_seed(SEED)
    model = ConvMixer(dim=dim, depth=depth, kernel_size=9, patch_size=7)
    model = randomise_norms(model, calib, SEED)
    spec = ZooSpec(path.stem, lambda: model, 224, source="timm")
    export_legacy(model, torch.from_numpy(calib[:2]), path, spec, True)


def measure(model: Path, calib_path: Path, held_path: Path, variants: list[list[str]]) -> dict:
    """The original's per-photo norms and, per flag set, the pruned model's deviations."""
    data = {"calib": load_npz(calib_path), "heldout": load_npz(held_path)}
    reference = {k: run_model(model, v)[0] for k, v in data.items()}
    row: dict[str, object] = {k: reference_norms(v) for k, v in reference.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for flags in variants:
            out = Path(tmp) / "pruned.onnx"
            cmd = [sys.executable, "-m", "onnxprune", str(model), "--data", str(calib_path)]
            start = time.perf_counter()
            proc = subprocess.run([*cmd, "-o", str(out), *flags], capture_output=True, text=True)
            entry: dict[str, object] = {"exit": proc.returncode}
            entry["prune_s"] = round(time.perf_counter() - start, 1)
            if proc.returncode == 0:
                for k, v in data.items():
                    entry[k] = per_image(reference[k], run_model(out, v)[0])
            row[" ".join(flags)] = entry
            print(" ".join(flags), json.dumps(entry)[:300], flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="zoo export name (in the zoo cache)")
    parser.add_argument("--convmixer", default="", help="DIM,DEPTH: build a small ConvMixer")
    parser.add_argument("--variants", default=VARIANTS, help="';'-separated CLI flag sets")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/per_image.json"))
    args = parser.parse_args()
    calib, held = CACHE / "calib_224.npz", CACHE / "heldout_224.npz"
    variants = [v.split() for v in args.variants.split(";") if v.strip()]  # "": the original only
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.convmixer:
            dim, depth = (int(v) for v in args.convmixer.split(","))
            name, model = f"convmixer_{dim}_{depth}", Path(tmp) / "convmixer.onnx"
            build_convmixer(dim, depth, model, load_npz(calib)["input"])
        else:
            name, model = args.model, CACHE / f"{args.model}.onnx"
        results[name] = {**results.get(name, {}), **measure(model, calib, held, variants)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
