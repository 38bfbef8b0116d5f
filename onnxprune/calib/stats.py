"""Streamed activation statistics at the taps, through ONNX Runtime (DESIGN.md §4).

Only the tap tensors are added as graph outputs (exposing every conv output blocks ORT's fusions).
Per batch and tap, the channels are laid out as rows = samples × positions and accumulated in
float64 into n, Σa, Σ|a| and the Gram Σ aaᵀ: memory O(channels²) whatever the number of samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxprune.graph.groups import Tap
from onnxprune.measure.verify import session_for
from onnxprune.methods.base import TapStats


class TapAccumulator:
    """Running n, Σa, Σ|a| and Σaaᵀ of one tap's channels."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.sum = np.zeros(channels)
        self.abs_sum = np.zeros(channels)
        self.gram = np.zeros((channels, channels))

    def add(self, rows: np.ndarray) -> None:
        rows = rows.astype(np.float64, copy=False)
        self.n += rows.shape[0]
        self.sum += rows.sum(axis=0)
        self.abs_sum += np.abs(rows).sum(axis=0)
        self.gram += rows.T @ rows

    def result(self) -> TapStats:
        return TapStats(self.n, self.sum.copy(), self.gram.copy(), self.abs_sum.copy())


def tap_rows(array: np.ndarray, tap: Tap, channels: int) -> np.ndarray:
    """The tap's channels of `array` as a (samples × positions, channels) matrix."""
    return channel_view(array, tap, channels).reshape(-1, channels)


def channel_view(array: np.ndarray, tap: Tap, channels: int) -> np.ndarray:
    """The tap's channels of `array` as (samples, positions, channels).

    Positions are every index other than the sample and channel axes, including the `spatial`
    features a flattened channel occupies.
    """
    moved = np.moveaxis(array, tap.axis, -1)
    total = moved.shape[-1] // tap.spatial
    moved = moved.reshape(*moved.shape[:-1], total, tap.spatial)
    moved = np.moveaxis(moved, -2, -1)[..., tap.offset : tap.offset + channels]
    return moved.reshape(moved.shape[0], -1, channels)


def collect(
    model: onnx.ModelProto,
    taps: Sequence[tuple[Tap, int]],
    batches: Iterable[Mapping[str, np.ndarray]],
) -> dict[Tap, TapStats]:
    """Run `batches` through `model` in ORT and return the statistics of every (tap, channels)."""
    if not taps:
        return {}
    names = sorted({tap.tensor for tap, _ in taps})
    session = session_for(with_outputs(model, names))
    accumulators = {tap: TapAccumulator(channels) for tap, channels in taps}
    for feeds in batches:
        values = dict(zip(names, session.run(names, dict(feeds)), strict=True))
        for (tap, channels), acc in zip(taps, accumulators.values(), strict=True):
            acc.add(tap_rows(values[tap.tensor], tap, channels))
    return {tap: acc.result() for tap, acc in accumulators.items()}


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs also include the tensors `names`."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    return model
