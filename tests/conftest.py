"""Shared fixtures: reference models, their data, and `assert_outputs_close` (real ORT, CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import graphs` from any test


def _reference_names() -> list[str]:
    """Models listed in the manifest plus any other `<name>.onnx` with a dynamo twin on disk."""
    manifest = MODELS / "manifest.json"
    names = set(json.loads(manifest.read_text())["models"]) if manifest.is_file() else set()
    for path in MODELS.glob("*.onnx"):
        stem = path.name[: -len(".onnx")]
        if "." not in stem and (MODELS / f"{stem}.dynamo.onnx").is_file():
            names.add(stem)
    return sorted(names)


def _engine_variant() -> None:
    """`ONNXPRUNE_TEST_ORT=disable_all|threads1` runs every ORT session of the suite (the
    library's too) without graph optimisations or on one thread, to shake out tests that depend
    on one kernel path. The engine stays real: only its session options change."""
    variant = os.environ.get("ONNXPRUNE_TEST_ORT")
    if not variant:
        return
    if variant not in ("disable_all", "threads1"):
        raise ValueError(f"ONNXPRUNE_TEST_ORT={variant!r}: expected disable_all or threads1")
    original = ort.InferenceSession.__init__

    def init(self, path_or_bytes, sess_options=None, *args, **kwargs):
        options = sess_options or ort.SessionOptions()
        if variant == "disable_all":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        else:
            options.intra_op_num_threads = options.inter_op_num_threads = 1
        original(self, path_or_bytes, options, *args, **kwargs)

    ort.InferenceSession.__init__ = init


_engine_variant()
REFERENCE_NAMES = _reference_names()
EXPORTERS = ("onnx", "dynamo.onnx")
REFERENCE_MODELS = [
    (name, exp)
    for name in REFERENCE_NAMES
    for exp in EXPORTERS
    if (MODELS / f"{name}.{exp}").is_file()
]
REFERENCE_IDS = [f"{name}-{exp.split('.')[0]}" for name, exp in REFERENCE_MODELS]


def reference_path(name: str, exporter: str = "onnx") -> Path:
    return MODELS / f"{name}.{exporter}"


def data_path(name: str, split: str = "calib") -> Path:
    if name.startswith("crnn"):
        return MODELS / f"strings_{split}.npz"
    return MODELS / f"digits{64 if name == 'mlp' else 32}_{split}.npz"


def reference_feeds(name: str, n: int = 64, split: str = "calib") -> dict[str, np.ndarray]:
    """The first `n` samples of the model's data, keyed by its input name."""
    with np.load(data_path(name, split)) as data:
        return {"input": np.ascontiguousarray(data["input"][:n])}


def session(model: onnx.ModelProto | str | os.PathLike) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_model(
    model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """All outputs of `model` on `feeds` in ONNX Runtime (CPU), keyed by output name."""
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


def max_deviation(model_a, model_b, feeds: Mapping[str, np.ndarray]) -> float:
    """Largest absolute difference over all outputs (outputs must match by name and shape)."""
    out_a, out_b = run_model(model_a, feeds), run_model(model_b, feeds)
    assert out_a.keys() == out_b.keys(), f"output names differ: {out_a.keys()} vs {out_b.keys()}"
    worst = 0.0
    for name, a in out_a.items():
        assert a.shape == out_b[name].shape, f"output '{name}': {a.shape} vs {out_b[name].shape}"
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - out_b[name]), initial=0)))
    return worst


def assert_outputs_close(
    model_a, model_b, feeds: Mapping[str, np.ndarray], atol: float = 1e-5, rtol: float = 0.0
) -> None:
    """Run both models in ORT CPU on `feeds`; every output must satisfy
    |a − b| ≤ atol·max(1, max|a|) + rtol·|a|.

    `atol` is relative to the output's largest magnitude (float32 kernels round differently on
    another CPU path, and their error grows with the values), never below its absolute value.
    Outputs must match by name and shape.
    """
    out_a, out_b = run_model(model_a, feeds), run_model(model_b, feeds)
    assert out_a.keys() == out_b.keys(), f"output names differ: {out_a.keys()} vs {out_b.keys()}"
    for name, a in out_a.items():
        b = out_b[name]
        assert a.shape == b.shape, f"output '{name}': {a.shape} vs {b.shape}"
        scale = max(1.0, float(np.abs(a).max(initial=0.0)))
        np.testing.assert_allclose(b, a, atol=atol * scale, rtol=rtol, err_msg=f"output '{name}'")


def file_hash(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def copy_model(tmp_path):
    """Copy a reference model into tmp_path (so default output paths land there)."""

    def copy(name: str, exporter: str = "onnx") -> Path:
        dst = tmp_path / f"{name}.{exporter}"
        dst.write_bytes(reference_path(name, exporter).read_bytes())
        return dst

    return copy


@pytest.fixture
def save_tmp(tmp_path):
    """Save an in-memory model into tmp_path and return its path."""

    def save(model: onnx.ModelProto, name: str = "model.onnx") -> Path:
        path = tmp_path / name
        onnx.save_model(model, str(path))
        return path

    return save
