"""MAC, parameter and element-wise counts of small hand-built graphs vs hand-computed numbers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import UsageError
from onnxprune.measure.cost import count, format_count
from onnxprune.ops.gemm_matmul import parse_equation

F = TensorProto.FLOAT


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, dtype=np.float32), name)


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, shape)


def _by_op(cost, op_type: str):
    return next(n for n in cost.per_node if n.op_type == op_type)


def test_grouped_strided_dilated_padded_conv_with_symbolic_batch():
    # X [N,8,10,10], W [16,4,3,3], group 2, stride 2, dilation 2 (effective kernel 5), pads 1
    # H_out = (10 + 2 - 5) // 2 + 1 = 4 -> MACs = 1*16*4*4 * (8/2)*3*3 = 9216
    conv = helper.make_node(
        "Conv",
        ["x", "w", "b"],
        ["y"],
        group=2,
        strides=[2, 2],
        dilations=[2, 2],
        pads=[1, 1, 1, 1],
    )
    model = _model(
        [conv],
        [_vi("x", ["N", 8, 10, 10])],
        [_vi("y", None)],
        [_init("w", 16, 4, 3, 3), _init("b", 16)],
    )
    cost = count(model)
    assert cost.macs == 16 * 4 * 4 * 4 * 3 * 3 == 9216
    assert cost.params == 16 * 4 * 9 + 16
    assert cost.unknown == ()
    assert count(model, input_shapes={"x": (4, 8, 10, 10)}).macs == 4 * 9216


def test_depthwise_conv():
    conv = helper.make_node("Conv", ["x", "w"], ["y"], group=32, pads=[1, 1, 1, 1])
    model = _model([conv], [_vi("x", [1, 32, 14, 14])], [_vi("y", None)], [_init("w", 32, 1, 3, 3)])
    cost = count(model)
    assert cost.macs == 32 * 14 * 14 * 9
    assert cost.params == 32 * 9


def test_conv_1d_and_conv_transpose():
    conv1d = helper.make_node("Conv", ["x", "w"], ["y"])  # [1,2,10] * [3,2,3] -> [1,3,8]
    deconv = helper.make_node("ConvTranspose", ["y", "wt"], ["z"], strides=[2])  # [3,4,3]
    model = _model(
        [conv1d, deconv],
        [_vi("x", [1, 2, 10])],
        [_vi("z", None)],
        [_init("w", 3, 2, 3), _init("wt", 3, 4, 3)],
    )
    cost = count(model)
    assert _by_op(cost, "Conv").macs == 3 * 8 * 2 * 3
    assert _by_op(cost, "ConvTranspose").macs == (3 * 8) * (4 * 3)  # |X| * C_out/g * k


def test_gemm_with_trans_b():
    gemm = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1)
    model = _model(
        [gemm], [_vi("a", ["batch", 64])], [_vi("y", None)], [_init("b", 10, 64), _init("c", 10)]
    )
    cost = count(model)
    assert cost.macs == 1 * 10 * 64
    assert cost.params == 650
    assert count(model, input_shapes={"a": (4, 64)}).macs == 4 * 10 * 64


def test_batched_broadcast_matmul():
    mm = helper.make_node("MatMul", ["a", "b"], ["y"])  # [2,3,5,7] @ [3,7,4] -> [2,3,5,4]
    model = _model([mm], [_vi("a", [2, 3, 5, 7])], [_vi("y", None)], [_init("b", 3, 7, 4)])
    cost = count(model)
    assert cost.macs == 2 * 3 * 5 * 4 * 7
    assert cost.params == 3 * 7 * 4


@pytest.mark.parametrize("equation", ["bij,bjk->bik", "bij,bjk"])
def test_trivial_einsum(equation):
    es = helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)
    model = _model([es], [_vi("a", [2, 3, 4]), _vi("b", [2, 4, 5])], [_vi("y", None)])
    assert count(model).macs == 2 * 3 * 4 * 5


@pytest.mark.parametrize("equation", ["bij,bjk", "ij,jk", "ba,ca", "i,i", "ab,cd", "hbi,bhj"])
def test_implicit_einsum_output_is_numpys(equation):
    """An implicit output holds the labels used once, alphabetically: the shape numpy gives."""
    operands, output = parse_equation(equation)
    size = {label: 2 + i for i, label in enumerate("abcdhijk")}
    arrays = [np.ones([size[label] for label in labels]) for labels in operands]
    assert np.einsum(equation, *arrays).shape == tuple(size[label] for label in output)


def test_conv_bn_relu_maxpool():
    nodes = [
        helper.make_node("Conv", ["x", "w", "wb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    inits = [_init("w", 4, 3, 3, 3), _init("wb", 4)] + [_init(n, 4) for n in ("s", "bb", "m", "v")]
    model = _model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("y", None)], inits)
    cost = count(model)
    assert cost.macs == 4 * 8 * 8 * 3 * 3 * 3  # BN/ReLU/pool add no MACs
    assert cost.params == 108 + 4 + 16
    assert _by_op(cost, "BatchNormalization").elementwise == 4 * 8 * 8
    assert _by_op(cost, "Relu").elementwise == 4 * 8 * 8
    assert _by_op(cost, "MaxPool").elementwise == (4 * 4 * 4) * 4  # output elements * kernel
    assert cost.elementwise == 256 + 256 + 256


def test_shared_initializer_counted_once_and_constant_node_params():
    const = helper.make_node(
        "Constant", [], ["k"], value=numpy_helper.from_array(np.ones(5, np.float32), "k")
    )
    nodes = [
        const,
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["h2"]),
        helper.make_node("Add", ["h2", "k"], ["y"]),
    ]
    model = _model(nodes, [_vi("x", [1, 5])], [_vi("y", None)], [_init("w", 5, 5)])
    cost = count(model)
    assert cost.params == 25 + 5
    assert cost.macs == 2 * 25


def test_unknown_shape_is_recorded_and_rest_counted():
    nodes = [
        helper.make_node("Mystery", ["x"], ["m"], domain="custom"),
        helper.make_node("Conv", ["m", "w"], ["y"]),
        helper.make_node("Conv", ["x", "w"], ["z"], name="known"),
    ]
    model = _model(
        nodes, [_vi("x", [1, 2, 4, 4])], [_vi("y", None), _vi("z", None)], [_init("w", 2, 2, 1, 1)]
    )
    model.opset_import.append(helper.make_opsetid("custom", 1))
    cost = count(model)
    assert cost.unknown == ("Conv_1",)
    assert cost.macs == 2 * 16 * 2


def test_input_shape_override_errors():
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    model = _model([conv], [_vi("x", [1, 2, 4, 4])], [_vi("y", None)], [_init("w", 2, 2, 1, 1)])
    with pytest.raises(UsageError, match="input 'x' has rank 4"):
        count(model, input_shapes={"x": (1, 2)})
    with pytest.raises(UsageError, match="nope"):
        count(model, input_shapes={"nope": (1,)})


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1_230_000, "1.23M"),
        (456_700, "456.7K"),
        (999_999, "1M"),
        (2_500_000_000, "2.5G"),
    ],
)
def test_format_count(n, text):
    assert format_count(n) == text


# --- shapes that exporters compute from Shape ------------------------------------------------


def _macs_from_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Conv/Gemm MACs from the shapes ONNX Runtime actually produces (every tensor an output)."""
    from conftest import run_model

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    names = [out for node in model.graph.node for out in node.output if out]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    shapes = {n: v.shape for n, v in run_model(probe, feeds).items()}
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            total += int(np.prod(shapes[node.output[0]])) * int(np.prod(shapes[node.input[1]][1:]))
        elif node.op_type == "Gemm":
            total += int(np.prod(shapes[node.output[0]])) * shapes[node.input[0]][1]
    return total


