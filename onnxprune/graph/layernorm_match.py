"""Find LayerNorms over the last axis: the opset-17 op, the primitive pattern the legacy
exporter writes below opset 17, and tf2onnx's spelling of Keras' LayerNormalization; and the
RMSNorms of LLaMA-style models: the opset-23 op and torch's x · rsqrt(mean(x²) + ε) · γ
(graph/layernorm.py converts them all to one RMSNorm form with γ folded into the readers)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops.flow import const, rank_of, single_user
from onnxprune.ops.rmsnorm import rms_square


@dataclass
class LayerNorm:
    """One LayerNorm over the last axis: its input, output, affine and the nodes computing it.

    `centred` is False for an RMSNorm, which subtracts no mean (its β is 0): its stream needs
    no centring to be rotated."""

    name: str
    x: gs.Tensor
    out: gs.Tensor
    gamma: np.ndarray
    beta: np.ndarray
    eps: float
    nodes: list[gs.Node] = field(default_factory=list)
    centred: bool = True

    @property
    def width(self) -> int:
        return len(self.gamma)


def find_layernorms(graph: gs.Graph) -> Iterator[LayerNorm]:
    """LayerNormalization ops, the primitive pattern the legacy exporter writes below opset 17
    (ReduceMean → Sub → Pow → ReduceMean → Add ε → Sqrt → Div → Mul γ → Add β) and tf2onnx's
    (`_tf2onnx`), over the last axis with constant affine parameters; and RMSNorms
    (`centred` False): RMSNormalization ops and torch's pattern (`_rms_primitive`)."""
    matchers = {
        "LayerNormalization": _layernorm_op,
        "GlobalAveragePool": _tf2onnx,
        "RMSNormalization": _rmsnorm_op,
        "Pow": _rms_primitive,
        "Mul": _rms_primitive,
    }
    found = [
        norm for node in list(graph.nodes) if (norm := matchers.get(node.op, _primitive)(node))
    ]
    # the variance of a LayerNorm is an RMSNorm of x − mean: the LayerNorm is what was matched
    inside = {id(node) for norm in found if norm.centred for node in norm.nodes}
    yield from (norm for norm in found if norm.centred or id(norm.nodes[0]) not in inside)


def _layernorm_op(node: gs.Node) -> LayerNorm | None:
    rank, gamma = rank_of(node.inputs[0]), const(node, 1)
    if rank is None or gamma is None or node.attrs.get("axis", -1) % rank != rank - 1:
        return None
    if any(out.outputs for out in node.outputs[1:]):
        return None  # the mean or inverse deviation is read elsewhere
    beta = const(node, 2) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(1)
    if beta is None:
        return None
    d = gamma.size
    gamma, beta = _vector(gamma, d), _vector(beta, d)
    eps = float(node.attrs.get("epsilon", 1e-5))
    return LayerNorm(node.name, node.inputs[0], node.outputs[0], gamma, beta, eps, [node])


def _primitive(mean: gs.Node) -> LayerNorm | None:
    """The pattern starting at its first ReduceMean, or None if `mean` does not start one."""
    x = mean.inputs[0] if mean.op == "ReduceMean" else None
    rank = rank_of(x) if x is not None else None
    if rank is None or _last_axis_only(mean, rank) is False:
        return None
    sub = single_user(mean, "Sub")
    if sub is None or [t.name for t in sub.inputs] != [x.name, mean.outputs[0].name]:
        return None
    users = {u.op: u for u in sub.outputs[0].outputs}
    square, div = users.get("Pow"), users.get("Div")
    if len(sub.outputs[0].outputs) != 2 or square is None or div is None:
        return None
    chain = _chain(square, ("ReduceMean", "Add", "Sqrt"))
    if chain is None or single_user(chain[-1], "Div") is not div:
        return None
    exponent, eps = const(square, 1), _scalar_operand(chain[1])
    if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
        return None
    if eps is None or _last_axis_only(chain[0], rank) is False:
        return None
    affine = _chain(div, ("Mul", "Add"))
    if affine is None:
        return None
    gamma, beta = _other_constant(affine[0], div), _other_constant(affine[1], affine[0])
    if gamma is None or beta is None or gamma.size != beta.size or gamma.size < 2:
        return None
    nodes = [mean, sub, square, *chain, div, *affine]
    d = gamma.size
    out = affine[1].outputs[0]
    return LayerNorm(div.name, x, out, _vector(gamma, d), _vector(beta, d), eps, nodes)


def _rmsnorm_op(node: gs.Node) -> LayerNorm | None:
    """Opset-23 RMSNormalization over the last axis with a constant scale."""
    rank, gamma = rank_of(node.inputs[0]), const(node, 1)
    if rank is None or gamma is None or node.attrs.get("axis", -1) % rank != rank - 1:
        return None
    d, eps = gamma.size, float(node.attrs.get("epsilon", 1e-5))
    return LayerNorm(
        node.name, node.inputs[0], node.outputs[0], _vector(gamma, d), np.zeros(d), eps, [node],
        centred=False,
    )  # fmt: skip


