"""ONNX Runtime sessions for in-memory models of any size.

The one place a session is made from a `ModelProto`: a model under the protobuf limit is handed
to ONNX Runtime as bytes; a larger one cannot be serialized whole, so it is written with its
weights in external data to a temporary folder and opened by path. ONNX Runtime reads (or maps)
the external data while the session is created, so the folder is removed as soon as it is.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxprune.graph.load import too_large_for_protobuf, write_external

CPU = ("CPUExecutionProvider",)


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
