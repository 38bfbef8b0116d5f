"""Tests for the ONNX→torch interpreter (onnxprune.calib.torch_exec).

Forward passes are checked against ONNX Runtime, gradients against torch autograd on the module
the ONNX file was exported from (legacy exporter keeps parameter names such as `conv.weight`).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import warnings
from glob import glob
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calib.torch_exec import TorchGraph, check_against_ort
from onnxprune.errors import DataError, InterpreterMismatchError, UnsupportedOpError, UsageError

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
FWD_TOL = 1e-5


# ---------------------------------------------------------------------------- test models


class SmallCNN(nn.Module):
    """conv/BN/ReLU/maxpool(ceil, padded)/avgpool/flatten/linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.fc = nn.Linear(12 * 5 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.avg(F.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


class Residual(nn.Module):
    """A ResNet basic block with a residual add, global pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x = F.relu(x + y)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConcatNet(nn.Module):
    """Two branches concatenated, a channel split (chunk) and elementwise arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(10, 8, 3, padding=2, dilation=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
        p, q = torch.chunk(self.c(x), 2, dim=1)
        y = torch.sigmoid(p) * q - p / (q.abs() + 1.0) + torch.sqrt(p.square() + 1.0)
        y = torch.maximum(y, q).exp().clamp(max=10.0).log1p()
        return self.fc(y.mean(dim=(2, 3)))


class Mobile(nn.Module):
    """Depthwise separable convs with ReLU6, hardswish, SiLU, GELU, PReLU and a transposed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 12, 1, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12)
        self.pw = nn.Conv2d(12, 8, 1)
        self.prelu = nn.PReLU(8)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.expand(x)))
        x = F.hardswish(self.dw(x))
        x = self.prelu(F.silu(self.pw(x)))
        x = F.gelu(self.up(x))
        return F.leaky_relu(self.head(x), 0.1) + F.hardsigmoid(x[:, :4])


class SEBlock(nn.Module):
    """Squeeze-and-excitation: pool, bottleneck, sigmoid gate multiplied into the features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.out = nn.Linear(16, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        x = x * gate
        return self.out(F.adaptive_max_pool2d(x, 1).flatten(1))


class Upsample(nn.Module):
    """Nearest and bilinear upsampling (scale and size, both align_corners), reflect/edge pads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.near = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        a = self.near(x)
        b = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        c = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=True)[:, :, 4:-4, 4:-4]
        d = F.interpolate(F.pad(x, (0, 1, 0, 1), mode="replicate"), size=(16, 16), mode="nearest")
        return self.fuse(torch.cat([a, b, c, d], dim=1))


class Transformer(nn.Module):
    """Pre-norm attention block and GELU MLP over tokens, mean-pooled into logits."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp1, self.mlp2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.cls = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp2(F.gelu(self.mlp1(self.ln2(x)), approximate="tanh"))
        return F.log_softmax(self.cls(x.mean(dim=1)), dim=-1)


MODELS = {
    "cnn": (SmallCNN, (2, 3, 16, 16)),
    "residual": (Residual, (2, 3, 8, 8)),
    "concat": (ConcatNet, (2, 3, 8, 8)),
    "mobile": (Mobile, (2, 3, 8, 8)),
    "se": (SEBlock, (2, 3, 8, 8)),
    "upsample": (Upsample, (1, 3, 8, 8)),
    "transformer": (Transformer, (2, 6, 16)),
}


@functools.cache
def build(name: str) -> tuple[nn.Module, np.ndarray]:
    """Seeded eval-mode module with perturbed parameters/statistics, and an input batch.

    Perturbing BN/LayerNorm values matters: the legacy exporter deduplicates equal initializers
    (a fresh BN's running_var equals its weight) and replaces one by an Identity of the other,
    which would merge their gradients.
    """
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    module = cls()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).numpy()
    return module.eval(), x


@functools.cache
def export(name: str, opset: int = 17) -> onnx.ModelProto:
    """Legacy (TorchScript) export keeping parameter names (no constant folding)."""
    module, x = build(name)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(x),),
            buf,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=False,
            input_names=["x"],
            output_names=["y"],
        )
    return onnx.load_from_string(buf.getvalue())


@functools.cache
def export_dynamo(name: str) -> onnx.ModelProto:
    """torch.export-based exporter (the default since torch 2.9)."""
    module, x = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (torch.from_numpy(x),), dynamo=True, verbose=False)
    return program.model_proto