def _rms_primitive(square: gs.Node) -> LayerNorm | None:
    """torch's RMSNorm from its square: x · c/√(mean(x²) + ε) (a Div, or Reciprocal → Mul),
    then Mul γ when it has one; None if `square` does not start one."""
    x = square.inputs[0] if square.inputs else None
    rank = rank_of(x) if x is not None else None
    end = rms_square(square, x.name, rank - 1) if rank is not None else None
    if end is None:
        return None
    nodes, node = [square], square
    while node is not end:
        node = node.outputs[0].outputs[0]
        nodes.append(node)
    eps, scale = _scalar_operand(next(n for n in nodes if n.op == "Add")), 1.0
    if nodes[-2].op == "Div":  # c / √(…), then Mul
        scale = float(const(nodes[-2], 0).reshape(-1)[0])
    out, gamma = end.outputs[0], None
    affine = single_user(end, "Mul")
    if affine is not None:
        gamma = _other_constant(affine, end)
    if gamma is not None and gamma.size > 1:
        nodes.append(affine)
        out = affine.outputs[0]
    d = gamma.size if gamma is not None and gamma.size > 1 else (x.shape or [None])[-1]
    if eps is None or not isinstance(d, int) or d < 2:
        return None
    gamma = scale * (_vector(gamma, d) if nodes[-1] is not end else np.ones(d))
    return LayerNorm(end.name, x, out, gamma, np.zeros(d), eps, nodes, centred=False)


def _tf2onnx(mean: gs.Node) -> LayerNorm | None:
    """tf2onnx's Keras LayerNormalization on (batch, tokens, d), starting at its first
    GlobalAveragePool (which averages the last axis of a rank-3 tensor): s = γ / √(var + ε) with
    var = GAP((x − GAP(x))²), then x·s + (β − GAP(x)·s), the shift written Neg(GAP(x)·s)
    without β (`center=False`); None if `mean` does not start one."""
    x = mean.inputs[0]
    if rank_of(x) != 3:
        return None
    users = {u.op: u for u in mean.outputs[0].outputs}
    sub, shifted = users.get("Sub"), users.get("Mul")
    if len(mean.outputs[0].outputs) != 2 or sub is None or shifted is None:
        return None
    if [t.name for t in sub.inputs] != [x.name, mean.outputs[0].name]:
        return None
    square = sub.outputs[0].outputs[0] if sub.outputs[0].outputs else None
    if square is None or square.op != "Mul" or any(u is not square for u in sub.outputs[0].outputs):
        return None
    if [t.name for t in square.inputs] != [sub.outputs[0].name] * 2:
        return None
    chain = _chain(square, ("GlobalAveragePool", "Add", "Sqrt", "Reciprocal", "Mul"))
    if chain is None:
        return None
    eps, gamma, scale = _scalar_operand(chain[1]), _other_constant(chain[4], chain[3]), chain[4]
    scaled = [u for u in scale.outputs[0].outputs if u.op == "Mul" and u is not shifted]
    if eps is None or gamma is None or len(scale.outputs[0].outputs) != 2 or len(scaled) != 1:
        return None
    if {t.name for t in shifted.inputs} != {mean.outputs[0].name, scale.outputs[0].name}:
        return None
    if {t.name for t in scaled[0].inputs} != {x.name, scale.outputs[0].name}:
        return None
    shift = shifted.outputs[0].outputs[0] if len(shifted.outputs[0].outputs) == 1 else None
    if shift is not None and shift.op == "Sub" and shift.inputs[1] is shifted.outputs[0]:
        beta = const(shift, 0)
    elif shift is not None and shift.op == "Neg":
        beta = np.zeros(1)
    else:
        return None
    out = single_user(shift, "Add")
    if beta is None or out is None or single_user(scaled[0], "Add") is not out:
        return None
    nodes = [mean, sub, square, *chain, shifted, scaled[0], shift, out]
    d = gamma.size
    return LayerNorm(scale.name, x, out.outputs[0], _vector(gamma, d), _vector(beta, d), eps, nodes)


def _vector(value: np.ndarray, d: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (d,)).copy()


def _last_axis_only(node: gs.Node, rank: int) -> bool:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        value = const(node, 1)
        axes = None if value is None else value.reshape(-1).tolist()
    return axes is not None and sorted(int(a) % rank for a in axes) == [rank - 1]


def _chain(start: gs.Node, ops: tuple[str, ...]) -> list[gs.Node] | None:
    """The nodes after `start`, each the single user of the previous, with the given ops."""
    chain, node = [], start
    for op in ops:
        node = single_user(node, op)
        if node is None:
            return None
        chain.append(node)
    return chain


def _scalar_operand(node: gs.Node) -> float | None:
    values = [const(node, i) for i in (0, 1)]
    found = [v for v in values if v is not None and v.size == 1]
    return float(found[0].reshape(-1)[0]) if len(found) == 1 else None


def _other_constant(node: gs.Node, source: gs.Node) -> np.ndarray | None:
    """The constant operand of `node` whose other operand is `source`'s output."""
    names = [t.name for t in node.inputs]
    if len(names) != 2 or source.outputs[0].name not in names:
        return None
    return const(node, 1 - names.index(source.outputs[0].name))
