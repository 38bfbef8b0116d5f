"""Pooling over positions and reductions over axes other than the channels: the channels pass.

Average pooling and sums/means over positions are linear and alike on every channel (they
commute with a rotation); max pooling takes a per-channel max (it does not).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from onnxprune.ops.flow import State, Step, axes_of, block, parameter_input, rank_of, through
from onnxprune.ops.registry import Handler, register
from onnxprune.ops.torch_support import from_input_or_attr, geometry, native_pads, torch_pads

if TYPE_CHECKING:
    from torch import Tensor

    from onnxprune.ops.torch_support import OpNode, Result, TorchOp


@register("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool")
class Pool(Handler):
    """A pool over the positions of an NCHW tensor."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        if state.axis != 1:  # a channel's `spatial` features lie on axis 1 too: kept apart
            return block(f"{node.op} '{node.name}' pools over the channel axis")
        return through(node, state)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        if node.op in ("AveragePool", "GlobalAveragePool"):
            return None
        if node.op in ("MaxPool", "GlobalMaxPool"):
            return f"{node.op} '{node.name}' takes a per-channel max"
        return super().rotation(node, index, state, result)

    def scales_along(self, node: gs.Node, index: int) -> bool:
        return node.op != "LpPool"

    def torch(self, op_type: str) -> TorchOp | None:
        return {
            "MaxPool": _max_pool,
            "AveragePool": _avg_pool,
            "GlobalAveragePool": _global_avg_pool,
            "GlobalMaxPool": _global_max_pool,
        }.get(op_type)


