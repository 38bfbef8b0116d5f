"""The zoo benchmark's independent MAC counter (benchmarks/zoo.py) against hand counts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.zoo import independent_macs
from onnxprune.measure.cost import count


def _tiny_model() -> onnx.ModelProto:
    """x[1,3,8,8] → Conv 4×3×3×3 pad 1 stride 2 (→ 1×4×4×4) → grouped Conv 4×2×1×1 group 2
    → Flatten (64) → Gemm transB 10×64 → MatMul with a 10×5 weight, and the grouped Conv's
    output → ConvTranspose 4×3×2×2 stride 2 (→ 1×3×8×8) as a second output, the outer product
    Einsum of the Gemm's and MatMul's outputs as a third; batch symbolic."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((4, 3, 3, 3)),
        "w2": rng.standard_normal((4, 2, 1, 1)),
        "w3": rng.standard_normal((10, 64)),
        "w4": rng.standard_normal((10, 5)),
        "w5": rng.standard_normal((4, 3, 2, 2)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["a", "w2"], ["b"], group=2),
        helper.make_node("Flatten", ["b"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "w4"], ["y"]),
        helper.make_node("ConvTranspose", ["b", "w5"], ["t"], strides=[2, 2]),
        helper.make_node("Einsum", ["g", "y"], ["e"], equation="bi,bj->bij"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5]),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, ["n", 3, 8, 8]),
            helper.make_tensor_value_info("e", TensorProto.FLOAT, ["n", 10, 5]),
        ],
        [numpy_helper.from_array(w.astype(np.float32), k) for k, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_independent_macs_match_a_hand_count() -> None:
    x = np.zeros((1, 3, 8, 8), np.float32)
    conv1 = (4 * 4 * 4) * (3 * 3 * 3)  # output elements × C_in·kH·kW
    conv2 = (4 * 4 * 4) * 2  # grouped: C_in/group = 2
    gemm = 10 * 64
    matmul = 5 * 10
    transposed = (4 * 4 * 4) * (3 * 2 * 2)  # input elements × C_out·kH·kW
    outer = 10 * 5  # one product per (i, j)
    total = conv1 + conv2 + gemm + matmul + transposed + outer
    assert independent_macs(_tiny_model(), {"x": x}) == total


def test_independent_macs_scale_with_the_batch_ort_runs() -> None:
    model = _tiny_model()
    one = independent_macs(model, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    three = independent_macs(model, {"x": np.zeros((3, 3, 8, 8), np.float32)})
    assert three == 3 * one


def test_the_tools_count_agrees_on_the_tiny_model() -> None:
    model = _tiny_model()
    x = np.zeros((1, 3, 8, 8), np.float32)
    assert count(model).macs == independent_macs(model, {"x": x})


def test_independent_macs_of_a_bidirectional_lstm() -> None:
    """x[T=5, n, 3] → bidirectional LSTM, H = 4: per step and batch row, every direction's
    W (4 gates · 4 units × 3 inputs) and R (16 × 4) once."""
    rng = np.random.default_rng(1)
    weights = {"W": (2, 16, 3), "R": (2, 16, 4)}
    node = helper.make_node(
        "LSTM", ["x", "W", "R"], ["y"], hidden_size=4, direction="bidirectional"
    )
    graph = helper.make_graph(
        [node],
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 2, "n", 4])],
        [
            numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), k)
            for k, s in weights.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.zeros((5, 2, 3), np.float32)
    assert independent_macs(model, {"x": x}) == 5 * 2 * (2 * 16 * 3 + 2 * 16 * 4)
    assert count(model, input_shapes={"x": (5, 2, 3)}).macs == independent_macs(model, {"x": x})


@pytest.mark.parametrize("rank", [3, 4])
def test_independent_macs_of_grouped_query_attention(rank: int) -> None:
    """Opset-23 Attention, 4 query heads over 2 key/value heads, S = 5 queries, L = 7 keys,
    D = 8: every query head takes S·L·D for q·kᵀ and as many for weights·v; the tool's count
    (the op's handler) agrees, for (B, S, H·D) inputs as for (B, H, S, D)."""
    heads, kv_heads, s, length, d = 4, 2, 5, 7, 8

    def spec(name: str, h: int, n: int) -> onnx.ValueInfoProto:
        shape = ["b", n, h * d] if rank == 3 else ["b", h, n, d]
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    attrs = {"q_num_heads": heads, "kv_num_heads": kv_heads} if rank == 3 else {}
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], **attrs)
    inputs = [spec("q", heads, s), spec("k", kv_heads, length), spec("v", kv_heads, length)]
    graph = helper.make_graph([node], "attention", inputs, [spec("y", heads, s)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    rng = np.random.default_rng(2)
    dims = {"q": (heads, s), "k": (kv_heads, length), "v": (kv_heads, length)}
    feeds = {
        name: rng.standard_normal((2, n, h * d) if rank == 3 else (2, h, n, d), np.float32)
        for name, (h, n) in dims.items()
    }
    expected = 2 * heads * s * length * (d + d)
    assert independent_macs(model, feeds) == expected
    shapes = {name: value.shape for name, value in feeds.items()}
    assert count(model, input_shapes=shapes).macs == expected
