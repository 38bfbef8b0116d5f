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
class Product:
    """Per sample and channel, Σ over positions of x·∂L/∂y, with x and y at two taps.

    x = y gives the Taylor term a·∂L/∂a; x = σ's input and y = σ's output gives IPPRO's ∂L/∂D.
    """

    x: Tap
    y: Tap
    channels: int


@dataclass(frozen=True)
class GradStats:
    """Per-channel sums of one Product: Σ_samples (Σ_positions x·g)² and Σ x·g."""

    taylor: np.ndarray
    first_order: np.ndarray


@dataclass(frozen=True)
class Gradients:
    """What one gradient pass gathered: product sums, summed weight gradients, the loss used."""

    products: dict[Product, GradStats]
    weights: dict[str, np.ndarray]
    loss: str


def collect_gradients(
    model: onnx.ModelProto,
    products: Sequence[Product],
    batches: Iterable[Batch],
    *,
    weights: Sequence[str] = (),
    task: str = "auto",
    seed: int = 0,
) -> Gradients:
    """Sum, over all batches, the products' statistics and the gradients of `weights`."""
    graph, description = None, ""
    taylor = {p: np.zeros(p.channels) for p in products}
    first = {p: np.zeros(p.channels) for p in products}
    weight_grads: dict[str, np.ndarray] = {}
    names = sorted({tap.tensor for p in products for tap in (p.x, p.y)})
    for batch in batches:
        if graph is None:
            graph = checked_graph(model, batch)
        values = graph.run(batch.feeds, keep=names)
        output = values[graph.output_names[0]]
        description = loss_name(task, tuple(output.shape), batch.labels is not None)
        loss(task, output, batch.labels, seed=seed).backward()
        for p in products:
            product = values[p.x.tensor].detach().numpy() * _grad(values[p.y.tensor])
            per_sample = channel_view(product, p.x, p.channels).sum(axis=1)
            taylor[p] += (per_sample**2).sum(axis=0)
            first[p] += per_sample.sum(axis=0)
        for name in weights:
            weight_grads[name] = weight_grads.get(name, 0) + _grad(graph.params[name])
        for param in graph.parameters():
            param.grad = None
    stats = {p: GradStats(taylor[p], first[p]) for p in products}
    return Gradients(stats, weight_grads, description)


def checked_graph(model: onnx.ModelProto, batch: Batch):
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
