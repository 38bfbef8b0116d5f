"""Which calibration rows count: a graph input marking the real tokens (an attention mask).

A batch of sentences padded to one length has padding tokens whose states the model's users never
read (mean pooling over the attention mask, a classifier on the first token); fitted with them,
the Grams and means of every token tap describe padding too (60 % of MiniLM's calibration
tokens). With a row mask, a tap whose rows are the (samples, positions) of the mask keeps only
the rows whose entry is nonzero, so its statistics are those of the unpadded tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnxprune.errors import UsageError

AUTO = "auto"
MASK_NAME = "attention_mask"  # the input name transformers' exports give the padding mask
_INTEGER_OR_BOOL = {
    onnx.TensorProto.BOOL,
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
}


def row_mask_input(model: onnx.ModelProto, requested: str | None) -> str | None:
    """The graph input to mask rows by: `requested` itself (it must be a 2-D input), or for
    "auto" the integer or bool 2-D input named attention_mask when there is one (else none)."""
    inputs = {i.name: i for i in model.graph.input}
    if requested is None:
        return None
    if requested == AUTO:
        found = inputs.get(MASK_NAME)
        if found is None or found.type.tensor_type.elem_type not in _INTEGER_OR_BOOL:
            return None
        return MASK_NAME if _rank(found) == 2 else None
    if requested not in inputs:
        raise UsageError(
            f"--row-mask '{requested}' is not an input of the model",
            hint=f"inputs: {', '.join(inputs)}",
        )
    if _rank(inputs[requested]) not in (2, None):
        raise UsageError(f"--row-mask '{requested}' must be a 2-D (samples, positions) input")
    return requested


def row_keep(
    view: np.ndarray, feeds: Mapping[str, np.ndarray], row_mask: str | None
) -> np.ndarray | None:
    """Which rows of a (samples, positions, channels) `view` count, one bool per row: those
    whose entry of the graph input `row_mask` (samples, positions) is nonzero. None (every
    row) without a mask or where the view's first two axes are not the mask's (a tap that is
    not one row per token)."""
    mask = feeds.get(row_mask) if row_mask else None
    if mask is None or view.shape[:2] != mask.shape:
        return None
    return (np.asarray(mask) != 0).reshape(-1)


def _rank(info: onnx.ValueInfoProto) -> int | None:
    tensor = info.type.tensor_type
    return len(tensor.shape.dim) if tensor.HasField("shape") else None
