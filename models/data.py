"""Scikit-learn digits, split and normalised once so every model sees identical data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
N_TEST = 540
N_CALIB = 512
SIZE = 32


@dataclass(frozen=True)
class Split:
    """Inputs (float32) and labels (int64) of one subset."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class Digits:
    """Train/calibration/test subsets of one input layout, plus the normalisation used."""

    train: Split
    calib: Split
    test: Split
    mean: float
    std: float


def _indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/test indices and a calibration subset drawn from train only."""
    all_idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        all_idx, test_size=N_TEST, stratify=labels, random_state=SEED
    )
    calib_idx, _ = train_test_split(
        train_idx, train_size=N_CALIB, stratify=labels[train_idx], random_state=SEED
    )
    return np.sort(train_idx), np.sort(calib_idx), np.sort(test_idx)


def upsample(x64: np.ndarray) -> np.ndarray:
    """(N, 64) flat 8x8 images -> (N, 1, 32, 32) via bilinear interpolation."""
    images = torch.from_numpy(x64).reshape(-1, 1, 8, 8)
    big = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return big.numpy().astype(np.float32)


def load(flat: bool) -> Digits:
    """Digits as (N, 64) when ``flat`` else (N, 1, 32, 32), normalised by train mean/std."""
    pixels, labels = load_digits(return_X_y=True)
    pixels = (pixels / 16.0).astype(np.float32)
    labels = labels.astype(np.int64)
    train_idx, calib_idx, test_idx = _indices(labels)
    mean = float(pixels[train_idx].mean())
    std = float(pixels[train_idx].std())
    x = ((pixels - mean) / std).astype(np.float32)
    if not flat:
        x = upsample(x)
    return Digits(
        train=Split(x[train_idx], labels[train_idx]),
        calib=Split(x[calib_idx], labels[calib_idx]),
        test=Split(x[test_idx], labels[test_idx]),
        mean=mean,
        std=std,
    )
