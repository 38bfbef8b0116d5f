"""Tiny ONNX graphs built with `onnx.helper`, one builder per topology the analyzer must handle.

Every builder returns a checked `ModelProto` with seeded random weights, a symbolic batch `N`
and node names that tests refer to. Shapes are small so ORT runs them in microseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


class Builder:
    """Collects nodes and initializers; `conv`/`gemm`/... add a node and return its output name."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def rand(self, name: str, *shape: int, scale: float = 0.5) -> str:
        return self.const(name, (scale * self.rng.standard_normal(shape)).astype(np.float32))

    def node(
        self,
        op: str,
        name: str,
        inputs: Sequence[str],
        outputs: int = 1,
        domain: str | None = None,
        **attrs: object,
    ) -> str:
        outs = [f"{name}_out"] + [f"{name}_out{i}" for i in range(1, outputs)]
        self.nodes.append(
            helper.make_node(op, list(inputs), outs, name=name, domain=domain, **attrs)
        )
        return outs[0]

    def conv(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        *,
        group: int = 1,
        pad: bool = True,
        bias: bool = True,
        weight: np.ndarray | None = None,
        b: np.ndarray | None = None,
    ) -> str:
        w = (
            self.const(f"{name}.w", weight)
            if weight is not None
            else self.rand(f"{name}.w", cout, cin // group, k, k)
        )
        inputs = [x, w]
        if bias:
            bias_name = f"{name}.b"
            inputs.append(self.const(bias_name, b) if b is not None else self.rand(bias_name, cout))
        pads = [k // 2] * 4 if pad else [0] * 4
        return self.node("Conv", name, inputs, kernel_shape=[k, k], pads=pads, group=group)

    def gemm(self, name: str, x: str, fin: int, fout: int, *, trans_b: int = 1) -> str:
        shape = (fout, fin) if trans_b else (fin, fout)
        w, b = self.rand(f"{name}.w", *shape), self.rand(f"{name}.b", fout)
        return self.node("Gemm", name, [x, w, b], transB=trans_b)

    def bn(self, name: str, x: str, c: int) -> str:
        gamma = self.const(f"{name}.g", (1 + 0.3 * self.rng.standard_normal(c)).astype(np.float32))
        beta = self.rand(f"{name}.beta", c)
        mean = self.rand(f"{name}.mean", c)
        var = self.const(f"{name}.var", (0.5 + self.rng.random(c)).astype(np.float32))
        return self.node("BatchNormalization", name, [x, gamma, beta, mean, var], epsilon=1e-3)

    def relu(self, name: str, x: str) -> str:
        return self.node("Relu", name, [x])

    def model(
        self,
        outputs: Sequence[str],
        *,
        shape: Sequence[object] = ("N", 3, 8, 8),
        opset: int = 17,
        inputs: Sequence[tuple[str, Sequence[object]]] | None = None,
        extra_opsets: Sequence[tuple[str, int]] = (),
    ) -> onnx.ModelProto:
        ins = [helper.make_tensor_value_info(n, F, list(s)) for n, s in (inputs or [("x", shape)])]
        outs = [helper.make_tensor_value_info(o, F, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "tiny", ins, outs, self.inits)
        opsets = [helper.make_opsetid("", opset)] + [
            helper.make_opsetid(d, v) for d, v in extra_opsets
        ]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model)
        if not extra_opsets:
            onnx.checker.check_model(model, full_check=True)
        return model


def conv_chain(opset: int = 17, batch: object = "N") -> onnx.ModelProto:
    """x → c1(8) → relu → c2(6) → relu → c3(4) → y (`batch` 1: exported without dynamic axes)."""
    b = Builder(1)
    h = b.relu("r1", b.conv("c1", "x", 3, 8))
    h = b.relu("r2", b.conv("c2", h, 8, 6))
    return b.model([b.conv("c3", h, 6, 4)], opset=opset, shape=(batch, 3, 8, 8))


def linear_conv_chain() -> onnx.ModelProto:
    """x → c1(6) → c2(5) → c3(4) → y: nothing between the convs (rotations commute)."""
    b = Builder(2)
    h = b.conv("c1", "x", 3, 6)
    h = b.conv("c2", h, 6, 5)
    return b.model([b.conv("c3", h, 5, 4)])


def residual_add() -> onnx.ModelProto:
    """x → c1(8) → relu = t; t → c2(8); t + c2 → relu → c3(4) → y (c1, c2 coupled)."""
    b = Builder(3)
    t = b.relu("r1", b.conv("c1", "x", 3, 8))
    s = b.node("Add", "add", [t, b.conv("c2", t, 8, 8)])
    return b.model([b.conv("c3", b.relu("r2", s), 8, 4)])


def residual_block() -> onnx.ModelProto:
    """ResNet-style: t = relu(c1(x)); u = c3(relu(c2(t))); relu(t + u) → c4(4) → y."""
    b = Builder(16)
    t = b.relu("r1", b.conv("c1", "x", 3, 8))
    u = b.conv("c3", b.relu("r2", b.conv("c2", t, 8, 6)), 6, 8)
    s = b.relu("r3", b.node("Add", "add", [t, u]))
    return b.model([b.conv("c4", s, 8, 4)])


def conv_mixer(depth: int, c: int = 8) -> onnx.ModelProto:
    """ConvMixer: a stem conv, then `depth` blocks of x + bn(relu(depthwise(x))) → pointwise
    conv → relu → bn, then a 1×1 head conv (4)."""
    b = Builder(17)
    x = b.bn("bn0", b.relu("r0", b.conv("stem", "x", 3, c)), c)
    for i in range(depth):
        mixed = b.bn(f"bd{i}", b.relu(f"rd{i}", b.conv(f"dw{i}", x, c, c, group=c)), c)
        s = b.node("Add", f"add{i}", [mixed, x])
        x = b.bn(f"bp{i}", b.relu(f"rp{i}", b.conv(f"pw{i}", s, c, c, 1)), c)
    return b.model([b.conv("head", x, c, 4, 1)])


def concat(c1: int = 4, c2: int = 6) -> onnx.ModelProto:
    """Two branches a(c1), b(c2) from x, concatenated on channels, read by conv `c3`."""
    b = Builder(4)
    a = b.relu("ra", b.conv("ca", "x", 3, c1))
    bb = b.relu("rb", b.conv("cb", "x", 3, c2))
    cat = b.node("Concat", "cat", [a, bb], axis=1)
    return b.model([b.conv("c3", cat, c1 + c2, 4)])


def flatten_gemm(
    kind: str = "flatten", target: Sequence[int] = (0, -1), *, channels_last: bool = False
) -> onnx.ModelProto:
    """x[N,3,4,4] → c1(6) → relu → Flatten (or Reshape to `target`) → fc(96 → 5) → y.

    `channels_last` flattens as Keras does (tf2onnx: Transpose(0, 2, 3, 1) first), with fc's
    columns reordered so that the model computes the same function."""
    b = Builder(5)
    h = b.relu("r1", b.conv("c1", "x", 3, 6))
    if channels_last:
        h = b.node("Transpose", "nhwc", [h], perm=[0, 2, 3, 1])
    if kind == "flatten":
        flat = b.node("Flatten", "flat", [h], axis=1)
    else:
        shape = b.const("flat.shape", np.array(target, dtype=np.int64))
        flat = b.node("Reshape", "flat", [h, shape])
    y = b.gemm("fc", flat, 6 * 16, 5)
    if channels_last:  # channel-major column c·16 + p is channels-last column p·6 + c
        w = next(t for t in b.inits if t.name == "fc.w")
        major = numpy_helper.to_array(w)
        last = np.empty_like(major)
        last[:, (np.arange(16)[None, :] * 6 + np.arange(6)[:, None]).reshape(-1)] = major
        w.CopyFrom(numpy_helper.from_array(last, "fc.w"))
    return b.model([y], shape=("N", 3, 4, 4))


def depthwise() -> onnx.ModelProto:
    """x → c1(8) → relu → dw (group 8) → relu → c2(4) → y."""
    b = Builder(6)
    h = b.relu("r1", b.conv("c1", "x", 3, 8))
    h = b.relu("r2", b.conv("dw", h, 8, 8, group=8))
    return b.model([b.conv("c2", h, 8, 4)])


def se_block(squeeze: str = "gap") -> onnx.ModelProto:
    """Trunk t = relu(ct(x)); gate = sigmoid(ce(relu(cr(GAP(t))))); y = co(t · gate).

    `squeeze` spells GAP as GlobalAveragePool ("gap"), as tf2onnx writes it ("tf2onnx":
    ReduceMean → Squeeze → Reshape(-1, 8, 1, 1)), or with the channels split on the way
    ("split": … → Reshape(-1, 4, 2, 1) → Reshape(-1, 8, 1, 1)); the weights are the same."""
    b = Builder(7)
    t = b.relu("rt", b.conv("ct", "x", 3, 8))
    if squeeze == "gap":
        g = b.node("GlobalAveragePool", "gap", [t])
    else:
        g = b.node("ReduceMean", "gap", [t], axes=[2, 3], keepdims=1)
        g = b.node("Squeeze", "squeeze", [g, b.const("squeeze.axes", _ints(2, 3))])
        if squeeze == "split":
            g = b.node("Reshape", "split", [g, b.const("split.shape", _ints(-1, 4, 2, 1))])
        g = b.node("Reshape", "unsqueeze", [g, b.const("unsqueeze.shape", _ints(-1, 8, 1, 1))])
    g = b.relu("rr", b.conv("cr", g, 8, 2, 1, pad=False))
    g = b.node("Sigmoid", "sig", [b.conv("ce", g, 2, 8, 1, pad=False)])
    gated = b.node("Mul", "gate", [t, g])
    return b.model([b.conv("co", gated, 8, 4)])


def spatial_attention() -> onnx.ModelProto:
    """Trunk t = relu(ct(x)) [N,8,H,W] times a map sigmoid(cm(t)) [N,1,H,W], then co → y."""
    b = Builder(8)
    t = b.relu("rt", b.conv("ct", "x", 3, 8))
    m = b.node("Sigmoid", "sig", [b.conv("cm", t, 8, 1)])
    return b.model([b.conv("co", b.node("Mul", "att", [t, m]), 8, 4)])


def reaches_output() -> onnx.ModelProto:
    """c1's activation is both a graph output `feat` and read by c2."""
    b = Builder(9)
    h = b.conv("c1", "x", 3, 8)
    feat = b.node("Relu", "feat", [h])
    return b.model([feat, b.conv("c2", feat, 8, 4)])


def blocked_by(op: str) -> onnx.ModelProto:
    """c1(8) → relu → `op` node named 'blocker' → c2 → y, for an op that is not channel-wise."""
    b = Builder(10)
    h = b.relu("r1", b.conv("c1", "x", 3, 8))
    extra = []
    if op == "LpNormalization":
        h = b.node("LpNormalization", "blocker", [h], axis=1)
    elif op == "Softmax":
        h = b.node("Softmax", "blocker", [h], axis=1)
    elif op == "LRN":
        h = b.node("LRN", "blocker", [h], size=3)
    else:  # a custom-domain op nobody knows
        h = b.node("Mystery", "blocker", [h], domain="com.example")
        extra = [("com.example", 1)]
    return b.model([b.conv("c2", h, 8, 4)], extra_opsets=extra)


def grouped_conv() -> onnx.ModelProto:
    """c1(8) → relu → g (group 2, 8 → 8) → relu → c2(4) → y."""
    b = Builder(11)
    h = b.relu("r1", b.conv("c1", "x", 3, 8))
    h = b.relu("r2", b.conv("g", h, 8, 8, group=2))
    return b.model([b.conv("c2", h, 8, 4)])


def matmul_chain() -> onnx.ModelProto:
    """x[N,16] → MatMul m1 (16×12) + bias → relu → MatMul m2 (12×5) → y."""
    b = Builder(12)
    h = b.node("MatMul", "m1", ["x", b.rand("m1.w", 16, 12)])
    h = b.relu("r1", b.node("Add", "m1_bias", [h, b.rand("m1.b", 12)]))
    y = b.node("MatMul", "m2", [h, b.rand("m2.w", 12, 5)])
    return b.model([y], shape=("N", 16))


def tensordot_mlp(spelling: str = "matmul") -> onnx.ModelProto:
    """x[N,5,12] → Dense 12→16 + bias → relu → Dense 16→6 + bias → y[N,5,6].

    "matmul" spells each Dense as a MatMul of the 3-D input (the torch exporters); "tf2onnx" as
    Keras' Tensordot: Reshape(x, [-1, 12]) → MatMul → Reshape back to a target built as
    Cast(Concat(Gather(Cast(Shape(x), int32), [0, 1]), [16])), then the bias Add."""
    b = Builder(13)
    h = "x"
    for name, fin, fout in (("d1", 12, 16), ("d2", 16, 6)):
        w, bias = b.rand(f"{name}.w", fin, fout), b.rand(f"{name}.b", fout)
        if spelling == "matmul":
            h = b.node("MatMul", name, [h, w])
        else:
            flat = b.node("Reshape", f"{name}_flat", [h, b.const(f"{name}_rows", _ints(-1, fin))])
            dims = b.node("Cast", f"{name}_dims", [b.node("Shape", f"{name}_shape", [h])], to=6)
            free = b.node("Gather", f"{name}_free", [dims, b.const(f"{name}_axes", _ints(0, 1))])
            count = b.const(f"{name}_count", np.array([fout], np.int32))
            target = b.node("Concat", f"{name}_target", [free, count], axis=0)
            target = b.node("Cast", f"{name}_target64", [target], to=7)
            h = b.node("Reshape", f"{name}_back", [b.node("MatMul", name, [flat, w]), target])
        h = b.node("Add", f"{name}_bias", [h, bias])
        if name == "d1":
            h = b.relu("r1", h)
    return b.model([h], shape=("N", 5, 12))


def shared_target_mlps() -> onnx.ModelProto:
    """x[N,5,12] → two MLPs on rows, 12 → 16 → relu → 12, each Dense reshaped back to tokens;
    both 16-wide reshapes read ONE target, Concat(Shape(x)[0:2], [16]), as the dynamo exporter
    writes GPT-2's (its two MLPs share the computed shape) → y[N,5,12]."""
    b = Builder(31)
    target = b.node(
        "Concat", "t16", [_leading_dims(b, "t", "x"), b.const("c16", _ints(16))], axis=0
    )
    h = "x"
    for mlp in ("m1", "m2"):
        rows = b.node("Reshape", f"{mlp}_rows", [h, b.const(f"{mlp}_r12", _ints(-1, 12))])
        up = b.node(
            "Reshape",
            f"{mlp}_up3d",
            [b.node("MatMul", f"{mlp}_up", [rows, b.rand(f"{mlp}.u", 12, 16)]), target],
        )
        act = b.relu(f"{mlp}_act", up)
        rows = b.node("Reshape", f"{mlp}_rows2", [act, b.const(f"{mlp}_r16", _ints(-1, 16))])
        down = b.node("MatMul", f"{mlp}_down", [rows, b.rand(f"{mlp}.d", 16, 12)])
        h = b.node("Reshape", f"{mlp}_out", [down, b.node("Shape", f"{mlp}_xs", ["x"])])
    return b.model([h], shape=("N", 5, 12))


def keras_encoder() -> onnx.ModelProto:
    """A residual stream of width 16 on tokens x[N,5,8] as tf2onnx writes Keras layers:

    h = Dense(8 → 16)(x) (Tensordot: rows, MatMul, Reshape back, bias Add);
    n1 = LayerNorm(h) in tf2onnx's arithmetic (`tf2onnx_layernorm`);
    r = relu(Gemm(16 → 16) of Unsqueeze(n1) as rows, Reshape to (N, 5, 16, 1), Squeeze): an
    Einsum projection's spelling;
    h2 = h + Dense(16 → 16)(r) (Tensordot); y = Dense(16 → 3)(LayerNorm(h2)) as rows."""
    b = Builder(29)
    h = b.node("Add", "d0_bias", [_tensordot(b, "d0", "x", "x", 8, 16), b.rand("d0.b", 16)])
    n1 = tf2onnx_layernorm(b, "ln1", h, 16)
    rows = b.node("Unsqueeze", "n1_4d", [n1, b.const("at2", _ints(2))])
    rows = b.node("Reshape", "n1_rows", [rows, b.const("rows16", _ints(-1, 16))])
    q = b.node("Gemm", "q", [rows, b.rand("q.w", 16, 16), b.rand("q.b", 16)], transB=1)
    tail = b.const("q_tail", _ints(16, 1))
    target = b.node("Concat", "q_target", [_leading_dims(b, "q", "x"), tail], axis=0)
    q = b.node(
        "Squeeze", "q_3d", [b.node("Reshape", "q_back", [q, target]), b.const("at3", _ints(3))]
    )
    r = b.relu("q_relu", q)
    a = b.node("Add", "d1_bias", [_tensordot(b, "d1", r, "x", 16, 16), b.rand("d1.b", 16)])
    n2 = tf2onnx_layernorm(b, "ln2", b.node("Add", "residual", [h, a]), 16)
    y = b.node(
        "MatMul", "head", [b.node("Reshape", "n2_rows", [n2, "rows16"]), b.rand("head.w", 16, 3)]
    )
    return b.model([y], shape=("N", 5, 8))


def _leading_dims(b: Builder, name: str, x: str) -> str:
    """(N, 5) of x, as tf2onnx reads it: Gather(Cast(Shape(x), int32), [0, 1]), cast back."""
    dims = b.node("Cast", f"{name}_dims", [b.node("Shape", f"{name}_shape", [x])], to=6)
    free = b.node("Gather", f"{name}_free", [dims, b.const(f"{name}_axes", _ints(0, 1))])
    return b.node("Cast", f"{name}_free64", [free], to=7)


def _tensordot(b: Builder, name: str, h: str, x: str, fin: int, fout: int) -> str:
    """Keras' Dense on (N, 5, fin) without its bias: rows, MatMul, Reshape back to (N, 5, fout)."""
    flat = b.node("Reshape", f"{name}_rows", [h, b.const(f"{name}_rowshape", _ints(-1, fin))])
    out = b.node("MatMul", name, [flat, b.rand(f"{name}.w", fin, fout)])
    count = b.const(f"{name}_count", _ints(fout))
    target = b.node("Concat", f"{name}_target", [_leading_dims(b, name, x), count], axis=0)
    return b.node("Reshape", f"{name}_back", [out, target])


def tf2onnx_layernorm(b: Builder, name: str, x: str, d: int) -> str:
    """LayerNorm over the last axis as tf2onnx writes Keras': means by GlobalAveragePool,
    x·s + (β − mean·s) with s = γ / √(var + ε)."""
    gamma = b.const(f"{name}.g", (1 + 0.3 * b.rng.standard_normal(d)).astype(np.float32))
    beta = b.rand(f"{name}.b", d)
    mean = b.node("GlobalAveragePool", f"{name}_mean", [x])
    centred = b.node("Sub", f"{name}_centred", [x, mean])
    var = b.node(
        "GlobalAveragePool", f"{name}_var", [b.node("Mul", f"{name}_sq", [centred, centred])]
    )
    dev = b.node(
        "Sqrt",
        f"{name}_dev",
        [b.node("Add", f"{name}_eps", [var, b.const(f"{name}.e", np.float32(1e-3))])],
    )
    scale = b.node("Mul", f"{name}_scale", [b.node("Reciprocal", f"{name}_inv", [dev]), gamma])
    shift = b.node("Sub", f"{name}_shift", [beta, b.node("Mul", f"{name}_ms", [mean, scale])])
    return b.node("Add", f"{name}_out", [b.node("Mul", f"{name}_xs", [x, scale]), shift])


def single_gemm() -> onnx.ModelProto:
    """x[N,16] → Gemm → y: the only channels are the graph output, nothing is prunable."""
    b = Builder(13)
    return b.model([b.gemm("fc", "x", 16, 4)], shape=("N", 16))


def conv_bn(kind: str) -> onnx.ModelProto:
    """BatchNormalization in four places.

    "conv": c1 → bn → relu → c2 (foldable); "gemm": x[N,16] → fc1 → bn → relu → fc2 (foldable);
    "relu": c1 → relu → bn → c3 (kept); "add": relu(c1(x)) + relu(c2(x)) → bn → c3 (kept).
    """
    b = Builder(14)
    if kind == "gemm":
        h = b.relu("r1", b.bn("bn", b.gemm("fc1", "x", 16, 12), 12))
        return b.model([b.gemm("fc2", h, 12, 5)], shape=("N", 16))
    if kind == "conv":
        h = b.relu("r1", b.bn("bn", b.conv("c1", "x", 3, 8, bias=False), 8))
    elif kind == "relu":
        h = b.bn("bn", b.relu("r1", b.conv("c1", "x", 3, 8)), 8)
    else:
        t, u = b.relu("r1", b.conv("c1", "x", 3, 8)), b.relu("r2", b.conv("c2", "x", 3, 8))
        h = b.bn("bn", b.node("Add", "add", [t, u]), 8)
    return b.model([b.conv("c3", h, 8, 4)])


def with_noops() -> onnx.ModelProto:
    """c1 → Identity → relu → Dropout → c2 → Identity → y (the last Identity makes `y`)."""
    b = Builder(15)
    h = b.node("Identity", "id1", [b.conv("c1", "x", 3, 8)])
    h = b.node("Dropout", "drop", [b.relu("r1", h)])
    y = b.node("Identity", "id2", [b.conv("c2", h, 8, 4)])
    return b.model([y])


def constant_weights() -> onnx.ModelProto:
    """A Paddle-style conv chain whose weights and biases are Constant nodes, not initializers."""
    return _as_constant_nodes(conv_chain())


def random_input(model: onnx.ModelProto, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal feeds for every graph input (symbolic dims → n)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else n for d in value.type.tensor_type.shape.dim
        ]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def export_tokens(module, input_shape: Sequence[int], exporter: str, path) -> onnx.ModelProto:
    """Export a torch module reading (batch, tokens, features) with batch and tokens dynamic, by
    the legacy exporter (opset 17) or the dynamo exporter; the input is named `input`."""
    import torch

    x = torch.randn(*input_shape)
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("batch", min=2), 1: torch.export.Dim("tokens", min=2)}
        torch.onnx.export(module.eval(), (x,), str(path), dynamo=True, verbose=False,
                          input_names=["input"], dynamic_shapes=(dims,))  # fmt: skip
    else:
        torch.onnx.export(module.eval(), (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"],
                          dynamic_axes={"input": {0: "batch", 1: "tokens"}})  # fmt: skip
    return onnx.load(str(path))


def export_torch(module, input_shape: Sequence[int]) -> onnx.ModelProto:
    """Export a torch module with the legacy exporter (opset 17, dynamic batch) to a ModelProto.

    Input is named `input` and output `logits`, like the reference models.
    """
    import io
    import warnings

    import torch

    buffer = io.BytesIO()
    example = torch.randn(*input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return onnx.load_from_string(buffer.getvalue())


def paddle_style() -> onnx.ModelProto:
    """A Paddle-export-like block: every constant a Constant node, and arithmetic on constants.

    c1 (no bias) + Reshape(Constant bias, Constant shape) → BatchNorm spelled Mul(x, s) → Add(t)
    with s = gamma / Sqrt(var + eps) and t = beta − mean·s (both Unsqueezed to [C, 1, 1]) →
    hard-swish spelled h · Clip(h + 3, 0, 6) / 6 → c2 (4) → y.
    """
    b = Builder(17)
    c = 8
    conv = b.conv("c1", "x", 3, c, bias=False)
    bias = b.node(
        "Reshape", "c1_bias", [b.rand("c1.b", c), b.const("c1.bshape", _ints(1, c, 1, 1))]
    )
    h = b.node("Add", "c1_add", [conv, bias])
    gamma = b.const("bn.g", (1 + 0.3 * b.rng.standard_normal(c)).astype(np.float32))
    var = b.const("bn.var", (0.5 + b.rng.random(c)).astype(np.float32))
    eps = b.const("bn.eps", np.array(1e-5, dtype=np.float32))
    std = b.node("Sqrt", "bn_sqrt", [b.node("Add", "bn_vareps", [var, eps])])
    scale = b.node("Div", "bn_scale", [gamma, std])
    shift = b.node("Mul", "bn_mscale", [b.rand("bn.mean", c), scale])
    shift = b.node("Sub", "bn_shift", [b.rand("bn.beta", c), shift])
    axes = b.const("bn.axes", _ints(1, 2))
    h = b.node("Mul", "bn_mul", [h, b.node("Unsqueeze", "bn_s3", [scale, axes])])
    h = b.node("Add", "bn_add", [h, b.node("Unsqueeze", "bn_t3", [shift, axes])])
    three = b.const("hs.three", np.array(3, dtype=np.float32))
    low, high = b.const("hs.lo", np.float32(0)), b.const("hs.hi", np.float32(6))
    gate = b.node("Clip", "hs_clip", [b.node("Add", "hs_add", [h, three]), low, high])
    h = b.node(
        "Div", "hs_div", [b.node("Mul", "hs_mul", [h, gate]), b.const("hs.six", np.float32(6))]
    )
    model = b.model([b.conv("c2", h, c, 4)])
    return _as_constant_nodes(model)


def _ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every initializer into a Constant node (Paddle and some exporters write them so)."""
    graph = model.graph
    constants = [
        helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
        for t in graph.initializer
    ]
    nodes = constants + list(graph.node)
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


def expanded_constant(size: int) -> onnx.ModelProto:
    """x[N,1,size,size] + Expand(Constant 0.5, [1, 1, size, size]) → c1(4) → y."""
    b = Builder(18)
    big = b.node(
        "Expand", "grow", [b.const("half", np.float32(0.5)), b.const("to", _ints(1, 1, size, size))]
    )
    h = b.node("Add", "shift", ["x", big])
    return b.model([b.conv("c1", h, 1, 4)], shape=("N", 1, size, size))


def torch_flatten(batch: object = "N", read: str = "gather") -> onnx.ModelProto:
    """c1(6) → relu → Reshape to Concat(Unsqueeze(Gather(Shape(h), 0)), [-1]) → fc(96 → 5), as
    torch exports `h.view(h.size(0), -1)`; `read` "slice": Concat(Slice(Shape(h), 0, 1), [-1]),
    as Paddle exports `flatten`."""
    b = Builder(19)
    h = b.relu("r1", b.conv("c1", "x", 3, 6))
    dims = b.node("Shape", "shape", [h])
    if read == "slice":
        n = b.node("Slice", "n1", [dims, b.const("lo", _ints(0)), b.const("hi", _ints(1)), "lo"])
    else:
        n = b.node("Gather", "g0", [dims, b.const("zero", np.int64(0))])
        n = b.node("Unsqueeze", "n1", [n, b.const("ax0", _ints(0))])
    target = b.node("Concat", "target", [n, b.const("rest", _ints(-1))], axis=0)
    flat = b.node("Reshape", "flat", [h, target])
    return b.model([b.gemm("fc", flat, 6 * 16, 5)], shape=(batch, 3, 4, 4))


def computed_resize(
    shape: Sequence[object] = ("N", 3, 8, 8), channels_from: str = "input"
) -> onnx.ModelProto:
    """c1(8) → relu → Resize to sizes Concat(Shape(h)[:2], Shape(h)[2:] · 2) → c2(4) → y, as
    exporters write an upsampling whose output size is computed from the input's (torch's
    `F.interpolate(h, size=...)`: the Slice states axes [0] and steps [1]). `channels_from`
    "constant": the head is Concat(Shape(h)[:1], [8]); "other": Shape(g)[:2] of g = c3(x), 8
    channels outside c1's group."""
    b = Builder(20)
    h = b.relu("r1", b.conv("c1", "x", 3, 8))
    dims = b.node("Shape", "dims", [h])
    ends = {"input": 2, "constant": 1, "other": 2}[channels_from]
    read = b.node("Shape", "other", [b.conv("c3", "x", 3, 8)]) if channels_from == "other" else dims
    unit = [b.const("ax", _ints(0)), b.const("st", _ints(1))]
    bounds = [b.const("s0", _ints(0)), b.const("s2", _ints(ends)), *unit]
    head = b.node("Slice", "head", [read, *bounds])
    if channels_from == "constant":
        head = b.node("Concat", "head_c", [head, b.const("eight", _ints(8))], axis=0)
    tail = b.node("Slice", "tail", [dims, b.const("t2", _ints(2)), b.const("t4", _ints(4))])
    tail = b.node("Cast", "tail_f", [tail], to=F)
    tail = b.node("Floor", "floor", [b.node("Mul", "twice", [tail, b.const("two", np.float32(2))])])
    sizes = b.node(
        "Concat", "sizes", [head, b.node("Cast", "tail_i", [tail], to=TensorProto.INT64)], axis=0
    )
    up = b.node("Resize", "up", [h, "", "", sizes], mode="nearest")
    return b.model([b.conv("c2", up, 8, 4)], shape=shape)


def channel_shuffle(batch: object = "N") -> onnx.ModelProto:
    """Two ShuffleNetV2 units as torchvision exports them, then c3(4) → y. A unit: x.chunk(2)
    as two Slices whose bounds are computed from Shape (C + 1) / 2 → (a, relu(conv(b))) → Concat
    → Reshape to [N, 2, C / 2, H, W] → Transpose → Reshape to [N, -1, H, W], where N, C, H, W
    are read by one Shape → Gather each and C / 2 is a Div followed by two Casts. c0: 3 → 8,
    c1 and c2: 4 → 4, c3: 8 → 4, all 3×3 on 8×8."""
    b = Builder(21)
    h = b.relu("r0", b.conv("c0", "x", 3, 8))
    for unit in (1, 2):
        h = _shuffle_unit(b, f"u{unit}", h, f"c{unit}")
    return b.model([b.conv("c3", h, 8, 4)], shape=(batch, 3, 8, 8))


def _shuffle_unit(b: Builder, name: str, x: str, conv: str) -> str:
    channels = b.node(
        "Gather", f"{name}.c", [b.node("Shape", f"{name}.s", [x]), b.const(f"{name}.one", _ints(1))]
    )
    half = b.node("Add", f"{name}.c1", [channels, f"{name}.one"])
    half = b.node("Div", f"{name}.half", [half, b.const(f"{name}.two", _ints(2))])
    mid = b.node("Mul", f"{name}.mid", [half, f"{name}.one"])
    end = b.node("Mul", f"{name}.end", [half, f"{name}.two"])
    split = b.node(
        "Slice", f"{name}.left", [x, b.const(f"{name}.zero", _ints(0)), mid, f"{name}.one"]
    )
    rest = b.node("Slice", f"{name}.right", [x, mid, end, f"{name}.one"])
    right = b.relu(f"{name}.relu", b.conv(conv, rest, 4, 4))
    h = b.node("Concat", f"{name}.cat", [split, right], axis=1)
    n, c, hh, w = (
        b.node(
            "Gather",
            f"{name}.d{i}",
            [b.node("Shape", f"{name}.s{i}", [h]), b.const(f"{name}.i{i}", np.int64(i))],
        )
        for i in range(4)
    )
    half = b.node("Div", f"{name}.div", [c, b.const(f"{name}.groups", np.int64(2))])
    half = b.node(
        "Cast",
        f"{name}.cast2",
        [b.node("Cast", f"{name}.cast1", [half], to=TensorProto.INT64)],
        to=TensorProto.INT64,
    )
    n, half, hh, w = (
        b.node("Unsqueeze", f"{name}.u{i}", [d, b.const(f"{name}.a{i}", _ints(0))])
        for i, d in enumerate([n, half, hh, w])
    )
    target = b.node(
        "Concat", f"{name}.target", [n, b.const(f"{name}.g", _ints(2)), half, hh, w], axis=0
    )
    h = b.node("Reshape", f"{name}.groups_apart", [h, target])
    h = b.node("Transpose", f"{name}.swap", [h], perm=[0, 2, 1, 3, 4])
    back = b.node("Concat", f"{name}.back", [n, b.const(f"{name}.rest", _ints(-1)), hh, w], axis=0)
    return b.node("Reshape", f"{name}.shuffled", [h, back])


def strided_stem() -> onnx.ModelProto:
    """x[N, 3, H, W] → c1 (7×7, stride 2, no padding, 8) → relu → c2(4) → y: at H = W = 1, as
    symbolic dims were counted, c1's output would have a negative size."""
    b = Builder(22)
    w = b.rand("c1.w", 8, 3, 7, 7)
    h = b.relu("r1", b.node("Conv", "c1", ["x", w], kernel_shape=[7, 7], strides=[2, 2]))
    return b.model([b.conv("c2", h, 8, 4)], shape=("N", 3, "H", "W"))


def shuffle_units(
    perm: Sequence[int] = (0, 2, 1, 3, 4), chunk: str = "split", batch: int = 0
) -> onnx.ModelProto:
    """Two ShuffleNetV2 units with constant shapes: c0(8) → relu → unit u1 (Split [4, 4] → (a,
    relu(c1(b)))) → unit u2 (Split [4, 4] → (a, relu(c2(dw(b))))) → c3(4) → y, where a unit ends
    in Concat → Reshape [0, 2, 4, 8, 8] → Transpose `perm` → Reshape [0, 8, 8, 8]. dw is a
    depthwise 3×3 conv without bias (a channel that is 0 stays 0 everywhere); c0's channel 1
    duplicates its channel 0. `chunk` "slice": the halves are two Slices [0, 4) and [4, 8) (as
    torchvision's `x.chunk(2)` exports once its bounds are folded), named `{unit}.split_out`
    and `{unit}.split_out1` like the Split's outputs. `batch` is the Reshapes' batch entry: 0
    (copy), or -1 as Paddle writes it; the input's batch is symbolic."""
    b = Builder(47)
    weight = (0.5 * b.rng.standard_normal((8, 3, 3, 3))).astype(np.float32)
    bias = (0.1 * b.rng.standard_normal(8)).astype(np.float32)
    weight[1], bias[1] = weight[0], bias[0]
    h = b.relu("r0", b.conv("c0", "x", 3, 8, weight=weight, b=bias))
    for unit, branch in (("u1", "c1"), ("u2", "c2")):
        a, rest = _split_halves(b, unit, h) if chunk == "split" else _slice_halves(b, unit, h)
        if unit == "u2":
            rest = b.conv("dw", rest, 4, 4, group=4, bias=False)
        right = b.relu(f"{unit}.relu", b.conv(branch, rest, 4, 4))
        h = b.node("Concat", f"{unit}.cat", [a, right], axis=1)
        h = _shuffle(b, unit, h, perm, batch)
    return b.model([b.conv("c3", h, 8, 4)])


def _split_halves(b: Builder, name: str, x: str) -> tuple[str, str]:
    sizes = b.const(f"{name}.sizes", _ints(4, 4))
    first = b.node("Split", f"{name}.split", [x, sizes], outputs=2, axis=1)
    return first, f"{name}.split_out1"


def _slice_halves(b: Builder, name: str, x: str) -> tuple[str, str]:
    one, four, eight = (b.const(f"{name}.{v}", _ints(v)) for v in (1, 4, 8))
    zero = b.const(f"{name}.0", _ints(0))
    first = b.node("Slice", f"{name}.split", [x, zero, four, one])
    b.nodes.append(
        helper.make_node(
            "Slice", [x, four, eight, one], [f"{name}.split_out1"], name=f"{name}.rest"
        )
    )
    return first, f"{name}.split_out1"


def _shuffle(b: Builder, name: str, x: str, perm: Sequence[int], batch: int = 0) -> str:
    """Reshape [batch, 2, 4, 8, 8] → Transpose `perm` → Reshape [batch, 8, 8, 8]."""
    apart = b.const(f"{name}.apart", _ints(batch, 2, 4, 8, 8))
    back = b.const(f"{name}.back", _ints(batch, 8, 8, 8))
    h = b.node("Reshape", f"{name}.to_groups", [x, apart])
    h = b.node("Transpose", f"{name}.swap", [h], perm=list(perm))
    return b.node("Reshape", f"{name}.from_groups", [h, back])


def two_level_head(
    duplicated: bool = False, side: bool = False, exposed: bool = False
) -> onnx.ModelProto:
    """x → c1 → Relu → p1, p2 = MaxPool(p1); one head, its convs s (8 → 8) and t (8 → 4) with
    the same weights at both levels (a detector's head shared by its pyramid levels), s's
    filters and biases 4–7 copies of 0–3 when `duplicated`; with `side`, a conv u of its own
    weights reads level 1's head too, listed between the levels' t; with `exposed`, level 2's
    head activation is a graph output as well (its channels cannot be pruned there)."""
    b = Builder(7)
    p1 = b.relu("r1", b.conv("c1", "x", 3, 8))
    p2 = b.node("MaxPool", "pool", [p1], kernel_shape=[2, 2], strides=[2, 2])
    weight = 0.5 * b.rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    bias = 0.5 * b.rng.standard_normal(8).astype(np.float32)
    if duplicated:
        weight[4:], bias[4:] = weight[:4], bias[:4]
    s, sb = b.const("s.w", weight), b.const("s.b", bias)
    t, tb = b.rand("t.w", 4, 8, 1, 1), b.rand("t.b", 4)
    outputs = []
    for level, p in (("1", p1), ("2", p2)):
        h = b.node("Conv", f"s{level}", [p, s, sb], kernel_shape=[3, 3], pads=[1] * 4)
        h = b.relu(f"rs{level}", h)
        outputs.append(b.node("Conv", f"t{level}", [h, t, tb], kernel_shape=[1, 1]))
        if side and level == "1":
            outputs.append(b.conv("u", h, 8, 2, 1))
        if exposed and level == "2":
            outputs.append(h)
    return b.model(outputs)