@register("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1")
class Reduce(Handler):
    """A reduction over given axes, none of them the channel axis."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        if (found := parameter_input(node, index)) is not None:
            return found
        rank = rank_of(node.inputs[0])
        axes = axes_of(node)
        if rank is None or not axes:
            return block(f"{node.op} '{node.name}' reduces over all axes (or unknown axes)")
        axes = [a % rank for a in axes]
        if state.axis in axes:  # a channel's `spatial` features lie on that axis: kept apart
            return block(f"{node.op} '{node.name}' reduces over the channel axis")
        keep = node.attrs.get("keepdims", 1)
        axis = state.axis if keep else state.axis - sum(a < state.axis for a in axes)
        return through(node, state, axis=axis)

    def rotation(self, node: gs.Node, index: int, state: State, result: Step) -> str | None:
        """Sums and means over positions commute (the channel axis is never reduced here)."""
        if node.op in ("ReduceMean", "ReduceSum"):
            return None
        return super().rotation(node, index, state, result)

    def scales_along(self, node: gs.Node, index: int) -> bool:
        return node.op in ("ReduceMean", "ReduceSum", "ReduceMax")

    def torch(self, op_type: str) -> TorchOp | None:
        import torch

        return {
            "ReduceMean": _reduce(lambda x, a, k: x.mean(dim=a, keepdim=k)),
            "ReduceSum": _reduce(lambda x, a, k: x.sum(dim=a, keepdim=k)),
            "ReduceMax": _reduce(lambda x, a, k: x.amax(dim=a, keepdim=k)),
            "ReduceMin": _reduce(lambda x, a, k: x.amin(dim=a, keepdim=k)),
            "ReduceL1": _reduce(lambda x, a, k: x.abs().sum(dim=a, keepdim=k), torch.abs),
            "ReduceL2": _reduce(lambda x, a, k: x.square().sum(dim=a, keepdim=k).sqrt(), torch.abs),
        }[op_type]


@register("ReduceProd", "ReduceSumSquare", "ReduceLogSumExp")
class OtherReduce(Handler):
    """Reductions the analyzer has no rule for (channels block); interpreted."""

    def torch(self, op_type: str) -> TorchOp | None:
        import torch

        return {
            "ReduceProd": _reduce(_reduce_prod),
            "ReduceSumSquare": _reduce(
                lambda x, a, k: x.square().sum(dim=a, keepdim=k), torch.square
            ),
            "ReduceLogSumExp": _reduce(lambda x, a, k: torch.logsumexp(x, dim=a, keepdim=k)),
        }[op_type]


@register("ArgMax", "ArgMin")
class ArgExtreme(Handler):
    """ArgMax / ArgMin: integer outputs, interpreted only."""

    def torch(self, op_type: str) -> TorchOp | None:
        import torch

        return _arg_extreme(torch.argmax if op_type == "ArgMax" else torch.argmin)


# ------------------------------------------------------------ torch equivalents


def _max_pool(n: OpNode, xs: list) -> Result:
    """MaxPool with pads, dilations and ceil_mode; the Indices output is not provided."""
    import torch.nn.functional as F

    x, kernel = xs[0], list(n.get("kernel_shape"))
    k = len(kernel)
    strides, dilations, pads = geometry(n, x, kernel)
    ceil = bool(n.get("ceil_mode", 0))
    if native_pads(pads, [ks // 2 for ks in kernel]):
        return getattr(F, f"max_pool{k}d")(x, kernel, strides, pads[:k], dilations, ceil)
    x = F.pad(x, torch_pads(pads), value=-math.inf)
    return getattr(F, f"max_pool{k}d")(x, kernel, strides, 0, dilations, ceil)


def _avg_pool(n: OpNode, xs: list) -> Result:
    """AveragePool; count_include_pad decides whether padded cells count in the divisor."""
    import torch.nn.functional as F

    x, kernel = xs[0], list(n.get("kernel_shape"))
    k = len(kernel)
    strides, dilations, pads = geometry(n, x, kernel)
    if any(d != 1 for d in dilations):
        raise n.unsupported("dilations")
    ceil, include = bool(n.get("ceil_mode", 0)), bool(n.get("count_include_pad", 0))
    if native_pads(pads, [ks // 2 for ks in kernel]):
        return getattr(F, f"avg_pool{k}d")(x, kernel, strides, pads[:k], ceil, include)
    # Asymmetric or oversized pads: ratio of window sums of data and of a validity mask.
    tp = torch_pads(pads)
    mask = F.pad(x.new_ones((1, 1, *x.shape[2:])), tp, value=1.0 if include else 0.0)
    total = getattr(F, f"avg_pool{k}d")(F.pad(x, tp), kernel, strides, 0, ceil, True)
    return total / getattr(F, f"avg_pool{k}d")(mask, kernel, strides, 0, ceil, True)


def _global_avg_pool(n: OpNode, xs: list) -> Result:
    """Mean over all spatial dims, kept as size-1 dims."""
    return xs[0].mean(dim=tuple(range(2, xs[0].dim())), keepdim=True)


def _global_max_pool(n: OpNode, xs: list) -> Result:
    """Max over all spatial dims, kept as size-1 dims."""
    return xs[0].amax(dim=tuple(range(2, xs[0].dim())), keepdim=True)


def _reduce(
    fn: Callable[[Tensor, list[int], bool], Tensor], noop: Callable[[Tensor], Tensor] = lambda x: x
) -> Callable[[OpNode, list], Result]:
    """Reduce* with axes as input (ReduceSum >= 13, others >= 18) or attribute.

    With empty axes and noop_with_empty_axes=1 only the elementwise part (`noop`) is applied, as
    ONNX Runtime does (ReduceL1/L2 give |x|, ReduceSumSquare gives x**2).
    """

    def op(n: OpNode, xs: list) -> Result:
        x = xs[0]
        axes = from_input_or_attr(n, xs, 1, "axes")
        if not axes:
            if n.get("noop_with_empty_axes", 0):
                return noop(x)
            axes = list(range(x.dim()))
        return fn(x, [a % x.dim() for a in axes], bool(n.get("keepdims", 1)))

    return op


def _reduce_prod(x: Tensor, axes: list[int], keep: bool) -> Tensor:
    """Product over several axes (torch.prod takes one)."""
    for a in sorted(axes, reverse=True):
        x = x.prod(dim=a, keepdim=keep)
    return x


def _arg_extreme(fn: Callable[..., Tensor]) -> Callable[[OpNode, list], Result]:
    """ArgMax/ArgMin along one axis (first index on ties)."""

    def op(n: OpNode, xs: list) -> Result:
        if n.get("select_last_index", 0):
            raise n.unsupported("select_last_index=1")
        return fn(xs[0], dim=n.get("axis", 0), keepdim=bool(n.get("keepdims", 1)))

    return op
