"""Torch modules holding the weights of a BatchNorm-folded ONNX export, without retraining.

The legacy exporter folds every BatchNorm into the Conv before it, so an ONNX file holds only
the folded filters W and biases b. `from_onnx` loads them into a freshly built torch module of
the same architecture (Conv/Gemm initializers mapped onto the Conv2d/Linear modules in
execution order, shapes checked) and sets each BatchNorm that follows a bias-free conv to the
identity on that conv's output: with μ, σ² the per-channel mean and variance of the conv output
(without bias) on calibration inputs, running_mean = μ, running_var = σ², weight = √(σ² + ε),
bias = μ + b. In eval mode the BatchNorm then computes (z − μ) / √(σ² + ε) · √(σ² + ε) + μ + b
= z + b for any input z — the folded layer exactly — while its scale is the channel's output
spread and its statistics are those of a trained model, which is what BN re-estimation and
BN-scale or group-norm importances expect (`unit_outputs` rescales the convs instead to outputs
of unit variance: the same function). `verify` checks the module against ONNX Runtime.

    module = load("vgg", calib_x)          # models/vgg.onnx in archs.VGG, checked against ORT
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

OUT_DIR = Path(__file__).resolve().parent
RELATIVE_TOLERANCE = 1e-4  # of max(1, max |logit|): float32 rounding, not a different function


def load(
    name: str, x: np.ndarray, check: np.ndarray | None = None, unit_outputs: bool = False
) -> nn.Module:
    """The architecture of `models/build.py`'s `name` holding `models/<name>.onnx`'s weights,
    BatchNorm statistics from `x`, verified against ORT on `check` (default `x`)."""
    from models.build import SPECS  # imported here: build pulls in the training code

    model = onnx.load(str(OUT_DIR / f"{name}.onnx"))
    module = from_onnx(SPECS[name].factory(), model, x, unit_outputs)
    verify(module, model, x if check is None else check)
    return module


def from_onnx(
    module: nn.Module, model: onnx.ModelProto, x: np.ndarray, unit_outputs: bool = False
) -> nn.Module:
    """Load the Conv/Gemm weights of `model` into `module` (same architecture, in place) and set
    every BatchNorm after a conv to the identity at the statistics of the conv outputs on `x`;
    returns `module` in eval mode. Raises ValueError where the two do not correspond.

    A conv before a BatchNorm may be scaled per output channel without changing the function
    (the BatchNorm undoes it). By default it keeps the folded filters; `unit_outputs` divides
    each by its output's standard deviation σ on `x` (outputs of unit variance, BatchNorm
    statistics μ/σ and 1, weight √(σ² + σ²ε) ≈ σ) — a different ranking for importances that
    read the conv's weights."""
    module.eval()
    layers, norms = _layers_and_norms(module, torch.from_numpy(x[:1]))
    weights = _onnx_layers(model)
    if len(weights) != len(layers):
        raise ValueError(f"{len(weights)} Conv/Gemm nodes in the ONNX model, "
                         f"{len(layers)} Conv2d/Linear modules in the torch module")  # fmt: skip
    biases = {}
    for index, ((node, w, b), layer) in enumerate(zip(weights, layers, strict=True)):
        if tuple(w.shape) != tuple(layer.weight.shape):
            raise ValueError(f"layer {index} ({node}): ONNX weight {tuple(w.shape)}, "
                             f"torch {tuple(layer.weight.shape)}")  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
        bias = np.zeros(w.shape[0], np.float32) if b is None else b
        if layer in norms:
            if layer.bias is not None:
                raise ValueError(f"layer {index} ({node}): a conv before BatchNorm has a bias")
            biases[layer] = torch.from_numpy(bias)
        elif layer.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(torch.from_numpy(bias))
        elif np.any(bias):
            raise ValueError(f"layer {index} ({node}): ONNX bias but no torch bias or BatchNorm")
    for layer, norm in norms.items():  # identity at any statistics, first, to measure the convs
        _set_identity(norm, torch.zeros_like(biases[layer]), torch.ones_like(biases[layer]),
                      biases[layer])  # fmt: skip
    for layer, (mean, var) in _output_moments(module, list(norms), x).items():
        scale = torch.where(var > 0, var.sqrt(), 1.0) if unit_outputs else torch.ones_like(var)
        with torch.no_grad():
            layer.weight.div_(scale.view(-1, *[1] * (layer.weight.ndim - 1)).float())
        _set_identity(norms[layer], mean / scale, var / scale.square(), biases[layer], scale)
    return module


