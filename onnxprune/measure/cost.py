"""Static cost model: multiply-accumulates (MACs), parameters and element-wise work per node.

MACs are what pruning removes in proportion to the kept channels, so they give the *ideal* speedup
that the latency benchmark is compared against. Pools, activations, normalizations and other
element-wise ops are counted separately (`elementwise`, one per output element, times the kernel
size for pools) because they are memory-bound and would blur the MAC figure.

Shapes come from ONNX shape inference on a copy of the model whose symbolic dims are fixed (to 1,
or to `input_shapes` where given). Nodes whose shapes stay unknown are listed in `Cost.unknown`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from onnxprune.errors import UsageError
from onnxprune.graph.load import (
    FLOAT_TYPES,
    copy_function_shapes,
    export,
    fold_constants,
    weightless_copy,
)
from onnxprune.ops.registry import Shape, ShapeOf, handler_for, node_attrs


@dataclass(frozen=True)
class NodeCost:
    """Cost of one node: MACs, parameters it is first to consume, element-wise operations."""

    name: str
    op_type: str
    macs: int
    params: int
    elementwise: int


@dataclass(frozen=True)
class Cost:
    """Whole-model cost; `unknown` names the nodes whose shapes could not be inferred."""

    macs: int
    params: int
    elementwise: int
    per_node: tuple[NodeCost, ...]
    unknown: tuple[str, ...] = ()


class _UnknownShape(Exception):
    """A shape needed for counting is not known."""


def count(
    model: onnx.ModelProto, *, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> Cost:
    """Count MACs, parameters and element-wise work of `model` (symbolic dims counted as 1)."""
    shapes = infer_static_shapes(model, input_shapes)
    param_sizes = _param_sizes(model)
    seen: set[str] = set()
    nodes: list[NodeCost] = []
    unknown: list[str] = []
    for index, node in enumerate(model.graph.node):
        if node.op_type == "Constant":
            continue
        name = node.name or f"{node.op_type}_{index}"
        params = _first_use_params(node, param_sizes, seen)
        try:
            macs, elementwise = _node_work(node, _shape_getter(shapes))
        except _UnknownShape:
            macs, elementwise = 0, 0
            unknown.append(name)
        nodes.append(NodeCost(name, node.op_type, macs, params, elementwise))
    return Cost(
        macs=sum(n.macs for n in nodes),
        params=sum(n.params for n in nodes),
        elementwise=sum(n.elementwise for n in nodes),
        per_node=tuple(nodes),
        unknown=tuple(unknown),
    )


def format_count(n: float) -> str:
    """Human-readable count with 4 significant digits: 1230000 -> '1.23M', 456700 -> '456.7K'."""
    if abs(n) < 1000:
        return f"{n:.4g}" if isinstance(n, float) else str(n)
    for scale, unit in ((1e3, "K"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
        text = f"{n / scale:.4g}"
        if abs(float(text)) < 1000 or unit == "T":
            return text + unit
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- shapes


def infer_static_shapes(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int | None, ...]]:
    """Shapes of all tensors once symbolic input dims are fixed (to 1 or `input_shapes`)."""
    work = weightless_copy(model)
    _fix_input_dims(work, input_shapes or {})
    del work.graph.value_info[:]
    work = _inferred(work)
    shapes = _declared(work)
    if not _complete(work, shapes):
        work = _symbolically_inferred(work)
        shapes = _declared(work)
    while not _complete(work, shapes) and (folded := _fold_shape_arithmetic(work)):
        work, constants = folded
        work = _inferred(work)
        shapes = {**shapes, **constants, **_declared(work)}
    for init in (*work.graph.initializer, *model.graph.initializer):
        shapes[init.name] = tuple(init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    return shapes


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (with data propagation and through shape-preserving function calls);
    on failure, what the declared shapes allow, the rest landing in `Cost.unknown`."""
    with contextlib.suppress(onnx.shape_inference.InferenceError, ValueError):
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        while copy_function_shapes(model):  # through TSRA / RMSNorm function calls
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return model


