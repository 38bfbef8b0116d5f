"""Checks on the committed reference models in ``models/`` (no retraining)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
MANIFEST = json.loads((MODELS_DIR / "manifest.json").read_text())
ENTRIES: dict[str, dict] = MANIFEST["models"]
EXPECTED = {
    *("mlp", "vgg", "resnet", "mobilenetv2", "inception", "senet", "tsra_vgg", "relu_vgg"),
    *("crnn", "crnn_gru", "vit", "bilstm"),
}
EXPORTERS = {"onnx": "test_accuracy_pct", "onnx_dynamo": "test_accuracy_pct_dynamo"}
CLASSIFIERS = sorted(name for name, entry in ENTRIES.items() if "metric" not in entry)
CASES = [(name, key) for name in CLASSIFIERS for key in EXPORTERS if ENTRIES[name][key]]
SPLITS = ["digits32", "digits64"]


def load_split(file_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of one committed npz split."""
    with np.load(MODELS_DIR / file_name) as data:
        return data["input"], data["labels"]


def predict(path: Path, x: np.ndarray, dynamic: bool) -> np.ndarray:
    """Logits from ONNX Runtime on CPU; static-batch models are fed one row at a time."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if dynamic:
        return session.run(["logits"], {"input": x})[0]
    return np.concatenate([session.run(["logits"], {"input": row[None]})[0] for row in x])


def test_manifest_lists_every_model() -> None:
    assert set(ENTRIES) == EXPECTED


@pytest.mark.parametrize(("name", "key"), CASES)
def test_model_file_is_valid_and_small(name: str, key: str) -> None:
    path = MODELS_DIR / ENTRIES[name][key]
    assert path.stat().st_size < 2 * 1024 * 1024
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert not [t.name for t in graph.initializer if t.data_location], "external data"
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["logits"]


@pytest.mark.parametrize(("name", "key"), CASES)
def test_model_reproduces_manifest_accuracy(name: str, key: str) -> None:
    entry = ENTRIES[name]
    x, labels = load_split(entry["test"])
    assert list(x.shape[1:]) == entry["input_shape"][1:]
    dynamic = key == "onnx" or entry["dynamo_dynamic_batch"]
    logits = predict(MODELS_DIR / entry[key], x, dynamic)
    assert logits.shape == (len(x), 10)
    acc = 100.0 * float((logits.argmax(1) == labels).mean())
    assert acc == pytest.approx(entry[EXPORTERS[key]], abs=0.2)


@pytest.mark.parametrize("prefix", SPLITS)
def test_splits_have_expected_layout(prefix: str) -> None:
    for kind, size in (("calib", 512), ("test", 540)):
        x, labels = load_split(f"{prefix}_{kind}.npz")
        assert x.dtype == np.float32 and labels.dtype == np.int64
        assert len(x) == len(labels) == size
        assert set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize("prefix", SPLITS)
def test_calibration_and_test_are_disjoint(prefix: str) -> None:
    calib, _ = load_split(f"{prefix}_calib.npz")
    test, _ = load_split(f"{prefix}_test.npz")
    calib_rows = {row.tobytes() for row in calib.reshape(len(calib), -1)}
    test_rows = {row.tobytes() for row in test.reshape(len(test), -1)}
    assert not calib_rows & test_rows


@pytest.mark.parametrize("key", ["onnx", "onnx_dynamo"])
@pytest.mark.parametrize("name", ["crnn", "crnn_gru"])
def test_crnn_reproduces_manifest_string_accuracy(name: str, key: str) -> None:
    from models.crnn import string_accuracy

    entry = ENTRIES[name]
    x, labels = load_split(entry["test"])
    logits = predict(MODELS_DIR / entry[key], x, True)
    assert logits.shape == (20, len(x), 11)
    suffix = "" if key == "onnx" else "_dynamo"
    assert string_accuracy(logits, labels) == pytest.approx(
        entry[f"test_string_accuracy_pct{suffix}"], abs=0.2
    )


def test_crnn_strings_use_disjoint_digits() -> None:
    """Calibration strings come from calibration digits, test strings from test digits."""
    calib, _ = load_split("strings_calib.npz")
    test, _ = load_split("strings_test.npz")

    def glyphs(x: np.ndarray) -> set[bytes]:
        return {x[i, 0, :, k : k + 8].tobytes() for i in range(len(x)) for k in (0, 8, 16)}

    assert not glyphs(calib) & glyphs(test)