@pytest.mark.parametrize("symbolic", [True, False], ids=["symbolic", "folding"])
@pytest.mark.parametrize("batch", ["N", 1])
def test_channel_shuffle_with_dims_read_by_shape_is_counted_exactly(batch, symbolic, monkeypatch):
    import graphs

    from onnxprune.measure import cost as module

    if not symbolic:  # as without sympy: shape arithmetic folded round by round instead
        monkeypatch.setattr(module, "_symbolically_inferred", lambda model: model)
    model = graphs.channel_shuffle(batch)
    cost = count(model)
    # c0 3→8, c1 and c2 4→4 on one half, c3 8→4: 3×3 convs on 8×8 at batch 1
    assert cost.macs == 64 * (8 * 27 + 2 * 4 * 36 + 4 * 72) == 50688
    assert not cost.unknown
    assert cost.macs == _macs_from_ort(model, graphs.random_input(model, n=1))


def test_resize_to_computed_sizes_is_counted_at_the_given_input_shape():
    import graphs

    # c1 3→8 on 8×8, then c2 8→4 on the 16×16 the Resize computes from Shape
    hand = 64 * 8 * 27 + 256 * 4 * 72
    model = graphs.computed_resize()
    assert count(model).macs == hand == _macs_from_ort(model, graphs.random_input(model, n=1))
    symbolic = graphs.computed_resize(("N", 3, "H", "W"))
    assert count(symbolic, input_shapes={"x": (1, 3, 8, 8)}).macs == hand
    assert count(symbolic, input_shapes={"x": (1, 3, 16, 16)}).macs == 4 * hand


