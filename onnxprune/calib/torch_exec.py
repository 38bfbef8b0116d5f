"""ONNX→PyTorch interpreter: runs an ONNX graph with torch ops so autograd yields gradients.

ONNX Runtime gives activations but not gradients. Gradient-based criteria (Taylor, Fisher) and
later fine-tuning need both, so `TorchGraph` executes the ONNX nodes one by one with each op's
torch equivalent (its handler's `torch`, onnxprune/ops), keeping float initializers as leaf
tensors that can be differentiated or handed to an optimizer. `check_against_ort` guards the
interpreter: its forward pass must match ONNX Runtime before any gradient computed with it is
trusted. An op without a torch equivalent is refused, or with `freeze=True` (fine-tuning) run
by ONNX Runtime as a frozen step (`calib.ort_node`).

Importing this module is cheap and works without torch; torch is imported when a graph is built.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx.inliner

from onnxprune.errors import (
    DataError,
    InterpreterMismatchError,
    ModelLoadError,
    OnnxPruneError,
    UnsupportedOpError,
    UsageError,
)
from onnxprune.graph.external import tensor_values
from onnxprune.ops.registry import handler_for

if TYPE_CHECKING:
    import torch

    from onnxprune.ops.torch_support import OpNode

_DEFAULT_DOMAINS = ("", "ai.onnx")


def torch_available() -> bool:
    """True when torch is installed; does not import it."""
    return importlib.util.find_spec("torch") is not None


def _torch_support() -> Any:
    """The interpreter's helpers (ops/torch_support.py), or a one-line error when torch is
    missing."""
    if not torch_available():
        raise OnnxPruneError(
            "PyTorch is not installed; gradient-based methods need it",
            hint="pip install 'onnxprune[torch]'",
        )
    from onnxprune.ops import torch_support

    return torch_support


@dataclass(frozen=True)
class _Step:
    """One node ready to run: op function, its node description and tensor names."""

    fn: Callable[[OpNode, list], Any]
    node: OpNode
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version."""
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return entry.version
    raise ModelLoadError("model declares no ai.onnx opset import")


def _compile(node: onnx.NodeProto, index: int, opset: int, ops: Any) -> _Step:
    """Check one node against its handler and bind the handler's torch equivalent."""
    name = node.name or f"#{index}"
    handler = handler_for(node)
    fn = None if handler is None else handler.torch(node.op_type)
    if fn is None:
        op = node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
        raise UnsupportedOpError(
            f"op {op} (node '{name}') is not supported by the torch interpreter"
        )
    used = [i for i, out in enumerate(node.output) if out]
    limit = handler.max_outputs(node.op_type)
    if limit is not None and used and used[-1] >= limit:
        raise UnsupportedOpError(
            f"{node.op_type} node '{name}': output {used[-1]} "
            f"('{node.output[used[-1]]}') is not supported by the torch "
            "interpreter"
        )
    attrs = ops.parse_attrs(node)
    spec = ops.OpNode(node.op_type, name, attrs, opset, len(node.output))
    return _Step(fn, spec, tuple(node.input), tuple(node.output))


def _compile_all(
    model: onnx.ModelProto, opset: int, ops: Any, freeze: bool
) -> tuple[list[_Step], tuple[str, ...]]:
    """Every node bound to its op function; with `freeze`, the nodes without a torch equivalent
    become ONNX Runtime steps (their names are returned) instead of an UnsupportedOpError."""
    from onnxprune.calib.ort_node import OrtNode, output_types

    steps, frozen, types = [], [], None
    for index, node in enumerate(model.graph.node):
        try:
            steps.append(_compile(node, index, opset, ops))
        except UnsupportedOpError:
            if not freeze:
                raise
            types = output_types(model) if types is None else types
            spec = ops.OpNode(node.op_type, node.name or f"#{index}", {}, opset, len(node.output))
            fn = OrtNode(node, model, types)
            steps.append(_Step(fn, spec, tuple(node.input), tuple(node.output)))
            frozen.append(spec.name)
    return steps, tuple(frozen)


