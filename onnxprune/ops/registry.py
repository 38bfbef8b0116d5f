"""One handler per op family, looked up by (domain, op type).

A Handler holds what onnxprune knows about an op: which channels it creates (`produce`), how a
group's channels flow through it (`step`), whether it commutes with a change of basis of them
(`rotation`), which axis of its weight indexes its outputs (`out_axis`), its multiply-
accumulates (`macs`), its torch equivalent for the interpreter (`torch`) and the attribute
fix-ups the rewriter needs (`prepare`, `finish`). Each method has a default that claims nothing:
an op without a handler, or a handler without a `step`, blocks the group with a reason; one
without `produce` creates no group; one without `rotation` does not commute; one without `macs`
counts none; one without `torch` is not run by the interpreter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import onnx_graphsurgeon as gs
from onnx import helper

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.flow import Output, State, Step, block

if TYPE_CHECKING:
    import onnx

    from onnxprune.ops.torch_support import TorchOp

Shape = tuple[int, ...]
ShapeOf = Callable[[str], Shape]
"""A tensor name → its static shape (raises where the shape is unknown), for `macs`."""


class Handler:
    """Defaults for an op that onnxprune knows nothing about; subclasses override what applies.

    `nonlinear`: an elementwise nonlinearity (the first one a group passes is where IPPRO's
    offset goes). `scaled`: a norm whose output carries a per-channel scale, so the energies its
    divisor sees are those of its input. `strided`: `step` follows channels that lie every
    `State.stride` positions (behind a channel shuffle); any other handler is not asked then.
    """

    nonlinear: bool = False
    scaled: bool = False
    strided: bool = False

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        """How the group's `channels`, entering at input `index` in `state`, flow through."""
        return block(unknown(node))

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        """Why the node, passing the channels on as `result`, does not commute with an
        orthogonal change of basis of them (METHODS.md §1.2); None where it does."""
        return f"{node.op} '{node.name}' is not rotation-equivariant"

    def invariant(self, node: gs.Node, state: State) -> str | None:
        """ "tsra" or "rmsnorm" where the node is (the end of) a rotation-invariant norm."""
        return None

    def scales_along(self, node: gs.Node, index: int) -> bool:
        """True when scaling the channels entering at `index` scales the output alike (so an
        RMSNorm's changed divisor reaches the taps behind it as the same factor)."""
        return False

    def produce(self, node: gs.Node) -> Output | None:
        """The channels the node creates through its constant weight (input 1), when it is a
        producer of a channel group; None otherwise."""
        return None

    def out_axis(self, node: gs.Node) -> int | None:
        """The axis of the node's constant weight (input 1) that indexes its output channels
        (where producer rows are sliced and a consumer's correction lands); None without one."""
        return None

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        """Multiply-accumulates of one run of the node (element-wise work is not counted)."""
        return 0

    def torch(self, op_type: str) -> TorchOp | None:
        """The torch equivalent of `op_type` for the interpreter (calib/torch_exec.py), None
        where it has none. Implementations import torch inside, so handlers stay torch-free."""
        return None

    def max_outputs(self, op_type: str) -> int | None:
        """How many outputs the torch equivalent provides (None: any number)."""
        return 1

    def prepare(self, node: gs.Node) -> None:
        """Put what the rewriter edits into constant inputs before any edit (in place)."""

    def finish(self, node: gs.Node, index: int, edits: list[ParamEdit], opset: int) -> None:
        """Fix attributes after constant input `index` was edited by `edits` (in place)."""


_HANDLERS: dict[tuple[str, str], Handler] = {}
H = TypeVar("H", bound=type[Handler])


def register(*op_types: str, domain: str = "") -> Callable[[H], H]:
    """Class decorator: one instance of the handler answers for every op in `op_types`."""

    def add(cls: H) -> H:
        keys = [(_domain(domain), op_type) for op_type in op_types]
        taken = [op_type for key, op_type in zip(keys, op_types, strict=True) if key in _HANDLERS]
        if taken:
            raise ValueError(f"op {taken[0]} has two handlers")
        handler = cls()
        _HANDLERS.update(dict.fromkeys(keys, handler))
        return cls

    return add


def handler_for(node: gs.Node | onnx.NodeProto) -> Handler | None:
    """The handler of a graphsurgeon node or a NodeProto, None for an op nobody registered."""
    op_type = node.op if isinstance(node, gs.Node) else node.op_type
    return _HANDLERS.get((_domain(node.domain), op_type))


def node_attrs(node: onnx.NodeProto) -> dict:
    """A NodeProto's attributes as Python values (for `macs`, which reads protos)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def unknown(node: gs.Node) -> str:
    """The reason an op without a flow rule blocks a group."""
    if _domain(node.domain):
        return f"op {node.domain}::{node.op} is not known to act channel by channel"
    return f"op {node.op} is not known to act channel by channel"


def registered() -> dict[tuple[str, str], Handler]:
    """Every (domain, op type) with its handler (a copy), for listings and tests."""
    return dict(_HANDLERS)


def _domain(domain: str | None) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain
