"""Rotation-invariant (TSRA + RMSNorm + AvgPool) modules and an ONNX writer for them.

The torch side follows METHODS.md §1.1-1.2 (Ning & Rangaraju, CoB pruning): TSRA splits the
channel axis into U = [0, split) and V = [split, C), with ``split = C // 2``, and scales each part
by a logistic gain of the ratio r = |x_U| / |x| taken over channels at every position. RMSNorm has
no affine parameters and normalises over channels.

The ONNX side writes such networks with ``onnx.helper`` (not the torch exporter) so that the two
non-standard activations appear as calls of model-local functions in the ``onnxprune`` domain:

* ``onnxprune::TSRA(X) -> Y``, int attributes ``split`` (index where V starts) and ``axis``;
* ``onnxprune::RMSNorm(X) -> Y``, float attribute ``epsilon`` and int attribute ``axis``.

Both are defined by FunctionProtos built from opset-18 primitives (see ``tsra_function`` and
``rmsnorm_function``); ONNX Runtime inlines them when it loads the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.archs import NUM_CLASSES

DOMAIN = "onnxprune"
DOMAIN_VERSION = 1
TSRA_OP = "TSRA"
RMSNORM_OP = "RMSNorm"
OPSET = 18  # default-domain opset; ReduceMean/ReduceL2 take ``axes`` as an input from 18 on
IR_VERSION = 8
RMS_EPS = float(torch.finfo(torch.float32).eps)  # 1.1920928955078125e-07, torch RMSNorm default
TSRA_GAIN = 5.0  # logistic slope of both gains
TSRA_CENTER_U = 0.5
TSRA_CENTER_V = 0.7
TSRA_EPS = 1e-12  # added to |x| in the ratio denominator
INT64_MAX = int(np.iinfo(np.int64).max)


# --------------------------------------------------------------------------- torch modules


def tsra(x: torch.Tensor, split: int) -> torch.Tensor:
    """Two-subspace radial activation over dim 1 of (N, C, ...) with V starting at ``split``."""
    n, c = x.shape[:2]
    if 2 * split == c:  # equal halves: one reshape instead of slice + cat (same values, faster)
        halves = x.reshape(n, 2, split, *x.shape[2:])
        s = torch.linalg.vector_norm(halves, dim=2, keepdim=True)  # (N, 2, 1, ...)
        su, sv = s[:, :1], s[:, 1:]
        r = su / (torch.sqrt(su * su + sv * sv) + TSRA_EPS)
        centers = torch.tensor([TSRA_CENTER_U, TSRA_CENTER_V], dtype=x.dtype, device=x.device)
        gains = torch.sigmoid(TSRA_GAIN * (r - centers.view(1, 2, *[1] * (x.dim() - 1))))
        return (halves * gains).reshape(x.shape)
    xu, xv = x[:, :split], x[:, split:]
    su = torch.linalg.vector_norm(xu, dim=1, keepdim=True)
    sv = torch.linalg.vector_norm(xv, dim=1, keepdim=True)
    r = su / (torch.sqrt(su * su + sv * sv) + TSRA_EPS)
    fu = torch.sigmoid(TSRA_GAIN * (r - TSRA_CENTER_U))
    fv = torch.sigmoid(TSRA_GAIN * (r - TSRA_CENTER_V))
    return torch.cat([fu * xu, fv * xv], dim=1)


class TSRA(nn.Module):
    """TSRA over the channel axis of (N, C, H, W) or the feature axis of (N, F); U = [0, C//2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError("TSRA needs at least one channel in each subspace")
        self.channels = channels
        self.split = channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tsra(x, self.split)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, split={self.split}"


class RMSNorm(nn.Module):
    """RMSNorm without affine over dim 1: x / sqrt(mean_c(x^2) + eps)."""

    def __init__(self, eps: float = RMS_EPS) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).mean(dim=1, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


def conv_rms_tsra(cin: int, cout: int) -> list[nn.Module]:
    """Conv3x3 (bias, 'same' padding) -> RMSNorm -> TSRA."""
    return [nn.Conv2d(cin, cout, 3, padding=1), RMSNorm(), TSRA(cout)]


class TSRAVGG(nn.Module):
    """Rotation-invariant twin of ``archs.VGG``: stacks 32-32-A-64-64-A-96-96-A (A = AvgPool 2x2)
    of Conv(bias) -> RMSNorm -> TSRA, then Flatten(96x4x4) -> Linear 128 -> TSRA -> Linear 10."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for width in (32, 64, 96):
            layers += [*conv_rms_tsra(cin, width), *conv_rms_tsra(width, width), nn.AvgPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(96 * 4 * 4, 128),
            TSRA(128),
            nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- ONNX functions


def _ref(name: str, attr_type: int) -> onnx.AttributeProto:
    """An attribute that refers to the calling node's attribute of the same name."""
    return helper.make_attribute_ref(name, attr_type)


def _const_ref(output: str, attr: str, value_key: str, attr_type: int) -> onnx.NodeProto:
    """Constant node whose ``value_key`` (value_int / value_float) is the caller's ``attr``."""
    node = helper.make_node("Constant", [], [output])
    ref = helper.make_attribute_ref(value_key, attr_type)
    ref.ref_attr_name = attr
    node.attribute.append(ref)
    return node


def _const(output: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value=numpy_helper.from_array(value, output))


def tsra_function(opset: int = OPSET) -> onnx.FunctionProto:
    """FunctionProto of ``onnxprune::TSRA(X) -> Y`` with int attributes ``split`` and ``axis``.

    Body: U = Slice(X, 0, split, axis), V = Slice(X, split, INT64_MAX, axis); s_S = ReduceL2(S,
    axis, keepdims=1); r = s_U / (Sqrt(s_U^2 + s_V^2) + 1e-12); f_U = Sigmoid(5 (r - 0.5)),
    f_V = Sigmoid(5 (r - 0.7)); Y = Concat(f_U U, f_V V, axis). Float32 constants.
    """
    f32, i64 = np.float32, np.int64
    nodes = [
        _const_ref("split_scalar", "split", "value_int", onnx.AttributeProto.INT),
        _const_ref("axis_scalar", "axis", "value_int", onnx.AttributeProto.INT),
        _const("one_dim", np.array([1], i64)),
        _const("zero_1d", np.array([0], i64)),
        _const("end_1d", np.array([INT64_MAX], i64)),
        _const("eps", np.array(TSRA_EPS, f32)),
        _const("gain", np.array(TSRA_GAIN, f32)),
        _const("center_u", np.array(TSRA_CENTER_U, f32)),
        _const("center_v", np.array(TSRA_CENTER_V, f32)),
        helper.make_node("Reshape", ["split_scalar", "one_dim"], ["split_1d"]),
        helper.make_node("Reshape", ["axis_scalar", "one_dim"], ["axes"]),
        helper.make_node("Slice", ["X", "zero_1d", "split_1d", "axes"], ["XU"]),
        helper.make_node("Slice", ["X", "split_1d", "end_1d", "axes"], ["XV"]),
        helper.make_node("ReduceL2", ["XU", "axes"], ["SU"], keepdims=1),
        helper.make_node("ReduceL2", ["XV", "axes"], ["SV"], keepdims=1),
        helper.make_node("Mul", ["SU", "SU"], ["SU2"]),
        helper.make_node("Mul", ["SV", "SV"], ["SV2"]),
        helper.make_node("Add", ["SU2", "SV2"], ["S2"]),
        helper.make_node("Sqrt", ["S2"], ["S"]),
        helper.make_node("Add", ["S", "eps"], ["Den"]),
        helper.make_node("Div", ["SU", "Den"], ["R"]),
        helper.make_node("Sub", ["R", "center_u"], ["RU"]),
        helper.make_node("Mul", ["RU", "gain"], ["ZU"]),
        helper.make_node("Sigmoid", ["ZU"], ["FU"]),
        helper.make_node("Sub", ["R", "center_v"], ["RV"]),
        helper.make_node("Mul", ["RV", "gain"], ["ZV"]),
        helper.make_node("Sigmoid", ["ZV"], ["FV"]),
        helper.make_node("Mul", ["FU", "XU"], ["YU"]),
        helper.make_node("Mul", ["FV", "XV"], ["YV"]),
        helper.make_node("Concat", ["YU", "YV"], ["Y"]),
    ]
    nodes[-1].attribute.append(_ref("axis", onnx.AttributeProto.INT))
    return helper.make_function(
        DOMAIN, TSRA_OP, ["X"], ["Y"], nodes,
        [helper.make_opsetid("", opset)], attributes=["split", "axis"],
    )  # fmt: skip


def rmsnorm_function(opset: int = OPSET) -> onnx.FunctionProto:
    """FunctionProto of ``onnxprune::RMSNorm(X) -> Y``, float ``epsilon``, int ``axis``.

    Body: Y = X / Sqrt(ReduceMean(Mul(X, X), axes=[axis], keepdims=1) + epsilon).
    """
    nodes = [
        _const_ref("axis_scalar", "axis", "value_int", onnx.AttributeProto.INT),
        _const_ref("eps", "epsilon", "value_float", onnx.AttributeProto.FLOAT),
        _const("one_dim", np.array([1], np.int64)),
        helper.make_node("Reshape", ["axis_scalar", "one_dim"], ["axes"]),
        helper.make_node("Mul", ["X", "X"], ["X2"]),
        helper.make_node("ReduceMean", ["X2", "axes"], ["MS"], keepdims=1),
        helper.make_node("Add", ["MS", "eps"], ["MSE"]),
        helper.make_node("Sqrt", ["MSE"], ["RMS"]),
        helper.make_node("Div", ["X", "RMS"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN, RMSNORM_OP, ["X"], ["Y"], nodes,
        [helper.make_opsetid("", opset)], attributes=["epsilon", "axis"],
    )  # fmt: skip


def tsra_node(
    inp: str, out: str, split: int, axis: int = 1, name: str | None = None
) -> onnx.NodeProto:
    """A call of ``onnxprune::TSRA``; V starts at channel ``split`` of ``axis``."""
    return helper.make_node(
        TSRA_OP, [inp], [out], name=name, domain=DOMAIN, split=int(split), axis=int(axis)
    )


def rmsnorm_node(
    inp: str, out: str, epsilon: float = RMS_EPS, axis: int = 1, name: str | None = None
) -> onnx.NodeProto:
    """A call of ``onnxprune::RMSNorm`` over ``axis``."""
    return helper.make_node(
        RMSNORM_OP, [inp], [out], name=name, domain=DOMAIN, epsilon=float(epsilon), axis=int(axis)
    )


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Iterable[onnx.TensorProto] = (),
    name: str = "tsra",
    opset: int = OPSET,
) -> onnx.ModelProto:
    """Wrap nodes in a model that imports ("", opset) and ("onnxprune", 1) and carries both
    function definitions (IR version 8). Use with ``tsra_node``/``rmsnorm_node`` to build tests."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=[tsra_function(opset), rmsnorm_function(opset)],
        ir_version=IR_VERSION,
        producer_name="onnxprune-models",
    )


# --------------------------------------------------------------------------- network writer


def _tensor(name: str, t: torch.Tensor) -> onnx.TensorProto:
    return numpy_helper.from_array(t.detach().cpu().numpy().astype(np.float32), name)


def _layer_nodes(name: str, module: nn.Module, inp: str, out: str) -> tuple[list, list]:
    """ONNX nodes and initializers for one leaf module (empty lists for identities)."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"{name}: only explicit zero padding is supported")
        inits = [_tensor(f"{name}.weight", module.weight)]
        if module.bias is not None:
            inits.append(_tensor(f"{name}.bias", module.bias))
        ph, pw = module.padding
        node = helper.make_node(
            "Conv", [inp, *(t.name for t in inits)], [out], name=name,
            kernel_shape=list(module.kernel_size), strides=list(module.stride),
            pads=[ph, pw, ph, pw], dilations=list(module.dilation), group=module.groups,
        )  # fmt: skip
        return [node], inits
    if isinstance(module, nn.Linear):
        inits = [_tensor(f"{name}.weight", module.weight)]
        if module.bias is not None:
            inits.append(_tensor(f"{name}.bias", module.bias))
        node = helper.make_node("Gemm", [inp, *(t.name for t in inits)], [out], name=name, transB=1)
        return [node], inits
    if isinstance(module, RMSNorm):
        return [rmsnorm_node(inp, out, module.eps, 1, name)], []
    if isinstance(module, TSRA):
        return [tsra_node(inp, out, module.split, 1, name)], []
    if isinstance(module, nn.AvgPool2d):
        k, s = (v if isinstance(v, tuple) else (v, v) for v in (module.kernel_size, module.stride))
        if module.padding not in (0, (0, 0)) or module.ceil_mode:
            raise ValueError(f"{name}: only unpadded floor-mode AvgPool2d is supported")
        node = helper.make_node(
            "AveragePool", [inp], [out], name=name, kernel_shape=list(k), strides=list(s)
        )
        return [node], []
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise ValueError(f"{name}: only Flatten(1, -1) is supported")
        return [helper.make_node("Flatten", [inp], [out], name=name, axis=1)], []
    if isinstance(module, nn.Dropout | nn.Identity):
        return [], []
    raise TypeError(f"{name}: no ONNX writer for {type(module).__name__}")


def to_onnx(
    model: nn.Module,
    input_shape: Sequence[int] = (1, 32, 32),
    input_name: str = "input",
    output_name: str = "logits",
    num_outputs: int = NUM_CLASSES,
    graph_name: str = "tsra_vgg",
) -> onnx.ModelProto:
    """Write a purely sequential torch model (its leaf modules run in registration order) as ONNX.

    Supported leaves: Conv2d, Linear, RMSNorm, TSRA, AvgPool2d, Flatten, Dropout/Identity.
    The batch dimension is the symbolic "batch"; node and initializer names follow the torch
    module names (``features.0`` -> ``features.0.weight``).
    """
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = input_name
    for i, (name, module) in enumerate(leaves):
        out = output_name if i == len(leaves) - 1 else f"/{name}/output"
        new_nodes, new_inits = _layer_nodes(name, module, current, out)
        if not new_nodes:
            continue
        nodes += new_nodes
        inits += new_inits
        current = out
    if current != output_name:  # last leaf was an identity: rename the final tensor
        for node in nodes:
            node.output[:] = [output_name if o == current else o for o in node.output]
    value_info = helper.make_tensor_value_info
    inputs = [value_info(input_name, TensorProto.FLOAT, ["batch", *input_shape])]
    outputs = [value_info(output_name, TensorProto.FLOAT, ["batch", num_outputs])]
    return make_model(nodes, inputs, outputs, inits, name=graph_name)
