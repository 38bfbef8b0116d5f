"""A small CRNN text recogniser on rendered digit strings (``python -m models.crnn``).

"Rendered strings": 3 to 5 of scikit-learn's 8×8 digit images placed side by side on an 8×40
canvas (the rest is background), the label being the digit string. Conv feature extractor →
two-layer bidirectional LSTM (hidden 64; `crnn_gru`: GRU) → Linear → CTC (blank = class 0,
digit d = d + 1).
Strings for training are drawn afresh from the training digits every step; the calibration
and test strings are fixed and use only the calibration and test digits (disjoint images).
Output ``logits`` is (time, batch, 11), time-major as CTC and the LSTM read it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.data import SEED, Split, load

WIDTH = 40
DIGIT = 8
LENGTHS = (3, 5)
N_CALIB = 512
N_TEST = 1000
BLANK = 0
PAD = -1
STEPS = 1500
BATCH = 64
CALIB_NAME, TEST_NAME = "strings_calib.npz", "strings_test.npz"
CELLS = {"crnn": nn.LSTM, "crnn_gru": nn.GRU}
"""The recurrent layer of each model name."""


class CRNN(nn.Module):
    """Conv (8×40 → 64 features × 20 steps) → `cell` (bidirectional, 2 layers) →
    Linear(128, 11)."""

    def __init__(self, hidden: int = 64, classes: int = 11, cell: type = nn.LSTM) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d((2, 2)),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d((4, 1)),
        )
        self.lstm = cell(64, hidden, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x).squeeze(2).permute(2, 0, 1)  # (time, batch, 64)
        y, _ = self.lstm(y)
        return self.fc(y)


def render(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator):
    """`count` strings of 3–5 random digits from (N, 64) `images`: (count, 1, 8, 40) inputs
    and (count, 5) digit labels padded with -1."""
    background = float(images.min())
    x = np.full((count, 1, DIGIT, WIDTH), background, dtype=np.float32)
    y = np.full((count, LENGTHS[1]), PAD, dtype=np.int64)
    for i in range(count):
        picks = rng.integers(0, len(images), rng.integers(LENGTHS[0], LENGTHS[1] + 1))
        for k, j in enumerate(picks):
            x[i, 0, :, k * DIGIT : (k + 1) * DIGIT] = images[j].reshape(DIGIT, DIGIT)
            y[i, k] = labels[j]
    return x, y


def greedy_decode(logits: np.ndarray) -> list[tuple[int, ...]]:
    """Best path of (time, batch, classes) CTC scores: argmax, merge repeats, drop blanks."""
    best = logits.argmax(-1).T  # (batch, time)
    strings = []
    for path in best:
        merged = [c for t, c in enumerate(path) if c != BLANK and (t == 0 or c != path[t - 1])]
        strings.append(tuple(int(c) - 1 for c in merged))
    return strings


def string_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Percent of strings whose greedy decode equals the label exactly ((batch, 5), -1 pad)."""
    decoded = greedy_decode(logits)
    truth = [tuple(int(d) for d in row if d != PAD) for row in labels]
    return 100.0 * float(np.mean([d == t for d, t in zip(decoded, truth, strict=True)]))


def splits(seed: int = SEED) -> dict[str, Split]:
    """Fixed calibration and test strings (from the calibration and test digits)."""
    digits = load(flat=True)
    rng = np.random.default_rng(seed)
    calib = render(digits.calib.x, digits.calib.y, N_CALIB, rng)
    test = render(digits.test.x, digits.test.y, N_TEST, rng)
    return {CALIB_NAME: Split(*calib), TEST_NAME: Split(*test)}


def train(model: CRNN, steps: int = STEPS, seed: int = SEED) -> CRNN:
    """Adam + cosine schedule on fresh strings of training digits, CTC loss."""
    torch.set_num_threads(1)  # 2 threads on 2 shared cores ran 30x slower (spin-waiting)
    digits = load(flat=True)
    rng = np.random.default_rng(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        x, y = render(digits.train.x, digits.train.y, BATCH, rng)
        logits = model(torch.from_numpy(x))
        lengths = torch.from_numpy((y != PAD).sum(1))
        targets = torch.from_numpy(y[y != PAD] + 1)
        steps_in = torch.full((BATCH,), logits.shape[0], dtype=torch.long)
        loss = F.ctc_loss(logits.log_softmax(-1), targets, steps_in, lengths, blank=BLANK)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def build(out_dir: Path, name: str = "crnn") -> dict:
    """Train the model `name` (a key of CELLS), save the splits, export both ways, verify; the
    manifest entry."""
    from models import build as common

    start = time.perf_counter()
    common.seed_everything(SEED)
    torch.use_deterministic_algorithms(False)  # CTC loss has no deterministic CPU backward
    data = splits()
    for file_name, split in data.items():
        np.savez(out_dir / file_name, input=split.x, labels=split.y)
    model = train(CRNN(cell=CELLS[name]))
    test = data[TEST_NAME]
    with torch.no_grad():
        expected = model(torch.from_numpy(test.x)).numpy()
    legacy, dynamo = out_dir / f"{name}.onnx", out_dir / f"{name}.dynamo.onnx"
    common.export_legacy(model, torch.from_numpy(test.x[:2]), legacy, batch_axis=1)
    dynamic = common.export_dynamo(model, torch.from_numpy(test.x[:2]), dynamo)
    acc = string_accuracy(common.verify(legacy, expected, test.x, True, axis=1), test.y)
    logits = common.verify(dynamo, expected, test.x, dynamic, axis=1)
    entry = {
        "onnx": legacy.name,
        "onnx_dynamo": dynamo.name,
        "dynamo_dynamic_batch": dynamic,
        "dynamo_opset": common.default_opset(dynamo),
        "input_shape": ["batch", *test.x.shape[1:]],
        "output": "logits (time, batch, 11): CTC scores, class 0 = blank, digit d = d + 1",
        "metric": "string accuracy, greedy CTC decode (models.crnn.string_accuracy)",
        "calib": CALIB_NAME,
        "test": TEST_NAME,
        "test_string_accuracy_pct": round(acc, 2),
        "test_string_accuracy_pct_dynamo": round(string_accuracy(logits, test.y), 2),
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(f"{name} string acc {acc:6.2f}%  params {entry['params']}  "
          f"{time.perf_counter() - start:5.1f}s")  # fmt: skip
    return entry
