"""Gradient statistics at the taps, through the in-package ONNX→torch interpreter (DESIGN.md §5).

The interpreter is first checked against ONNX Runtime on the first batch; if it lacks an op or
disagrees, gradient-based methods refuse with that reason while data-only methods still work.
Per tap and channel we accumulate the Taylor importance Σ_samples (Σ_positions a·∂L/∂a)²
(Molchanov et al., 2019) and the plain first-order sum Σ a·∂L/∂a.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.calib.data import Batch
from onnxprune.calib.losses import loss, loss_name
from onnxprune.calib.stats import channel_view
from onnxprune.errors import OnnxPruneError, UsageError
from onnxprune.graph.groups import Tap


@dataclass(frozen=True)
class GradStats:
    """Per-channel gradient sums of one tap."""

    taylor: np.ndarray
    first_order: np.ndarray


def collect_gradients(
    model: onnx.ModelProto,
    taps: Sequence[tuple[Tap, int]],
    batches: Iterable[Batch],
    *,
    task: str = "auto",
    seed: int = 0,
) -> tuple[dict[Tap, GradStats], str]:
    """Taylor statistics of every (tap, channels) and the name of the loss used."""
    graph, description = None, ""
    taylor = {tap: np.zeros(channels) for tap, channels in taps}
    first = {tap: np.zeros(channels) for tap, channels in taps}
    names = sorted({tap.tensor for tap, _ in taps})
    for batch in batches:
        if graph is None:
            graph = _checked_graph(model, batch)
        values = graph.run(batch.feeds, keep=names)
        output = values[graph.output_names[0]]
        description = loss_name(task, tuple(output.shape), batch.labels is not None)
        loss(task, output, batch.labels, seed=seed).backward()
        for tap, channels in taps:
            tensor = values[tap.tensor]
            product = tensor.detach().numpy() * _grad(tensor)
            per_sample = channel_view(product, tap, channels).sum(axis=1)
            taylor[tap] += (per_sample**2).sum(axis=0)
            first[tap] += per_sample.sum(axis=0)
        for param in graph.parameters():
            param.grad = None
    return {t: GradStats(taylor[t], first[t]) for t, _ in taps}, description


def _checked_graph(model: onnx.ModelProto, batch: Batch):
    try:
        from onnxprune.calib.torch_exec import check_against_ort, torch_available
    except ImportError as exc:
        raise UsageError(
            "gradient-based methods need torch", hint="pip install 'onnxprune[torch]'"
        ) from exc
    if not torch_available():
        raise UsageError("gradient-based methods need torch", hint="pip install 'onnxprune[torch]'")
    try:
        return check_against_ort(model, batch.feeds)
    except OnnxPruneError as exc:
        raise type(exc)(
            f"gradients unavailable for this model: {exc}",
            hint="data-only methods (magnitude, id, activation, fpgm) still work",
        ) from exc


def _grad(tensor) -> np.ndarray:
    if tensor.grad is None:
        return np.zeros(tuple(tensor.shape), dtype=np.float32)
    return tensor.grad.numpy()
