"""Input feature norms of the weight layers, for Wanda's score |W_ij|·‖X_j‖₂ (Sun et al. 2023).

X stacks a layer's input over every sample and every position: each token of a B×S×D transformer
activation is a row, and for a Conv each output position's input patch (zero padding reads as
zero). One ONNX Runtime pass with the layer inputs tapped, the next part run while the last one
is summed (calib/prefetch.py); float64 sums of squares per feature.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxprune.calib.prefetch import prefetched
from onnxprune.calib.stats import tap_runs, tapped_session
from onnxprune.graph.sparsify import WeightLayer


def collect_input_norms(
    model: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    batches: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """‖X_j‖₂ of every input feature j of every layer, in the shape of a weight row (in, …)."""
    names = sorted({layer.input for layer in layers})
    session, aliases = tapped_session(model, names)
    sums: dict[str, np.ndarray] = {}
    for _, values in prefetched(tap_runs(session, aliases, names, batches)):
        for layer in layers:
            part = squared_feature_sums(values[layer.input], layer)
            sums[layer.name] = sums[layer.name] + part if layer.name in sums else part
    return {name: np.sqrt(total) for name, total in sums.items()}


def squared_feature_sums(array: np.ndarray, layer: WeightLayer) -> np.ndarray:
    """Σ a_j² over samples and positions of each feature the weight multiplies: the last axis of
    a dense layer's input; for a Conv, each (in, kh, kw) patch entry read at every output
    position — the sum of x² over the strided window that entry slides through."""
    squares = np.asarray(array, dtype=np.float64) ** 2
    if layer.conv is None:
        return squares.reshape(-1, squares.shape[-1]).sum(axis=0)
    kernel, strides, pads, dilations = layer.conv
    padded = np.pad(squares, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    spans = [
        (padded.shape[2 + k] - dilations[k] * (kernel[k] - 1) - 1) // strides[k] + 1
        for k in range(2)
    ]
    out = np.empty((squares.shape[1], *kernel))
    for dy, dx in np.ndindex(*kernel):
        y, x = dy * dilations[0], dx * dilations[1]
        window = padded[
            :,
            :,
            y : y + strides[0] * (spans[0] - 1) + 1 : strides[0],
            x : x + strides[1] * (spans[1] - 1) + 1 : strides[1],
        ]
        out[:, dy, dx] = window.sum(axis=(0, 2, 3))
    return out
