"""Axes of size one behind a computed Expand target (ops/shape_values.py), against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import run_model
from onnx import TensorProto, helper

from onnxprune.graph.load import infer_shapes
from onnxprune.ops.shape_values import dim_origin, entry_value, inferred_size, is_one


def _expand_model(middle: str) -> onnx.ModelProto:
    """y = Expand(x, Where(Equal(t, -1), 1, t)), t = [batch of x, MIDDLE, 4]: torch's `expand`
    with a -1-or-size entry. MIDDLE is "-1" (a constant: y keeps x's axis 1, of size 1) or
    "rows" (the size of another input's axis 0: y's axis 1 is that size)."""
    constants = {
        "minus": np.array([-1], np.int64),
        "minus3": -np.ones(3, np.int64),
        "four": np.array([4], np.int64),
        "ones": np.ones(3, np.int64),
        "zero": np.array([0], np.int64),
    }
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Gather", ["sx", "zero"], ["b"]),
        helper.make_node("Shape", ["r"], ["sr"]),
        helper.make_node("Gather", ["sr", "zero"], ["rows"]),
        helper.make_node(
            "Concat", ["b", "minus" if middle == "-1" else "rows", "four"], ["t"], axis=0
        ),
        helper.make_node("Equal", ["t", "minus3"], ["eq"]),
        helper.make_node("Where", ["eq", "ones", "t"], ["target"]),
        helper.make_node("Expand", ["x", "target"], ["e"]),
        helper.make_node("Cast", ["e"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "expand",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 4]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, ["rows"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("middle", ["-1", "rows"])
def test_is_one_only_where_constants_decide_a_one(middle):
    model = _expand_model(middle)
    graph = gs.import_onnx(model)
    y = graph.tensors()["y"]
    assert not isinstance(y.shape[1], int)  # shape inference alone does not know
    feeds = {"x": np.zeros((2, 1, 4), np.float32), "r": np.zeros(3, np.float32)}
    actual = run_model(model, feeds)["y"].shape
    assert is_one(y, 1) == (actual[1] == 1) == (middle == "-1")
    assert is_one(y, -2) == is_one(y, 1)
    assert not is_one(y, 0) and not is_one(y, 2)
    assert entry_value(graph.tensors()["target"], 2) == 4
    assert entry_value(graph.tensors()["target"], 0) is None


def _positional_add(end_from: str, projected: bool = False) -> gs.Graph:
    """y = h + pos[:, :n] with h (batch, seq, 4), pos a constant (1, 8, 4) and n the seq of h
    (`end_from` "h") or the length of another input o (batch, len) (`end_from` "o"), after shape
    inference (which gives y new symbols for both axes). `projected`: pos[:, :n] · W (4 × 4)
    is added instead, as cob's entry MatMul after a position-embedding Gather writes it."""
    positions = np.arange(32, dtype=np.float32).reshape(1, 8, 4)
    nodes = [
        helper.make_node("Shape", [end_from], ["n"], start=1, end=2),
        helper.make_node("Slice", ["pos", "zero", "n", "one"], ["p0" if projected else "p"]),
        helper.make_node("Add", ["h", "p"], ["y"]),
    ]
    if projected:
        nodes.insert(2, helper.make_node("MatMul", ["p0", "w"], ["p"]))
    graph = helper.make_graph(
        nodes,
        "positional",
        [
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", 4]),
            helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch", "len"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            onnx.numpy_helper.from_array(positions, "pos"),
            onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
            onnx.numpy_helper.from_array(np.array([1], np.int64), "one"),
            onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return infer_shapes(gs.import_onnx(model))


@pytest.mark.parametrize("projected", [False, True], ids=["plain", "projected"])
def test_a_broadcast_with_a_slice_up_to_the_same_dim_keeps_it(projected):
    """pos[:, :seq] has at most seq rows (1 on axis 0), so h + pos[:, :seq] has h's batch and
    seq whenever it runs, through a MatMul by a constant too; a slice up to another input's
    length proves nothing (seq = 1 broadcasts to it)."""
    graph = _positional_add("h", projected)
    y = graph.tensors()["y"]
    assert y.shape[:2] != ["batch", "seq"]  # what inference alone says
    assert (dim_origin(y, 0), dim_origin(y, 1), dim_origin(y, 2)) == ("batch", "seq", 4)
    other = _positional_add("o").tensors()["y"]
    assert dim_origin(other, 0) == "batch" and dim_origin(other, 1) is None


@pytest.mark.parametrize("op", ["Gelu", "Sigmoid", "HardSwish", "Clip", "Erf"])
def test_dims_are_proven_through_elementwise_activations(op):
    """An activation keeps its input's shape, so the dims of h + pos[:, :seq] proven above
    stay proven behind it (shape inference names new symbols there: dynamo's DistilBERT loses
    its second layer's batch and sequence behind a Gelu)."""
    graph = _positional_add("h")
    y = graph.tensors()["y"]
    out = gs.Variable(f"{op}_out", dtype=np.float32, shape=["unk_a", "unk_b", 4])
    graph.nodes.append(gs.Node(op, op.lower(), inputs=[y], outputs=[out]))
    assert (dim_origin(out, 0), dim_origin(out, 1), dim_origin(out, 2)) == ("batch", "seq", 4)


def test_dims_are_proven_through_an_rmsnorm_written_out():
    """x / √(Σx²/d + ε) over the last axis (the form cob's conversion writes): the sum keeps
    its dims (keepdims), so the output has x's proven batch and seq; a sum over axis 1 does
    not keep seq (whatever symbol inference gave it)."""
    graph = _positional_add("h")
    y = graph.tensors()["y"]

    def op(kind: str, inputs: list, shape: list, **attrs) -> gs.Variable:
        out = gs.Variable(f"{kind}_{len(graph.nodes)}", dtype=np.float32, shape=shape)
        graph.nodes.append(gs.Node(kind, out.name, attrs, inputs, [out]))
        return out

    const = lambda v: gs.Constant(f"c{len(graph.nodes)}", np.array(v, np.float32))  # noqa: E731
    axes = gs.Constant("last", np.array([-1], np.int64))
    total = op("ReduceSum", [op("Mul", [y, y], ["a", "b", 4]), axes], ["c", "d", 1], keepdims=1)
    root = op("Sqrt", [op("Add", [op("Div", [total, const(4.0)], ["e", "f", 1]), const(1e-6)],
                          ["g", "h", 1])], ["i", "j", 1])  # fmt: skip
    out = op("Div", [y, root], ["k", "l", 4])
    assert (dim_origin(out, 0), dim_origin(out, 1), dim_origin(out, 2)) == ("batch", "seq", 4)
    across = op("ReduceSum", [y, gs.Constant("one_axis", np.array([1], np.int64))], ["m", "n", 4])
    assert dim_origin(across, 0) == "batch" and dim_origin(across, 1) is None


_TARGETS = {  # the Reshape target of x (batch, seq, 8): its -1 stands for…
    "copies": ([0, 0, -1, 2], {}),  # 4, the 0s copying batch and seq
    "read_shape": (["batch", "seq", -1, 2], {"allowzero": 1}),  # 4, dynamo's form
    "static": ([-1, 8], {}),  # batch·seq: unproven
    "keeps_seq": ([0, -1, 2], {}),  # seq·4: unproven
    "leading": ([-1, "seq", 4], {}),  # batch·2: unproven
}


def _reshape_model(target: list, attrs: dict) -> gs.Graph:
    """y = Reshape(x, target), x (batch, seq, 8); "batch"/"seq" entries read from Shape(x)."""
    shape = gs.Variable("shape_x", np.int64, [3])
    nodes = [gs.Node("Shape", "shape", inputs=[gs.Variable("x", np.float32, ["batch", "seq", 8])],
                     outputs=[shape])]  # fmt: skip
    pieces = []
    for k, entry in enumerate(target):
        if isinstance(entry, str):
            piece = gs.Variable(f"piece{k}", np.int64, [1])
            index = gs.Constant(f"index{k}", np.array([["batch", "seq"].index(entry)], np.int64))
            nodes.append(gs.Node("Gather", f"gather{k}", inputs=[shape, index], outputs=[piece]))
        else:
            piece = gs.Constant(f"piece{k}", np.array([entry], np.int64))
        pieces.append(piece)
    vector = gs.Variable("target", np.int64, [len(target)])
    nodes.append(gs.Node("Concat", "concat", {"axis": 0}, pieces, [vector]))
    y = gs.Variable("y", np.float32, None)
    nodes.append(gs.Node("Reshape", "reshape", attrs, [nodes[0].inputs[0], vector], [y]))
    graph = gs.Graph(nodes, [nodes[0].inputs[0]], [y], opset=17)

    return infer_shapes(graph)


@pytest.mark.parametrize("case", list(_TARGETS))
def test_a_reshapes_minus_one_is_static_exactly_where_onnx_runtime_agrees(case):
    """`inferred_size` gives the -1's size exactly when it is the same at every batch and
    sequence length, and then ONNX Runtime's size; None where the size varies with them."""
    target, attrs = _TARGETS[case]
    graph = _reshape_model(target, attrs)
    node = next(n for n in graph.nodes if n.op == "Reshape")
    model = gs.export_onnx(graph)
    axis = target.index(-1)
    sizes = {
        run_model(model, {"x": np.zeros((b, s, 8), np.float32)})["y"].shape[axis]
        for b, s in [(1, 3), (2, 5), (3, 2)]
    }
    expected = sizes.pop() if len(sizes) == 1 else None
    assert inferred_size(node) == expected
    assert (expected is None) == (case in ("static", "keeps_seq", "leading"))
