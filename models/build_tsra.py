"""Train the rotation-invariant TSRA VGG and its ReLU control (``python -m models.build_tsra``).

``tsra_vgg``: Conv(bias) -> RMSNorm -> TSRA stacks with AvgPool (models/tsra.py), trained as in
the CoB paper (AdamW lr 1e-3, weight decay 5e-4, linear warm-up then cosine, grad-norm clip 1.0)
and written to ONNX by our own writer (``models.tsra.to_onnx``: opset 18 + model-local
``onnxprune::TSRA`` / ``onnxprune::RMSNorm`` functions). ``relu_vgg``: ``archs.VGG`` (Conv -> BN ->
ReLU, MaxPool) trained for the same number of epochs with the reference-model recipe
(``build.train``: Adam + cosine) and exported with the legacy exporter (opset 17).

Both use the digits32 split, batch size and random-shift augmentation of ``models.build``, are
checked against torch in ONNX Runtime (1e-4) and merged into ``models/manifest.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from models import archs
from models.build import (
    BATCH,
    OUT_DIR,
    Spec,
    accuracy,
    default_opset,
    export_legacy,
    random_shift,
    seed_everything,
    split_names,
    train,
    verify,
    write_manifest,
)
from models.data import SEED, Digits, load
from models.tsra import TSRAVGG, to_onnx

EPOCHS = 10  # both models; the whole build is about 7 CPU-minutes
LR = 1e-3
WEIGHT_DECAY = 5e-4
CLIP = 1.0
WARMUP_STEPS = 20  # about one epoch (the paper: 1000 of 120k steps)
NAMES = ("tsra_vgg", "relu_vgg")


def warmup_cosine(step: int, total: int, warmup: int = WARMUP_STEPS) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_tsra(model: nn.Module, data: Digits, epochs: int = EPOCHS) -> nn.Module:
    """AdamW + warm-up/cosine + grad-norm clipping, batch 64, random-shift augmentation."""
    gen = torch.Generator().manual_seed(SEED)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    background = -data.mean / data.std
    steps = epochs * -(-len(x) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, steps))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(BATCH):
            loss = F.cross_entropy(model(random_shift(x[idx], background, gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            sched.step()
    return model.eval()


def build(name: str, data: Digits, epochs: int) -> dict:
    """Train, write, verify and describe one of the two models."""
    start = time.perf_counter()
    seed_everything(SEED)
    path: Path = OUT_DIR / f"{name}.onnx"
    x = torch.from_numpy(data.test.x)
    if name == "tsra_vgg":
        model = train_tsra(TSRAVGG(), data, epochs)
        train_s = time.perf_counter() - start
        onnx.save_model(to_onnx(model, input_shape=data.test.x.shape[1:]), str(path))
        exporter = "models.tsra.to_onnx (onnx.helper, model-local onnxprune functions)"
    else:
        model = train(archs.VGG(), data, Spec(archs.VGG, flat=False, epochs=epochs))
        train_s = time.perf_counter() - start
        export_legacy(model, x[:2], path)
        exporter = "torch.onnx.export (legacy, dynamo=False)"
    with torch.no_grad():
        expected = model(x).numpy()
    acc = accuracy(verify(path, expected, data.test.x, True), data.test.y)
    calib, test_name = split_names(False)
    entry = {
        "onnx": path.name,
        "onnx_dynamo": None,
        "dynamo_dynamic_batch": None,
        "dynamo_opset": None,
        "input_shape": ["batch", *data.test.x.shape[1:]],
        "calib": calib,
        "test": test_name,
        "test_accuracy_pct": acc,
        "test_accuracy_pct_dynamo": None,
        "params": sum(p.numel() for p in model.parameters()),
        "opset": default_opset(path),
        "exporter": exporter,
        "epochs": epochs,
    }
    print(
        f"{name:9s} acc {acc:6.2f}%  params {entry['params']:>7d}  train {train_s:5.1f}s"
        f"  total {time.perf_counter() - start:5.1f}s",
        flush=True,
    )
    return entry


def main(argv: list[str] | None = None) -> None:
    """Build both models (or those named with ``--only``) and merge them into the manifest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=NAMES, help="models to rebuild")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs (both)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data = load(flat=False)
    entries = {name: build(name, data, args.epochs) for name in args.only or NAMES}
    write_manifest(entries, {False: data})
    print(f"built {len(entries)} model(s) in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