def _declared(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """The shapes `model`'s value infos state (None for symbolic or negative dims)."""
    shapes = {}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                for d in vi.type.tensor_type.shape.dim
            )
    return shapes


def _complete(model: onnx.ModelProto, shapes: dict[str, tuple[int | None, ...]]) -> bool:
    """True when every node output has a fully known shape."""
    return all(
        name in shapes and None not in shapes[name]
        for node in model.graph.node
        for name in node.output
        if name
    )


def _symbolically_inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's symbolic shape inference, which computes shape arithmetic (Shape → Gather
    → Div → Concat → Reshape) that ONNX's data propagation gives up on, in one pass; `model`
    itself where it is unavailable (it needs sympy) or fails on the model.

    These are the steps of its public `infer_shapes` without the end: where some shape stays
    unknown, that saves the model (weights too) into the working directory and raises, and here
    the shapes it did find are wanted."""
    SymbolicShapeInference = _symbolic_shape_inference()  # noqa: N806 - a class
    if SymbolicShapeInference is None:
        return model
    log = logging.getLogger(SymbolicShapeInference.__module__)
    level = log.level
    log.setLevel(logging.ERROR)  # one warning per dim it cannot compare (Swin-T: two dozen)
    try:
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        return inference.out_mp_
    except Exception:  # noqa: BLE001 - any failure leaves the slower fallback to try
        return model
    finally:
        log.setLevel(level)


@functools.cache
def _symbolic_shape_inference() -> type | None:
    """ONNX Runtime's `SymbolicShapeInference` class, or None where it cannot be loaded (it needs
    sympy). Its module is loaded from its file unless already imported: importing it by name runs
    `onnxruntime.tools`' __init__, which imports torch wherever torch is installed (2–3 s of
    every run that counts a transformer's MACs, for a module that needs only onnx and sympy)."""
    name = "onnxruntime.tools.symbolic_shape_infer"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.find_spec("onnxruntime")
        path = Path(spec.origin).parent / "tools" / "symbolic_shape_infer.py" if spec else None
        if path is None or not path.is_file():
            return None
        spec = importlib.util.spec_from_file_location(f"onnxprune._ort_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError:
            return None
    return getattr(module, "SymbolicShapeInference", None)


def _fold_shape_arithmetic(
    model: onnx.ModelProto,
) -> tuple[onnx.ModelProto, dict[str, Shape]] | None:
    """`model` with its now-static shape computations folded, and the shapes of the tensors that
    folded; None when nothing more folds.

    ONNX's data propagation stops at ops such as Div, so a torchvision channel shuffle's
    `Reshape(x, [N, g, C / g, H, W])` (dims read by Shape → Gather) leaves every later shape
    unknown; with the input dims fixed, graphsurgeon folds such Shape subgraphs into constants.
    Each fold + inference round reaches one Reshape further, until nothing is left to fold: the
    fallback where symbolic inference is unavailable or leaves shapes unknown (slow: a round per
    shuffle).
    """
    graph = gs.import_onnx(model)
    before = _constants(graph)
    after = _constants(fold_constants(graph))
    if after.keys() <= before.keys():
        return None
    return export(graph.cleanup()), after


def _constants(graph: gs.Graph) -> dict[str, Shape]:
    return {
        name: tuple(tensor.shape)
        for name, tensor in graph.tensors().items()
        if isinstance(tensor, gs.Constant)
    }


def _fix_input_dims(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> None:
    """Replace symbolic/missing input dims by 1, or whole shapes by the given overrides."""
    weights = {init.name for init in model.graph.initializer}
    inputs = {vi.name: vi for vi in model.graph.input if vi.name not in weights}
    extra = sorted(set(input_shapes) - set(inputs))
    if extra:
        raise UsageError(f"--input-shape names {extra} but the model inputs are {sorted(inputs)}")
    for name, vi in inputs.items():
        dims = vi.type.tensor_type.shape.dim
        if name in input_shapes:
            _override_dims(name, dims, input_shapes[name])
            continue
        for dim in dims:
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = 1


def _override_dims(name: str, dims: Iterable, shape: tuple[int, ...]) -> None:
    dims = list(dims)
    if dims and len(dims) != len(shape):
        raise UsageError(
            f"input '{name}' has rank {len(dims)} but --input-shape gives {len(shape)} dims"
        )
    for dim, value in zip(dims, shape, strict=False):
        dim.Clear()
        dim.dim_value = int(value)


def _shape_getter(shapes: dict[str, tuple[int | None, ...]]) -> ShapeOf:
    def shape_of(name: str) -> Shape:
        shape = shapes.get(name)
        if not name or shape is None or any(d is None for d in shape):
            raise _UnknownShape(name)
        return shape  # type: ignore[return-value]

    return shape_of


# ----------------------------------------------------------------------------- params


def _param_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Element counts of float initializers, of the integer tensors a DequantizeLinear reads
    (quantized weights and biases), and of float Constant-node outputs."""
    dequantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    sizes = {
        init.name: math.prod(init.dims)
        for init in model.graph.initializer
        if init.data_type in FLOAT_TYPES or init.name in dequantized
    }
    for node in model.graph.node:
        if node.op_type != "Constant" or not node.attribute:
            continue
        attr = node.attribute[0]
        if attr.name == "value" and attr.t.data_type in FLOAT_TYPES:
            sizes[node.output[0]] = math.prod(attr.t.dims)
        elif attr.name == "value_floats":
            sizes[node.output[0]] = len(attr.floats)
        elif attr.name == "value_float":
            sizes[node.output[0]] = 1
    return sizes


def _first_use_params(node: onnx.NodeProto, sizes: dict[str, int], seen: set[str]) -> int:
    """Parameters this node consumes that no earlier node consumed (each tensor counted once)."""
    total = 0
    for name in node.input:
        if name in sizes and name not in seen:
            seen.add(name)
            total += sizes[name]
    return total


# ----------------------------------------------------------------------------- work per node


def _node_work(node: onnx.NodeProto, shape_of: ShapeOf) -> tuple[int, int]:
    """(MACs, element-wise ops) of one node; raises _UnknownShape when a needed shape is missing."""
    handler = handler_for(node)
    macs = 0 if handler is None else handler.macs(node, shape_of)
    if macs:
        return macs, 0
    op = node.op_type
    if op in _POOLS:
        kernel = math.prod(node_attrs(node).get("kernel_shape", [1]))
        return 0, _numel(shape_of(node.output[0])) * kernel
    if op in _INPUT_SIZED:
        return 0, _numel(shape_of(node.input[0]))
    if op in ELEMENTWISE_OPS:
        return 0, _numel(shape_of(node.output[0]))
    return 0, 0


_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_INPUT_SIZED = frozenset(
    {
        "GlobalAveragePool",
        "GlobalMaxPool",
        "GlobalLpPool",
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
        "ArgMax",
        "ArgMin",
    }
)
ELEMENTWISE_OPS = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Softplus",
        "Softsign",
        "Mish",
        "ThresholdedRelu",
        "Clip",
        "Erf",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Neg",
        "Abs",
        "Sign",
        "Floor",
        "Ceil",
        "Round",
        "Sin",
        "Cos",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "Where",
        "Equal",
        "Less",
        "LessOrEqual",
        "Greater",
        "GreaterOrEqual",
        "And",
        "Or",
        "Xor",
        "Not",
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "LRN",
        "Softmax",
        "LogSoftmax",
        "Hardmax",
        "Resize",
        "Upsample",
        "DequantizeLinear",
        "QuantizeLinear",
    }
)


def _numel(shape: Shape) -> int:
    return math.prod(shape)
