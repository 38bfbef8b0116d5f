"""Quantize a (pruned) model with ONNX Runtime's quantization tool, on the calibration data.

ONNX Runtime's `quantize_static` / `quantize_dynamic` and its float16 converter are maintained
with the engine that runs the result, so the operator coverage and the QDQ patterns its CPU
kernels fuse stay in step with the runtime; this module only chooses their settings and feeds
them the calibration data the pruning already read.

Modes:
- ``int8``: static QDQ, per-channel int8 weights, uint8 activations calibrated (MinMax) on the
  data. For convolutional models.
- ``int8-dynamic``: int8 weights of MatMul/Gemm (and recurrent/attention ops), activations
  quantized at run time. For Gemm/MatMul-heavy models; needs no data.
- ``fp16``: weights and compute in float16, graph inputs and outputs kept float32.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from onnxprune.errors import OnnxPruneError, UsageError, first_line

if TYPE_CHECKING:  # the modes are read by the CLI parsers, which must start without onnx
    import onnx

    from onnxprune.calib.data import Dataset

MODES = ("int8", "int8-dynamic", "fp16")
DYNAMIC_OPS = ("MatMul", "Gemm", "LSTM", "GRU", "Attention")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def quantize(
    model: onnx.ModelProto,
    mode: str,
    *,
    data: Dataset | None = None,
    exclude: Sequence[str] = (),
    float_ends: bool = False,
    batch_size: int = 32,
) -> onnx.ModelProto:
    """`model` quantized in `mode`; nodes whose name matches a regex in `exclude` stay float,
    and with `float_ends` the first and last weighted layers too (`end_layers`).

    ``int8`` calibrates activation ranges on `data` (required) in batches of `batch_size` (the
    caller's: a model with a fixed batch takes only that); the other modes ignore it. The
    Squeeze that graph/unbatched.py adds for an input without a sample axis stays float.
    """
    if mode not in MODES:
        raise UsageError(f"unknown quantization '{mode}'; choose from {', '.join(MODES)}")
    excluded = excluded_nodes(model, exclude)
    if float_ends:
        excluded = list(dict.fromkeys(excluded + end_layers(model)))
    if mode == "fp16":
        return _float16(model, excluded)
    if mode == "int8" and (data is None or len(data) == 0):
        raise UsageError("--quantize int8 calibrates activation ranges: give --data")
    import onnx
    import onnxruntime as ort

    from onnxprune.graph.load import save_model

    ort.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory(prefix="onnxprune-quant-") as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "quantized.onnx"
        save_model(model, source)
        try:
            if mode == "int8":
                _static(source, target, data, [*excluded, *_marks(model)], batch_size)
            else:
                _dynamic(source, target, excluded)
        except Exception as exc:  # the quantizer raises many unrelated types
            message = f"ONNX Runtime's quantizer failed ({mode}): {first_line(exc)}"
            raise QuantizationError(message) from exc
        return onnx.load_model(target)


class QuantizationError(OnnxPruneError):
    """The quantizer could not quantize the model."""


def excluded_nodes(model: onnx.ModelProto, patterns: Sequence[str]) -> list[str]:
    """Names of the nodes matched (re.search) by any of `patterns`."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise UsageError(f"--quantize-exclude '{pattern}' is not a regex: {exc}") from exc
    return [n.name for n in model.graph.node if any(c.search(n.name) for c in compiled)]


def end_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the first and the last weighted layer (Conv, ConvTranspose, Gemm, MatMul) in
    the graph's node order: the layers quantization is said to hurt most (the input's raw values,
    the output's logits)."""
    weighted = [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS]
    return list(dict.fromkeys(weighted[:1] + weighted[-1:]))


def _static(source: Path, target: Path, data: Dataset, excluded: list[str], batch: int) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(_prepared(source)),
        str(target),
        _Reader(data, batch),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
    )


def _marks(model: onnx.ModelProto) -> list[str]:
    """The Squeezes `with_sample_axis` added (removed again after quantization)."""
    from onnxprune.graph.unbatched import MARK

    return [n.name for n in model.graph.node if n.op_type == "Squeeze" and n.name.endswith(MARK)]


def _dynamic(source: Path, target: Path, excluded: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(_prepared(source)),
        str(target),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=list(DYNAMIC_OPS),
        nodes_to_exclude=excluded,
    )


def _prepared(source: Path) -> Path:
    """The pre-processing ORT's quantizer asks for (shape inference, basic graph optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = source.with_name("prepared.onnx")
    try:
        with _working_directory(source.parent):  # where it leaves a model it gave up on
            quant_pre_process(str(source), str(prepared))
    except Exception:  # noqa: BLE001 - its symbolic shape inference gives up on NMS, data-sized
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)  # outputs
    return prepared


@contextmanager
def _working_directory(folder: Path) -> Iterator[None]:
    """Run the block in `folder` (ONNX Runtime's symbolic shape inference writes the model it
    gave up on, sym_shape_infer_temp.onnx and its data, into the working directory)."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _float16(model: onnx.ModelProto, excluded: list[str]) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from onnxprune.graph.load import export

    try:
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=excluded)
    except Exception as exc:  # the converter raises many unrelated types
        raise QuantizationError(f"float16 conversion failed: {first_line(exc)}") from exc
    # the converter appends its input Casts at the end of the node list: ONNX wants them sorted
    graph = gs.import_onnx(half)
    graph.toposort()
    return export(graph)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a Dataset's batches."""

    def __init__(self, data: Dataset, batch_size: int):
        self._data, self._batch = data, batch_size
        self._it: Iterator | None = None

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = (b.feeds for b in self._data.batches(self._batch))
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None