def _input_name(model: onnx.ModelProto) -> str:
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


# ----------------------------------------------------------------------- exported models


@pytest.mark.parametrize("opset", [17, 13, 11])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_matches_ort(name: str, opset: int) -> None:
    model = export(name, opset)
    _, x = build(name)
    graph = check_against_ort(model, {"x": x}, rtol=FWD_TOL, atol=FWD_TOL)
    assert isinstance(graph, TorchGraph)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_matches_torch_module(name: str) -> None:
    module, x = build(name)
    with torch.no_grad():
        want = module(torch.from_numpy(x))
        got = TorchGraph(export(name)).run({"x": x})["y"]
    torch.testing.assert_close(got, want, rtol=FWD_TOL, atol=FWD_TOL * float(want.abs().max()))


def _assert_grad_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = float(want.abs().max()) + 1e-12
    torch.testing.assert_close(
        got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}"
    )


def _loss(out: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for logits, plus a square term so every output element matters."""
    loss = out.square().sum()
    if out.dim() == 2:
        loss = loss + F.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[1])
    return loss


@pytest.mark.parametrize("opset", [17, 11])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_match_autograd(name: str, opset: int) -> None:
    module, x = build(name)
    module.zero_grad()
    xt = torch.from_numpy(x).requires_grad_(True)
    out = module(xt)
    _loss(out).backward()

    graph = TorchGraph(export(name, opset))
    xi = torch.from_numpy(x).requires_grad_(True)
    got = graph.run({"x": xi})["y"]
    _loss(got).backward()

    _assert_grad_close(xi.grad, xt.grad, "input")
    named = dict(module.named_parameters())
    assert set(named) <= set(graph.params), sorted(set(named) - set(graph.params))
    for pname, p in named.items():
        _assert_grad_close(graph.params[pname].grad.reshape(p.shape), p.grad, pname)


@pytest.mark.parametrize("name", ["cnn", "mobile", "transformer", "upsample"])
def test_dynamo_export_forward_matches_ort(name: str) -> None:
    model = export_dynamo(name)
    _, x = build(name)
    check_against_ort(model, {_input_name(model): x}, rtol=FWD_TOL, atol=FWD_TOL)


def test_params_are_trainable_leaves() -> None:
    graph = TorchGraph(export("cnn"))
    _, x = build("cnn")
    assert all(
        p.is_leaf and p.requires_grad and p.dtype == torch.float32 for p in graph.parameters()
    )
    opt = torch.optim.SGD(graph.parameters(), lr=1e-4)
    before = graph.run({"x": x})["y"].square().sum()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = graph.run({"x": x})["y"].square().sum()
    assert after < before
    assert not np.allclose(
        graph.params_numpy()["fc.weight"], numpy_helper.to_array(_init(export("cnn"), "fc.weight"))
    )


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def test_keep_tensors_get_grads_and_others_are_freed() -> None:
    model = export("residual")
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    graph = TorchGraph(model)
    _, x = build("residual")
    out = graph.run({"x": x}, keep=relus + ["x", "fc.weight"])
    assert set(out) == {"y", *relus, "x", "fc.weight"}
    out["y"].square().sum().backward()
    for name in relus:
        assert out[name].grad is not None and out[name].grad.shape == out[name].shape
        assert torch.isfinite(out[name].grad).all()
    assert out["fc.weight"].grad is not None
    assert out["x"].grad is not None and out["x"].grad.shape == x.shape
    # The loss depends on the activations, so some gradient entries are non-zero.
    assert any(float(out[n].grad.abs().sum()) > 0 for n in relus)


def test_keep_intermediate_grad_matches_torch_hook() -> None:
    module, x = build("se")
    captured = {}

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["conv"] = output

    handle = module.conv.register_forward_hook(hook)
    module(torch.from_numpy(x)).square().sum().backward()
    handle.remove()
    model = export("se")
    conv_out = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    out = TorchGraph(model).run({"x": x}, keep=[conv_out])
    out["y"].square().sum().backward()
    _assert_grad_close(out[conv_out].grad, captured["conv"].grad, conv_out)


def test_unknown_keep_and_missing_feed_are_reported() -> None:
    graph = TorchGraph(export("cnn"))
    _, x = build("cnn")
    with pytest.raises(UsageError, match="nope"):
        graph.run({"x": x}, keep=["nope"])
    with pytest.raises(DataError, match="'x'"):
        graph.run({})
    with pytest.raises(DataError, match="bogus"):
        graph.run({"x": x, "bogus": x})


def test_mismatch_is_detected_with_output_name_and_deviation() -> None:
    model = export("cnn")
    _, x = build("cnn")
    corrupted = copy.deepcopy(model)
    init = _init(corrupted, "fc.bias")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, "fc.bias"))
    with pytest.raises(InterpreterMismatchError, match=r"'y'.*max abs 0\.5"):
        check_against_ort(model, {"x": x}, graph=TorchGraph(corrupted))
    # The uncorrupted graph passes through the same entry point.
    check_against_ort(model, {"x": x}, graph=TorchGraph(model))


def test_unsupported_op_is_named_at_construction() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="ok"),
        helper.make_node("Hardmax", ["r"], ["y"], name="the_hardmax"),
    ]
    model = _model(nodes, {"x": TensorProto.FLOAT}, {"y": TensorProto.FLOAT}, opset=17)
    with pytest.raises(UnsupportedOpError, match="Hardmax.*the_hardmax"):
        TorchGraph(model)
    nodes = [helper.make_node("Foo", ["x"], ["y"], name="custom", domain="com.example")]
    model = _model(
        nodes,
        {"x": TensorProto.FLOAT},
        {"y": TensorProto.FLOAT},
        opset=17,
        extra_opsets={"com.example": 1},
    )
    with pytest.raises(UnsupportedOpError, match="com.example::Foo.*custom"):
        TorchGraph(model)


def test_freeze_runs_an_unsupported_op_in_ort_without_gradient() -> None:
    """Relu(x·w) → Hardmax → ·v: Hardmax runs in ORT (one-hot rows, exact), `v` gets its
    exact gradient, and nothing flows back to `w` through the frozen node."""
    rng = np.random.default_rng(0)
    w, v = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
        helper.make_node("Hardmax", ["h"], ["onehot"], name="the_hardmax"),
        helper.make_node("MatMul", ["onehot", "v"], ["y"], name="mm2"),
    ]
    inits = (numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v"))
    model = _model(nodes, {"x": TensorProto.FLOAT}, {"y": TensorProto.FLOAT}, opset=17,
                   inits=inits)  # fmt: skip
    graph = TorchGraph(model, freeze=True)
    assert graph.frozen == ("the_hardmax",)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    onehot = np.eye(5, dtype=np.float32)[(x @ w).argmax(1)]
    y = graph.run({"x": x})["y"]
    np.testing.assert_array_equal(y.detach().numpy(), onehot @ v)
    y.sum().backward()
    assert graph.params["w"].grad is None
    np.testing.assert_allclose(graph.params["v"].grad.numpy(), onehot.T @ np.ones((6, 3)))
    check_against_ort(model, {"x": x}, graph=graph, rtol=0, atol=0)


def test_freeze_refuses_an_op_ort_cannot_run_either() -> None:
    nodes = [helper.make_node("Foo", ["x"], ["y"], name="custom", domain="com.example")]
    model = _model(nodes, {"x": TensorProto.FLOAT}, {"y": TensorProto.FLOAT}, opset=17,
                   extra_opsets={"com.example": 1})  # fmt: skip
    with pytest.raises(UnsupportedOpError, match="com.example::Foo.*custom.*neither"):
        TorchGraph(model, freeze=True)


def test_local_functions_are_inlined() -> None:
    fn = helper.make_function(
        "local",
        "Swish",
        ["a"],
        ["b"],
        [helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Mul", ["a", "s"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    nodes = [helper.make_node("Swish", ["x"], ["y"], domain="local")]
    model = _model(
        nodes,
        {"x": TensorProto.FLOAT},
        {"y": TensorProto.FLOAT},
        opset=17,
        extra_opsets={"local": 1},
        functions=[fn],
    )
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    check_against_ort(model, {"x": x}, rtol=FWD_TOL)


def test_unused_second_output_rejected() -> None:
    nodes = [helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2], name="mp")]
    model = _model(
        nodes,
        {"x": TensorProto.FLOAT},
        {"y": TensorProto.FLOAT, "idx": TensorProto.INT64},
        opset=13,
    )
    with pytest.raises(UnsupportedOpError, match="MaxPool node 'mp'"):
        TorchGraph(model)


# --------------------------------------------------------------------- single-op graphs


def _model(
    nodes: list,
    inputs: dict,
    outputs: dict,
    *,
    opset: int,
    inits: tuple = (),
    extra_opsets: dict | None = None,
    functions: list | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, v, None) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, v, None) for k, v in outputs.items()],
        initializer=list(inits),
    )
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8, functions=functions or [])


def _check_op(
    op: str,
    x: np.ndarray,
    *,
    opset: int,
    consts: dict | None = None,
    n_out: int = 1,
    out_type: int = TensorProto.FLOAT,
    **attrs: object,
) -> None:
    """One node fed by input `x` and constant inputs (None → omitted) vs ONNX Runtime."""
    consts = consts or {}
    names = ["x"] + [("" if v is None else k) for k, v in consts.items()]
    while names and names[-1] == "":
        names.pop()
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items() if v is not None]
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, name=f"the_{op}", **attrs)
    elem = helper.np_dtype_to_tensor_dtype(x.dtype)
    model = _model([node], {"x": elem}, dict.fromkeys(outs, out_type), opset=opset, inits=inits)
    check_against_ort(model, {"x": x}, rtol=FWD_TOL, atol=FWD_TOL)


RNG = np.random.default_rng(0)
IMG = RNG.normal(size=(2, 3, 7, 9)).astype(np.float32)
I64 = np.int64


@pytest.mark.parametrize(
    "attrs",
    [
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "SAME_LOWER", "strides": [2, 3]},
        {"auto_pad": "VALID", "dilations": [2, 1]},
        {"pads": [0, 1, 2, 0], "strides": [1, 2]},
        {"pads": [1, 1, 1, 1], "group": 3},
    ],
)
def test_conv_variants(attrs: dict) -> None:
    groups = attrs.get("group", 1)
    w = RNG.normal(size=(6, 3 // groups, 3, 2)).astype(np.float32)
    _check_op("Conv", IMG, opset=13, consts={"w": w, "b": np.arange(6, dtype=np.float32)}, **attrs)


@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]},
        {"strides": [2, 1], "output_shape": [15, 10]},
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
        {"strides": [1, 1], "dilations": [2, 1], "group": 3},
    ],
)
def test_conv_transpose_variants(attrs: dict) -> None:
    groups = attrs.get("group", 1)
    w = RNG.normal(size=(3, 6 // groups, 3, 2)).astype(np.float32)
    _check_op(
        "ConvTranspose",
        IMG,
        opset=13,
        consts={"w": w, "b": np.arange(6 // groups * groups, dtype=np.float32)},
        **attrs,
    )


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
        {"kernel_shape": [2, 3], "strides": [2, 2], "pads": [0, 1, 1, 2]},
        {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"kernel_shape": [2, 2], "strides": [3, 3], "ceil_mode": 1},
    ],
)
def test_pool_variants(op: str, attrs: dict) -> None:
    _check_op(op, IMG, opset=19 if op == "AveragePool" else 13, **attrs)
    if op == "AveragePool" and "pads" in attrs:
        _check_op(op, IMG, opset=13, count_include_pad=1, **attrs)
    if op == "MaxPool":
        _check_op(op, IMG, opset=13, dilations=[2, 1], **attrs)


def test_gemm_and_matmul() -> None:
    a = RNG.normal(size=(5, 4)).astype(np.float32)
    b = RNG.normal(size=(3, 5)).astype(np.float32)
    _check_op(
        "Gemm",
        a,
        opset=13,
        consts={"b": b, "c": np.ones(3, np.float32)},
        transA=1,
        transB=1,
        alpha=0.5,
        beta=2.0,
    )
    _check_op("Gemm", a, opset=11, consts={"b": b[:, :4].T.copy()})
    _check_op(
        "MatMul",
        RNG.normal(size=(2, 3, 4)).astype(np.float32),
        opset=13,
        consts={"b": RNG.normal(size=(4, 5)).astype(np.float32)},
    )


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_reductions_across_opsets(opset: int) -> None:
    for op in [
        "ReduceMean",
        "ReduceMax",
        "ReduceL2",
        "ReduceSum",
        "ReduceMin",
        "ReduceProd",
        "ReduceSumSquare",
        "ReduceLogSumExp",
        "ReduceL1",
    ]:
        axes_as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
        if axes_as_input:
            _check_op(op, IMG, opset=opset, consts={"axes": np.array([1, -1], I64)}, keepdims=0)
            _check_op(op, IMG, opset=opset, noop_with_empty_axes=1)
        else:
            _check_op(op, IMG, opset=opset, axes=[1, -1], keepdims=0)
        _check_op(op, IMG, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_squeeze_unsqueeze_across_opsets(opset: int) -> None:
    if opset >= 13:
        _check_op("Split", IMG, opset=opset, consts={"s": np.array([2, 5], I64)}, n_out=2, axis=2)
        _check_op("Squeeze", IMG[:, :1], opset=opset, consts={"a": np.array([1], I64)})
        _check_op("Unsqueeze", IMG, opset=opset, consts={"a": np.array([0, -1], I64)})
    else:
        _check_op("Split", IMG, opset=opset, split=[2, 5], n_out=2, axis=2)
        _check_op("Squeeze", IMG[:, :1], opset=opset, axes=[1])
        _check_op("Unsqueeze", IMG, opset=opset, axes=[0, -1])
    _check_op("Split", IMG, opset=opset, n_out=3, axis=1)
    if opset >= 18:
        _check_op("Split", IMG, opset=opset, n_out=3, axis=3, num_outputs=3)
        _check_op("Split", IMG, opset=opset, n_out=4, axis=2, num_outputs=4)
    _check_op("Squeeze", IMG[:1, :, :1], opset=opset)


@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_axis_semantics(opset: int) -> None:
    for op in ["Softmax", "LogSoftmax"]:
        _check_op(op, IMG, opset=opset)
        _check_op(op, IMG, opset=opset, axis=1)


def test_clip_forms() -> None:
    _check_op("Clip", IMG, opset=11, consts={"lo": np.float32(-0.5), "hi": np.float32(0.7)})
    _check_op("Clip", IMG, opset=13, consts={"lo": None, "hi": np.float32(0.3)})
    _check_op("Clip", IMG, opset=13, consts={"lo": np.float32(0.1)})
    _check_op("Clip", IMG, opset=13)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
@pytest.mark.parametrize("opset", [11, 18])
def test_pad_modes(mode: str, opset: int) -> None:
    pads = np.array([0, 0, 1, 2, 0, 0, 2, 1], I64)
    consts = {"pads": pads, "v": np.float32(1.5)} if mode == "constant" else {"pads": pads}
    _check_op("Pad", IMG, opset=opset, consts=consts, mode=mode)
    if opset >= 18:
        axes = {"pads": np.array([1, 0, 2, 3], I64), "v": None, "axes": np.array([-1, 2], I64)}
        _check_op("Pad", IMG, opset=opset, consts=axes, mode=mode)


@pytest.mark.parametrize("ctm", ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_scales_and_sizes(ctm: str, mode: str) -> None:
    roi = np.zeros(0, np.float32)
    scales = np.array([1, 1, 2.0, 1.5], np.float32)
    for nearest in (
        ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
        if mode == "nearest"
        else ["floor"]
    ):
        kw = {"mode": mode, "coordinate_transformation_mode": ctm, "nearest_mode": nearest}
        _check_op("Resize", IMG, opset=13, consts={"roi": roi, "scales": scales}, **kw)
        _check_op(
            "Resize",
            IMG,
            opset=13,
            consts={"roi": roi, "scales": None, "sizes": np.array([2, 3, 5, 13], I64)},
            **kw,
        )
    _check_op(
        "Resize",
        IMG,
        opset=18,
        consts={"roi": None, "scales": None, "sizes": np.array([11, 4], I64)},
        axes=[3, 2],
        mode=mode,
        coordinate_transformation_mode=ctm,
    )


def test_shape_ops() -> None:
    idx = np.array([[0, -1], [2, 1]], I64)
    _check_op("Gather", IMG, opset=13, consts={"i": idx}, axis=-1)
    _check_op("Gather", IMG, opset=13, consts={"i": np.array(-2, I64)}, axis=0)
    _check_op(
        "GatherElements", IMG, opset=13, consts={"i": np.zeros((2, 3, 7, 2), I64) - 1}, axis=3
    )
    _check_op("Shape", IMG, opset=15, out_type=TensorProto.INT64, start=1, end=-1)
    _check_op("Shape", IMG, opset=13, out_type=TensorProto.INT64)
    _check_op("Reshape", IMG, opset=13, consts={"s": np.array([0, -1, 9], I64)})
    _check_op("Reshape", IMG, opset=14, consts={"s": np.array([2, -1, 9], I64)}, allowzero=1)
    _check_op("Flatten", IMG, opset=13, axis=-1)
    _check_op("Flatten", IMG, opset=13, axis=0)
    _check_op("Transpose", IMG, opset=13, perm=[0, 2, 3, 1])
    _check_op("Transpose", IMG, opset=13)
    _check_op("Expand", IMG[:, :1], opset=13, consts={"s": np.array([4, 1, 3, 1, 1], I64)})
    _check_op("Tile", IMG, opset=13, consts={"r": np.array([1, 2, 1, 3], I64)})
    shape = np.array([2, 3], I64)
    _check_op(
        "ConstantOfShape",
        shape,
        opset=13,
        value=numpy_helper.from_array(np.array([2.5], np.float32)),
    )
    _check_op(
        "ConstantOfShape",
        shape,
        opset=13,
        out_type=TensorProto.INT64,
        value=numpy_helper.from_array(np.array([7], I64)),
    )
    _check_op(
        "Range",
        np.array(2, I64),
        opset=13,
        out_type=TensorProto.INT64,
        consts={"l": np.array(11, I64), "d": np.array(3, I64)},
    )
    _check_op(
        "Range",
        np.array(1.0, np.float32),
        opset=13,
        consts={"l": np.array(-2.0, np.float32), "d": np.array(-0.5, np.float32)},
    )
    _check_op("Cast", IMG, opset=13, out_type=TensorProto.INT64, to=TensorProto.INT64)
    _check_op("Size", IMG, opset=13, out_type=TensorProto.INT64)


def test_shape_arithmetic_graph() -> None:
    """Shape → Gather → Concat → Reshape: the typical dynamic-shape subgraph on int64."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Shape", ["flat"], ["fs"], start=-1),
        helper.make_node("Cast", ["fs"], ["fsf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["flat", "fsf"], ["y"]),
        helper.make_node("Equal", ["fs", "fs"], ["eq"]),
        helper.make_node("Where", ["eq", "fs", "minus1"], ["w"]),
        helper.make_node("Constant", [], ["c"], value_ints=[4, 5]),
        helper.make_node("Add", ["w", "c"], ["z"]),
        helper.make_node("Div", ["z", "three"], ["zi"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(v, I64), k)
        for k, v in {"i0": 0, "ax": [0], "minus1": [-1], "three": [-3]}.items()
    ]
    model = _model(
        nodes,
        {"x": TensorProto.FLOAT},
        {"y": TensorProto.FLOAT, "zi": TensorProto.INT64},
        opset=15,
        inits=inits,
    )
    check_against_ort(model, {"x": IMG}, rtol=FWD_TOL)


@given(
    st.lists(
        st.tuples(
            st.integers(-12, 12), st.integers(-12, 12), st.sampled_from([-3, -2, -1, 1, 2, 3])
        ),
        min_size=1,
        max_size=3,
    ),
    st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_slice_matches_ort(specs: list, huge: bool) -> None:
    axes = [1, 2, 3][: len(specs)]
    starts = np.array([s for s, _, _ in specs], I64)
    ends = np.array([e for _, e, _ in specs], I64)
    if huge:
        ends = np.where(
            np.array([st_ for *_, st_ in specs]) > 0, np.iinfo(I64).max, np.iinfo(I64).min
        )
    consts = {
        "s": starts,
        "e": ends,
        "a": np.array(axes, I64),
        "p": np.array([p for *_, p in specs], I64),
    }
    _check_op("Slice", IMG, opset=13, consts=consts)


def test_misc_elementwise() -> None:
    pos = np.abs(IMG) + 0.1
    for op in [
        "Relu",
        "Sigmoid",
        "Tanh",
        "Erf",
        "Neg",
        "Exp",
        "Abs",
        "Softplus",
        "Floor",
        "Ceil",
        "HardSwish",
        "Identity",
    ]:
        _check_op(op, IMG, opset=14)
    for op in ["Sqrt", "Log", "Reciprocal"]:
        _check_op(op, pos, opset=13)
    _check_op("LeakyRelu", IMG, opset=13, alpha=0.3)
    _check_op("Elu", IMG, opset=13, alpha=0.7)
    _check_op("HardSigmoid", IMG, opset=13, alpha=0.3, beta=0.4)
    _check_op("Gelu", IMG, opset=20)
    _check_op("Gelu", IMG, opset=20, approximate="tanh")
    _check_op("PRelu", IMG, opset=13, consts={"s": RNG.normal(size=(3, 1, 1)).astype(np.float32)})
    _check_op("Pow", pos, opset=13, consts={"e": np.float32(1.7)})
    other = RNG.normal(size=(7, 1)).astype(np.float32)
    for op in ["Add", "Sub", "Mul", "Div", "Min", "Max", "Sum", "Mean"]:
        _check_op(op, IMG, opset=13, consts={"o": other})
    for op in ["Min", "Max", "Sum", "Mean"]:
        row = RNG.normal(size=9).astype(np.float32)
        _check_op(op, IMG, opset=13, consts={"o": other, "p": row})
    _check_op("Dropout", IMG, opset=13)
    _check_op(
        "Einsum",
        IMG,
        opset=13,
        consts={"w": RNG.normal(size=(9, 4)).astype(np.float32)},
        equation="nchw,wk->nkh",
    )


def test_dropout_mask_output() -> None:
    node = helper.make_node("Dropout", ["x"], ["y", "m"])
    model = _model(
        [node], {"x": TensorProto.FLOAT}, {"y": TensorProto.FLOAT, "m": TensorProto.BOOL}, opset=13
    )
    check_against_ort(model, {"x": IMG})


def test_normalizations() -> None:
    scale = RNG.normal(size=(3,)).astype(np.float32)
    bias = RNG.normal(size=(3,)).astype(np.float32)
    _check_op("InstanceNormalization", IMG, opset=13, consts={"s": scale, "b": bias})
    var = RNG.uniform(0.5, 2, size=3).astype(np.float32)
    _check_op(
        "BatchNormalization",
        IMG,
        opset=15,
        consts={"s": scale, "b": bias, "m": bias * 0.5, "v": var},
        epsilon=1e-3,
    )
    ln_scale = RNG.normal(size=(7, 9)).astype(np.float32)
    _check_op("LayerNormalization", IMG, opset=17, consts={"s": ln_scale}, axis=2)
    _check_op("LayerNormalization", IMG, opset=17, consts={"s": ln_scale[0], "b": ln_scale[1]})


# ------------------------------------------------------------------ reference model files


def _reference_models() -> list[tuple[str, str]]:
    """(model file, test-data file) for models/*.onnx, using models/manifest.json if present."""
    data_for: dict[str, str] = {}
    manifest = MODELS_DIR / "manifest.json"
    if manifest.exists():
        entries = json.loads(manifest.read_text()).get("models", {})
        for entry in entries.values():
            for key in ("onnx", "onnx_dynamo"):
                if isinstance(entry, dict) and entry.get(key) and entry.get("test"):
                    data_for[entry[key]] = entry["test"]
    out = []
    for path in sorted(glob(str(MODELS_DIR / "*.onnx"))):
        name = Path(path).name
        default = "digits64_test.npz" if name.startswith("mlp") else "digits32_test.npz"
        out.append((path, data_for.get(name, default)))
    return out


REFERENCE = _reference_models()


@pytest.mark.skipif(not REFERENCE, reason="no models/*.onnx yet")
@pytest.mark.parametrize(
    ("path", "data"), REFERENCE or [("", "")], ids=[Path(p).name for p, _ in REFERENCE] or ["none"]
)
def test_reference_models_match_ort(path: str, data: str) -> None:
    data_path = MODELS_DIR / data
    if not (Path(path).exists() and data_path.exists()):  # models/ may be being rebuilt
        pytest.skip(f"{Path(path).name} or {data} not present")
    model = onnx.load(path)
    x = np.load(data_path)["input"][:32]
    graph = check_against_ort(model, {_input_name(model): x}, rtol=FWD_TOL, atol=FWD_TOL)
    out = graph.run({_input_name(model): x})
    out[graph.output_names[0]].logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in graph.parameters() if p.numel() > 1)