class TorchGraph:
    """An ONNX graph executable with torch autograd.

    `params` maps each float initializer name to a float32 leaf tensor with requires_grad=True
    (an optimizer may update them in place); other initializers and Constant node values live in
    `constants`. Integer tensors are int64 so shape arithmetic stays exact. With `freeze`, nodes
    without a torch equivalent run in ONNX Runtime without gradient; `frozen` names them.
    """

    def __init__(
        self, model: onnx.ModelProto, *, device: str | torch.device = "cpu", freeze: bool = False
    ) -> None:
        import torch

        ops = _torch_support()
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        opset, graph = _default_opset(model), model.graph
        steps, self.frozen = _compile_all(model, opset, ops, freeze)
        self.device = torch.device(device)
        self.params: dict[str, torch.Tensor] = {}
        self.constants: dict[str, torch.Tensor] = {}
        for init in graph.initializer:
            tensor = ops.to_tensor(tensor_values(init), self.device)
            if tensor.is_floating_point():
                self.params[init.name] = tensor.requires_grad_(True)
            else:
                self.constants[init.name] = tensor
        for step in steps:
            if step.node.op_type == "Constant":
                self.constants[step.outputs[0]] = step.fn(step.node, []).to(self.device)
        self._steps = [s for s in steps if s.node.op_type != "Constant"]
        self.feedable = [i.name for i in graph.input]
        self.input_names = [
            n for n in self.feedable if n not in self.params and n not in self.constants
        ]
        self.output_names = [o.name for o in graph.output]
        self._uses = Counter(name for s in self._steps for name in s.inputs if name)
        self._known = set(self.feedable) | set(self.params) | set(self.constants)
        self._known.update(name for s in self._steps for name in s.outputs if name)

    def parameters(self) -> list[torch.Tensor]:
        """The float initializers as a list, e.g. for `torch.optim.SGD(graph.parameters())`."""
        return list(self.params.values())

    def params_numpy(self) -> dict[str, np.ndarray]:
        """Current parameter values as float32 numpy arrays (to write back into the model)."""
        return {k: v.detach().cpu().numpy() for k, v in self.params.items()}

    def _feed(self, name: str, value: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A feed as a tensor on the graph's device; torch tensors keep their autograd history."""
        import torch

        if name not in self.feedable:
            raise DataError(
                f"feed '{name}' is not an input of the model "
                f"(inputs: {', '.join(self.input_names)})"
            )
        if not isinstance(value, torch.Tensor):
            return _torch_support().to_tensor(np.asarray(value), self.device)
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()
        return value.to(self.device)

    def run(
        self, feeds: Mapping[str, np.ndarray | torch.Tensor], *, keep: Iterable[str] = ()
    ) -> dict[str, torch.Tensor]:
        """Execute the graph; return its outputs plus the `keep` tensors (grads retained).

        Intermediates are dropped as soon as their last consumer ran, unless kept. Float feeds
        named in `keep` are made to require grad; pass a tensor with requires_grad=True to get
        the input gradient without keeping it.
        """
        import torch

        keep = list(dict.fromkeys(keep))
        unknown = [k for k in keep if k not in self._known]
        if unknown:
            raise UsageError(f"keep names unknown tensor '{unknown[0]}'")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DataError(f"missing feed for model input '{missing[0]}'")
        env: dict[str, torch.Tensor] = {**self.constants, **self.params}
        env.update((name, self._feed(name, value)) for name, value in feeds.items())
        for name in keep:  # a kept float feed gets a .grad too
            tensor = env.get(name)
            if name in feeds and tensor.is_floating_point() and not tensor.requires_grad:
                env[name] = tensor.detach().requires_grad_(torch.is_grad_enabled())
        protected = set(keep) | set(self.output_names)
        uses = Counter(self._uses)
        for step in self._steps:
            self._execute(step, env, protected, uses)
        for name in keep:
            tensor = env[name]
            if tensor.requires_grad and not tensor.is_leaf:
                tensor.retain_grad()
        return {name: env[name] for name in [*self.output_names, *keep]}

    __call__ = run

    @staticmethod
    def _execute(
        step: _Step, env: dict[str, torch.Tensor], protected: set[str], uses: Counter[str]
    ) -> None:
        """Run one node, store its outputs and free inputs/outputs nobody needs any more."""
        try:
            args = [env[name] if name else None for name in step.inputs]
        except KeyError as exc:
            raise OnnxPruneError(
                f"node '{step.node.name}' ({step.node.op_type}) reads tensor "
                f"{exc} that is neither an input nor produced earlier"
            ) from None
        try:
            result = step.fn(step.node, args)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxPruneError(
                f"torch interpreter failed at node '{step.node.name}' "
                f"({step.node.op_type}): {first}"
            ) from exc
        outs = result if isinstance(result, tuple) else (result,)
        for name, tensor in zip(step.outputs, outs, strict=False):
            if name and (uses[name] or name in protected):
                env[name] = tensor
        for name in step.inputs:
            if name:
                uses[name] -= 1
                if uses[name] <= 0 and name not in protected:
                    env.pop(name, None)


def _ort_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds cast to the element types the model declares, as ONNX Runtime requires."""
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    out = {}
    for name, value in feeds.items():
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        if types.get(name):
            arr = arr.astype(onnx.helper.tensor_dtype_to_np_dtype(types[name]), copy=False)
        out[name] = arr
    return out


def _compare(name: str, got: np.ndarray, ref: np.ndarray, rtol: float, atol: float) -> None:
    """Raise InterpreterMismatchError unless max|got-ref| <= atol + rtol * max|ref|."""
    if got.shape != ref.shape:
        raise InterpreterMismatchError(
            f"output '{name}': torch interpreter shape {got.shape} "
            f"!= ONNX Runtime shape {ref.shape}"
        )
    if ref.size == 0:
        return
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    both_nan = np.isnan(got) & np.isnan(ref)
    diff = np.where(both_nan, 0.0, np.abs(got - ref))
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite = np.abs(ref[np.isfinite(ref)])
    scale = float(finite.max()) if finite.size else 0.0
    dev, tol = float(diff.max()), atol + rtol * scale
    if dev > tol:
        raise InterpreterMismatchError(
            f"output '{name}': torch interpreter deviates from ONNX "
            f"Runtime by max abs {dev:.3g} (tolerance {tol:.3g}, "
            f"max |ref| {scale:.3g})"
        )


def check_against_ort(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    graph: TorchGraph | None = None,
) -> TorchGraph:
    """Run `graph` (built from `model` if not given) and ONNX Runtime on the same feeds.

    Every graph output must satisfy max abs deviation <= atol + rtol * max|ORT output|; the first
    that does not raises InterpreterMismatchError. Returns the graph so callers can reuse it.
    """
    import torch

    from onnxprune.graph.session import inference_session

    graph = TorchGraph(model) if graph is None else graph
    with torch.no_grad():
        got = graph.run(feeds)
    session = inference_session(model)
    names = [o.name for o in session.get_outputs()]
    refs = session.run(names, _ort_feeds(model, feeds))
    for name, ref in zip(names, refs, strict=True):
        _compare(name, got[name].detach().cpu().numpy(), np.asarray(ref), rtol, atol)
    return graph