def test_a_torch_exported_shufflenet_is_counted_as_ort_runs_it():
    torch = pytest.importorskip("torch")
    import graphs

    model = graphs.export_torch(_shufflenet(torch.nn), (1, 3, 64, 64))
    cost = count(model)
    assert not cost.unknown
    assert cost.macs == _macs_from_ort(model, graphs.random_input(model, n=1))


def _shufflenet(nn):
    """A stem and three ShuffleNetV2 units (one strided), written as torchvision writes them."""
    import torch

    def shuffle(x, groups: int = 2):
        n, c, h, w = x.size()
        x = torch.transpose(x.view(n, groups, c // groups, h, w), 1, 2).contiguous()
        return x.view(n, -1, h, w)

    def unit(c: int, stride: int) -> nn.Module:
        half, cin = c // 2, (c if stride > 1 else c // 2)
        left = (
            nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c), nn.Conv2d(c, half, 1), nn.ReLU())
            if stride > 1
            else None
        )
        right = nn.Sequential(
            nn.Conv2d(cin, half, 1),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, stride, 1, groups=half),
            nn.Conv2d(half, half, 1),
            nn.ReLU(),
        )

        class Unit(nn.Module):
            def __init__(self):
                super().__init__()
                self.left, self.right = left, right

            def forward(self, x):
                if self.left is None:
                    a, b = x.chunk(2, dim=1)
                    return shuffle(torch.cat((a, self.right(b)), dim=1))
                return shuffle(torch.cat((self.left(x), self.right(x)), dim=1))

        return Unit()

    return nn.Sequential(
        nn.Conv2d(3, 24, 3, 2, 1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        unit(24, 2),
        unit(24, 1),
        unit(24, 1),
        nn.Conv2d(24, 64, 1),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 10),
    )


# --- symbolic input dims: from the data, or --input-shape --------------------------------------

STEM_MACS_16 = 25 * 8 * 3 * 49 + 25 * 4 * 8 * 9  # 16×16 input: 5×5 after the strided 7×7


def test_analyze_counts_symbolic_dims_at_the_given_shape_and_never_prints_zero(tmp_path, capsys):
    import graphs

    from onnxprune.cli import main

    path = tmp_path / "stem.onnx"
    onnx.save(graphs.strided_stem(), path)
    assert main(["analyze", str(path), "--input-shape", "x:1x3x16x16"]) == 0
    shown = capsys.readouterr().out
    assert f"{format_count(STEM_MACS_16)} MACs" in shown and "?" not in shown
    assert main(["analyze", str(path)]) == 0  # counted at 1×1: no size, no MACs to show
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[2] for row in rows[1:3]] == ["?", "?"]
    assert "unknown shape are not counted (inputs with symbolic dims? --input-shape" in rows[-1]
    assert main(["analyze", str(path), "--json", "-"]) == 0
    assert set(json.loads(capsys.readouterr().out)["unknown_shape_nodes"]) == {"c1", "r1", "c2"}


def test_prune_counts_macs_at_the_data_shape_or_the_given_one():
    import graphs

    import onnxprune

    model = graphs.strided_stem()
    data = {"x": np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)}
    options = {"ratio": 0.5, "round_to": 1}
    from_data = onnxprune.prune(model, data=data, **options).report.macs
    given = onnxprune.prune(model, input_shapes={"x": (1, 3, 16, 16)}, **options).report
    assert from_data == given.macs == (STEM_MACS_16, STEM_MACS_16 // 2)
    with pytest.raises(UsageError, match="--input-shape names \\['y'\\]"):
        onnxprune.prune(model, input_shapes={"y": (1, 3, 16, 16)})


def test_counting_a_model_with_an_unknown_op_writes_no_file(tmp_path, monkeypatch):
    import graphs

    monkeypatch.chdir(tmp_path)  # ORT's symbolic inference saves incomplete models to the cwd
    cost = count(graphs.blocked_by("Mystery"))
    assert cost.unknown == ("c2",) and cost.macs == 64 * 8 * 27
    assert not list(tmp_path.iterdir())
