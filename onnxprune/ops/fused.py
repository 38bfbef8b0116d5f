"""Fused transformer ops that `graph/fused.py` did not write out as standard ops: they block
every group that reaches them, with the reason the expansion gave, and count their MACs (so a
fused original and its expanded, pruned output are counted alike)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from onnxprune.graph.fused import MS, refusal
from onnxprune.ops.flow import Output, State, Step, block
from onnxprune.ops.registry import Handler, ShapeOf, node_attrs, register

if TYPE_CHECKING:
    import onnx

_ELEMENTWISE = (
    "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu", "Gelu", "FastGelu",
)  # fmt: skip


class _Fused(Handler):
    """A fused op left as it is (normalize expands every one it can)."""

    def step(self, node: gs.Node, index: int, state: State, channels: int) -> Step:
        return block(why_fused(node))


def why_fused(node: gs.Node) -> str:
    """Why normalize left the fused `node` as it is."""
    return refusal(node, opset=23) or (
        f"{node.op} '{node.name}' was not written out as standard ops (the model's opset is "
        "below 17, or an optional output of it is a graph output)"
    )


@register(*_ELEMENTWISE, domain=MS)
class FusedElementwise(_Fused):
    """ONNX Runtime's norms and activations: element-wise work, no MACs."""


@register("Attention", "MultiHeadAttention", domain=MS)
class FusedAttention(_Fused):
    """ONNX Runtime's attention ops."""

    def produce(self, node: gs.Node) -> Output | None:
        """Attention's packed weight makes heads that cannot be pruned while it stays fused:
        a group that `analyze` lists with the reason."""
        if node.op != "Attention":
            return None
        return Output(node.attrs.get("num_heads", 1), 2, (), why_fused(node))

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        """Attention: the packed projection x·W plus the core; MultiHeadAttention: the core."""
        if node.op_type == "MultiHeadAttention":
            q, k, v = (shape_of(name) for name in node.input[:3])
            return core_macs(q, k, v)
        x, weight = shape_of(node.input[0]), shape_of(node.input[1])
        sizes = node_attrs(node).get("qkv_hidden_sizes") or [weight[1] // 3] * 3
        tokens = x[:-1]
        projection = math.prod(x) * weight[1]
        return projection + core_macs((*tokens, sizes[0]), (*tokens, sizes[1]), (*tokens, sizes[2]))


@register("Attention")
class Attention(_Fused):
    """Opset-23 Attention."""

    def macs(self, node: onnx.NodeProto, shape_of: ShapeOf) -> int:
        q, k, v = (shape_of(name) for name in node.input[:3])
        attrs = node_attrs(node)
        heads, kv_heads = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
        if len(v) == 3 and heads and kv_heads:  # (B, L, Hkv·Dv): each query head reads its
            v = (*v[:-1], v[-1] * heads // kv_heads)  # group's values (grouped queries)
        return core_macs(q, k, v)


def core_macs(q: tuple, k: tuple, v: tuple) -> int:
    """q·kᵀ and attention·v: q (…, S, Dq), k (…, L, ·), v (…, L, Dv) give (…)·S·L·(Dq + Dv),
    for (B, S, H·D) inputs (the head split does not change the count) as for (B, H, S, D)."""
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