def verify(module: nn.Module, model: onnx.ModelProto, x: np.ndarray) -> float:
    """Max |Δ logits| of `module` against ONNX Runtime running `model` on `x`; raises
    ValueError when it exceeds float rounding (RELATIVE_TOLERANCE of the logits' scale)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = module.eval()(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    if not diff <= RELATIVE_TOLERANCE * scale:
        raise ValueError(f"torch module differs from the ONNX model: max |Δ logit| {diff:.2e} "
                         f"(logits up to {scale:.1f})")  # fmt: skip
    return diff


def _layers_and_norms(
    module: nn.Module, example: torch.Tensor
) -> tuple[list[nn.Module], dict[nn.Module, nn.BatchNorm2d]]:
    """Conv2d/Linear modules in execution order, and the BatchNorm fed by each conv's output.
    Every BatchNorm must read a conv's output directly."""
    order: list[nn.Module] = []
    produced: dict[int, tuple[torch.Tensor, nn.Module]] = {}  # tensor kept alive: ids stay unique
    norms: dict[nn.Module, nn.BatchNorm2d] = {}
    unfed: list[str] = []
    names = {m: n for n, m in module.named_modules()}

    def layer_hook(layer: nn.Module, _inputs, output: torch.Tensor) -> None:
        order.append(layer)
        produced[id(output)] = (output, layer)

    def norm_hook(norm: nn.Module, inputs) -> None:
        source = produced.get(id(inputs[0]))
        if source is None or source[1] in norms:
            unfed.append(names[norm])
        else:
            norms[source[1]] = norm

    handles = [m.register_forward_hook(layer_hook) for m in module.modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]  # fmt: skip
    handles += [m.register_forward_pre_hook(norm_hook) for m in module.modules()
                if isinstance(m, nn.BatchNorm2d)]  # fmt: skip
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    if unfed:
        raise ValueError(f"BatchNorm not fed directly by a conv: {', '.join(unfed)}")
    if len(set(order)) != len(order):
        raise ValueError("a Conv2d/Linear module runs more than once per forward pass")
    return order, norms


def _onnx_layers(model: onnx.ModelProto) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(node name, weight as torch stores it, bias or None) of every Conv and Gemm, in graph
    order; anything else that holds weights is refused."""
    inits = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type in ("BatchNormalization", "MatMul", "ConvTranspose"):
            raise ValueError(f"{node.op_type} node {node.name}: only folded Conv/Gemm are read")
        if node.op_type not in ("Conv", "Gemm"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or not attrs.get("transB", 0)
                                       or attrs.get("alpha", 1.0) != 1.0
                                       or attrs.get("beta", 1.0) != 1.0):  # fmt: skip
            raise ValueError(f"Gemm {node.name}: only x · Wᵀ + b (transB=1) maps onto nn.Linear")
        if node.input[1] not in inits or (len(node.input) > 2 and node.input[2] not in inits):
            raise ValueError(f"{node.op_type} {node.name}: weight or bias is not an initializer")
        bias = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        layers.append((node.name, inits[node.input[1]], bias))
    return layers


def _output_moments(
    module: nn.Module, layers: list[nn.Module], x: np.ndarray, batch: int = 64
) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and (population) variance of each layer's output over `x`: every
    sample and spatial position, accumulated in float64."""
    sums: dict[nn.Module, list[torch.Tensor | int]] = {}

    def hook(layer: nn.Module, _inputs, output: torch.Tensor) -> None:
        values = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)
        total = sums.setdefault(layer, [0.0, 0.0, 0])
        total[0] = total[0] + values.sum(1)
        total[1] = total[1] + values.square().sum(1)
        total[2] += values.shape[1]

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            for xb in torch.from_numpy(x).split(batch):
                module(xb)
    finally:
        for handle in handles:
            handle.remove()
    moments = {}
    for layer, (total, squares, count) in sums.items():
        mean = total / count
        moments[layer] = (mean, (squares / count - mean.square()).clamp_min(0.0))
    return moments


def _set_identity(
    norm: nn.BatchNorm2d,
    mean: torch.Tensor,
    var: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> None:
    """BatchNorm statistics (mean, var) of a conv output z / `scale` with the affine map that
    returns z + `bias`: weight `scale` · √(var + ε), bias `scale` · mean + `bias`."""
    scale = torch.ones_like(mean) if scale is None else scale
    mean, var, bias, scale = mean.double(), var.double(), bias.double(), scale.double()
    with torch.no_grad():
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.weight.copy_(scale * (var + norm.eps).sqrt())
        norm.bias.copy_(scale * mean + bias)
