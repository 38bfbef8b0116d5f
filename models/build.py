"""Train the reference models on digits and export them to ONNX (``python -m models.build``).

Every model is trained with fixed seeds, exported with both the legacy TorchScript exporter
and the dynamo exporter, checked against torch in ONNX Runtime, and recorded in
``models/manifest.json`` together with the calibration/test splits.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from models import archs, crnn
from models.data import SEED, Digits, Split, load

OUT_DIR = Path(__file__).resolve().parent
MANIFEST = OUT_DIR / "manifest.json"
BATCH = 64
MAX_SHIFT = 3  # pixels of random translation at 32x32 (under one original 8x8 pixel)
TOLERANCE = 1e-4
MAX_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class Spec:
    """How to build and train one model."""

    factory: Callable[[], nn.Module]
    flat: bool
    epochs: int
    lr: float = 2e-3


SPECS: dict[str, Spec] = {
    "mlp": Spec(archs.MLP, flat=True, epochs=60),
    "vgg": Spec(archs.VGG, flat=False, epochs=15),
    "resnet": Spec(archs.ResNet, flat=False, epochs=12),
    "mobilenetv2": Spec(archs.MobileNetV2, flat=False, epochs=15),
    "inception": Spec(archs.Inception, flat=False, epochs=15),
    "senet": Spec(archs.SENet, flat=False, epochs=15),
    "vit": Spec(archs.ViT, flat=False, epochs=50, lr=1e-3),
    "bilstm": Spec(archs.BiLSTM, flat=False, epochs=30),
}


def seed_everything(seed: int) -> None:
    """Fix all RNGs so a rebuild reproduces the same weights on the same machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def random_shift(x: torch.Tensor, background: float, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to MAX_SHIFT pixels, filling with the background value."""
    size = x.shape[-1]
    padded = F.pad(x, (MAX_SHIFT,) * 4, value=background)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (len(x), 2), generator=gen).tolist()
    crops = [padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)]
    return torch.stack(crops)


def train(model: nn.Module, data: Digits, spec: Spec) -> nn.Module:
    """Adam + cosine schedule, batch 64; image models get random-shift augmentation."""
    gen = torch.Generator().manual_seed(SEED)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    background = -data.mean / data.std
    steps = spec.epochs * -(-len(x) // BATCH)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(spec.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(BATCH):
            xb = x[idx] if spec.flat else random_shift(x[idx], background, gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def export_legacy(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    batch_axis: int = 0,
    *,
    keep_batchnorm: bool = False,
) -> None:
    """TorchScript exporter, opset 17, dynamic batch (BatchNorm gets folded into Conv unless
    `keep_batchnorm`); `batch_axis` is the batch axis of the output (1 for time-major sequence
    outputs)."""
    keep = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter is deliberate
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            **(keep if keep_batchnorm else {}),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {batch_axis: "batch"}},
        )


def export_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> bool:
    """Default dynamo exporter with embedded weights; returns whether batch is dynamic."""
    common = {
        "input_names": ["input"],
        "output_names": ["logits"],
        "external_data": False,
        "verbose": False,
    }
    try:
        dims = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dims, **common)
        dynamic = True
    except Exception as err:  # any failure of the dynamic export: retry with a static batch
        print(f"  dynamic-batch dynamo export failed ({type(err).__name__}); using batch 1")
        program = torch.onnx.export(model, (example[:1],), dynamo=True, **common)
        dynamic = False
    program.save(str(path), external_data=False)
    return dynamic


def run_onnx(path: Path, x: np.ndarray, dynamic: bool, axis: int = 0) -> np.ndarray:
    """Logits from ONNX Runtime on CPU; a static-batch model is fed one row at a time (its
    outputs joined along the output's batch `axis`)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if dynamic:
        return session.run(["logits"], {"input": x})[0]
    rows = [session.run(["logits"], {"input": x[i : i + 1]})[0] for i in range(len(x))]
    return np.concatenate(rows, axis=axis)


def verify(
    path: Path, expected: np.ndarray, x: np.ndarray, dynamic: bool, axis: int = 0
) -> np.ndarray:
    """Check the file is valid, self-contained, small and matches torch; return its logits."""
    onnx.checker.check_model(str(path), full_check=True)
    external = [t.name for t in onnx.load(str(path)).graph.initializer if t.data_location]
    if external:
        raise RuntimeError(f"{path.name}: external initializers {external[:3]}")
    if path.stat().st_size >= MAX_BYTES:
        raise RuntimeError(f"{path.name}: {path.stat().st_size} bytes exceeds 2 MB")
    logits = run_onnx(path, x, dynamic, axis)
    diff = float(np.abs(logits - expected).max())
    if diff >= TOLERANCE:
        raise RuntimeError(f"{path.name}: max abs diff vs torch {diff:.2e} >= {TOLERANCE}")
    return logits


def default_opset(path: Path) -> int:
    """Version of the default ("ai.onnx") operator set a model imports."""
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent, rounded to two decimals."""
    return round(100.0 * float((logits.argmax(1) == labels).mean()), 2)


def split_names(flat: bool) -> tuple[str, str]:
    """Calibration and test npz file names for an input layout."""
    prefix = "digits64" if flat else "digits32"
    return f"{prefix}_calib.npz", f"{prefix}_test.npz"


def save_splits(data: Digits, flat: bool) -> None:
    """Write the calibration and test splits as npz with keys ``input`` and ``labels``."""
    for name, split in zip(split_names(flat), (data.calib, data.test), strict=True):
        np.savez(OUT_DIR / name, input=split.x, labels=split.y)


def build_one(name: str, spec: Spec, data: Digits) -> dict:
    """Train, export (both exporters), verify and describe one model."""
    start = time.perf_counter()
    seed_everything(SEED)
    model = train(spec.factory(), data, spec)
    test: Split = data.test
    x = torch.from_numpy(test.x)
    with torch.no_grad():
        expected = model(x).numpy()
    legacy, dynamo = OUT_DIR / f"{name}.onnx", OUT_DIR / f"{name}.dynamo.onnx"
    export_legacy(model, x[:2], legacy)
    dynamic = export_dynamo(model, x[:2], dynamo)
    acc = accuracy(verify(legacy, expected, test.x, True), test.y)
    acc_dynamo = accuracy(verify(dynamo, expected, test.x, dynamic), test.y)
    calib, test_name = split_names(spec.flat)
    entry = {
        "onnx": legacy.name,
        "onnx_dynamo": dynamo.name,
        "dynamo_dynamic_batch": dynamic,
        "dynamo_opset": default_opset(dynamo),
        "input_shape": ["batch", *test.x.shape[1:]],
        "calib": calib,
        "test": test_name,
        "test_accuracy_pct": acc,
        "test_accuracy_pct_dynamo": acc_dynamo,
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(
        f"{name:12s} acc {acc:6.2f}% (dynamo {acc_dynamo:6.2f}%)  params {entry['params']:>7d}"
        f"  {time.perf_counter() - start:5.1f}s"
    )
    return entry


def write_manifest(entries: dict[str, dict], data: dict[bool, Digits]) -> None:
    """Merge new entries into manifest.json (keeps models not rebuilt this run)."""
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {"models": {}}
    any_split = next(iter(data.values()))
    manifest["dataset"] = {
        "source": "sklearn.datasets.load_digits",
        "split_seed": SEED,
        "n_train": len(any_split.train.y),
        "n_calib": len(any_split.calib.y),
        "n_test": len(any_split.test.y),
        "normalisation": "x / 16, then (x - mean) / std with train mean/std",
        "mean": any_split.mean,
        "std": any_split.std,
    }
    manifest["models"].update(entries)
    manifest["models"] = dict(sorted(manifest["models"].items()))
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Build all models, or only those named with ``--only``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = [*sorted(SPECS), *crnn.CELLS]
    parser.add_argument("--only", nargs="+", choices=choices, help="models to rebuild")
    names = parser.parse_args(argv).only or choices
    start = time.perf_counter()
    data = {flat: load(flat) for flat in {SPECS[n].flat for n in names if n in SPECS} or {True}}
    for flat, digits in data.items():
        save_splits(digits, flat)
    entries = {
        name: build_one(name, SPECS[name], data[SPECS[name].flat])
        for name in names
        if name in SPECS
    }
    for name in (n for n in names if n in crnn.CELLS):
        entries[name] = crnn.build(OUT_DIR, name)
    write_manifest(entries, data)
    print(f"built {len(entries)} model(s) in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
