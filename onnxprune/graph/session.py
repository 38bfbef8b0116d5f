"""ONNX Runtime sessions for in-memory models of any size.

The one place a session is made from a `ModelProto`. A small model is handed to ONNX Runtime as
bytes. A model with more than FILE_BYTES of weights, or weights mapped from
their files (graph/external.py), is written to a temporary folder with its
weights in external data and opened by path: ONNX Runtime maps the aligned external data instead
of parsing a serialized copy, which on ResNet-50 (97 MB of weights) took the session from 1.9 s
and +377 MB of memory to 0.8 s and +164 MB; and past protobuf's 2 GB limit bytes are no option
at all. ONNX Runtime reads (or maps) the external data while the session is created, so the
folder is removed as soon as it is.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxprune.graph.external import has_mapped
from onnxprune.graph.load import copy_model, model_bytes, too_large_for_protobuf, write_external

CPU = ("CPUExecutionProvider",)
THREADS_ENV = "ONNXPRUNE_ORT_THREADS"  # set in parallel sweep workers: cores // workers
FILE_BYTES = 16 << 20  # weights above this: the session is made from a file (see above)

Edit = Callable[[onnx.ModelProto], None]


def inference_session(
    model: onnx.ModelProto,
    options: ort.SessionOptions | None = None,
    providers: Sequence[str] = CPU,
    *,
    edit: Edit | None = None,
    disabled: Sequence[str] = (),
) -> ort.InferenceSession:
    """An ORT session for `model`, from bytes when it is small, else from a temporary file with
    external data (ORT's own exceptions pass through). `edit`, if given, changes in place the
    copy the session is made from (its graph, not its weights: it may see them external), so
    that `model` stays as it was and its weights are not copied to add, say, outputs.
    `disabled`: ONNX Runtime graph optimizers (by name) the session runs without."""
    extra = {"disabled_optimizers": list(disabled)} if disabled else {}
    if model_bytes(model) <= FILE_BYTES and not _needs_file(model):
        if edit is not None:
            model = copy_model(model)
            edit(model)
        return ort.InferenceSession(
            model.SerializeToString(), options, providers=list(providers), **extra
        )
    with tempfile.TemporaryDirectory(prefix="onnxprune-session-") as folder:
        path = Path(folder) / "model.onnx"
        write_external(model, path)
        if edit is not None:
            skeleton = onnx.load(str(path), load_external_data=False)
            edit(skeleton)
            onnx.save_model(skeleton, str(path))
        return ort.InferenceSession(str(path), options, providers=list(providers), **extra)


def _needs_file(model: onnx.ModelProto) -> bool:
    """Past the protobuf limit, or with weights mapped from their files (ONNX Runtime refuses
    the absolute locations: the file written copies them)."""
    return too_large_for_protobuf(model) or has_mapped(model)


def default_threads() -> int:
    """Intra-op threads for sessions whose caller does not choose: `$ONNXPRUNE_ORT_THREADS`
    (parallel workers set it so that N processes share the cores), else 0 (ORT's default)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    return int(value) if value.isdigit() else 0
