"""One ONNX node run by ONNX Runtime inside the torch interpreter: a frozen step.

Fine-tuning should train what the interpreter can run rather than refuse a whole graph for one op
it lacks. Such a node runs alone in ORT on its inputs, detached: its outputs are constants to
autograd, so no gradient flows through it and whatever reaches the loss only through it is not
trained (it is frozen). The node's own model is built once per combination of input dtypes from
the node itself, the model's opset imports and its output types from shape inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxprune.errors import OnnxPruneError, UnsupportedOpError, first_line


class OrtNode:
    """A callable op function (`fn(spec, args)`, as the interpreter's op table has) that runs
    `node` in ONNX Runtime and returns its outputs as torch tensors without gradient history."""

    def __init__(
        self, node: onnx.NodeProto, model: onnx.ModelProto, types: Mapping[str, int]
    ) -> None:
        missing = [name for name in node.output if name and not types.get(name)]
        if missing:
            raise UnsupportedOpError(
                f"op {_op(node)} (node '{node.name}') is not supported by the torch "
                f"interpreter, and the type of its output '{missing[0]}' is unknown, so ONNX "
                "Runtime cannot run it alone either"
            )
        self.node, self.types = node, types
        self.opsets, self.ir_version = list(model.opset_import), model.ir_version
        self._sessions: dict[tuple, Any] = {}
        self._check(types)

    def _check(self, types: Mapping[str, int]) -> None:
        """Open a session for the declared input types now, so that an op ONNX Runtime cannot
        run either is refused when the graph is built, not in the middle of training."""
        declared = {n: types.get(n) for n in self.node.input if n}
        if not all(declared.values()):
            return  # typed on first use
        feeds = {n: np.zeros(0, helper.tensor_dtype_to_np_dtype(t)) for n, t in declared.items()}
        try:
            self._session(feeds)
        except Exception as exc:  # ORT raises several pybind exception types
            raise UnsupportedOpError(
                f"op {_op(self.node)} (node '{self.node.name}') is supported neither by the "
                f"torch interpreter nor by ONNX Runtime alone: {first_line(exc, 160)}"
            ) from exc

    def __call__(self, spec: Any, args: Sequence[Any]) -> tuple:
        from onnxprune.ops.torch_support import to_tensor

        arrays = [None if a is None else a.detach().cpu().numpy() for a in args]
        feeds = {n: a for n, a in zip(self.node.input, arrays, strict=False) if n}
        try:
            outputs = self._session(feeds).run([n for n in self.node.output if n], feeds)
        except Exception as exc:  # ORT raises several pybind exception types
            raise OnnxPruneError(
                f"ONNX Runtime failed at frozen node '{self.node.name}' ({_op(self.node)}): "
                f"{first_line(exc, 160)}"
            ) from exc
        return tuple(to_tensor(np.asarray(o)) for o in outputs)

    def _session(self, feeds: Mapping[str, np.ndarray]) -> Any:
        """The node's ORT session for these input dtypes (built on first use)."""
        from onnxprune.measure.verify import session_for

        key = tuple((name, a.dtype.str) for name, a in feeds.items())
        if key not in self._sessions:
            self._sessions[key] = session_for(self._model(feeds))
        return self._sessions[key]

    def _model(self, feeds: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        """A model of just the node, its inputs typed as fed, its outputs as inferred."""
        inputs = [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
            for n, a in feeds.items()
        ]
        outputs = [
            helper.make_tensor_value_info(n, self.types[n], None) for n in self.node.output if n
        ]
        graph = helper.make_graph([self.node], f"frozen_{self.node.name}", inputs, outputs)
        return helper.make_model(graph, opset_imports=self.opsets, ir_version=self.ir_version)


def output_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can type (inputs, initializers, values)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {i.name: i.data_type for i in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _op(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
