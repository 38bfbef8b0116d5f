"""ONNX Runtime sessions for in-memory models of any size.

The one place a session is made from a `ModelProto`: a model under the protobuf limit is handed
to ONNX Runtime as bytes; a larger one cannot be serialized whole, so it is written with its
weights in external data to a temporary folder and opened by path. ONNX Runtime reads (or maps)
the external data while the session is created, so the folder is removed as soon as it is.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxprune.graph.load import too_large_for_protobuf, write_external

CPU = ("CPUExecutionProvider",)
THREADS_ENV = "ONNXPRUNE_ORT_THREADS"  # set in parallel sweep workers: cores // workers


def inference_session(
    model: onnx.ModelProto,
    options: ort.SessionOptions | None = None,
    providers: Sequence[str] = CPU,
) -> ort.InferenceSession:
    """An ORT session for `model`, from bytes when it fits one protobuf, else through a
    temporary file with external data (ORT's own exceptions pass through)."""
    if not too_large_for_protobuf(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))
    with tempfile.TemporaryDirectory(prefix="onnxprune-session-") as folder:
        path = Path(folder) / "model.onnx"
        write_external(model, path)
        return ort.InferenceSession(str(path), options, providers=list(providers))


def default_threads() -> int:
    """Intra-op threads for sessions whose caller does not choose: `$ONNXPRUNE_ORT_THREADS`
    (parallel workers set it so that N processes share the cores), else 0 (ORT's default)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    return int(value) if value.isdigit() else 0
