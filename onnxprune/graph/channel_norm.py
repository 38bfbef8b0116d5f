"""A LayerNormalization over a group's channels, rebuilt from the kept channels.

ConvNeXt normalizes its channels-last blocks over the channels: y = γ ⊙ (z − μ1)/σ + β, with
μ and σ over all C channels of z at every position. With channels removed, a plain slice of
the norm divides by statistics of the kept ones, which differ per position. The group's fit at
the norm's input, z ≈ Mᵀ z_S + c (plain selection: M = the rows of I for S, c = 0), gives
instead

    z − μ1 ≈ L z_S + l,   L = P Mᵀ,  l = P c,  P = I − 11ᵀ/C,

so the pruned graph computes σ² = ‖L z_S + l‖²/C from the k kept channels (with L = Q R, as
‖R z_S + Qᵀl‖² + ‖l − QQᵀl‖²: a k×k MatMul per position, and a sum of squares with no
cancellation) and writes, in place of y,

    v = [r ⊙ z_S, r],   r = 1/√(σ² + ε),   so that  y = [diag(γ) L, γ ⊙ l] v + β

(v = r ⊙ z_S where γ ⊙ l = 0). Every reader of y reads it through its weight — a MatMul,
Gemm or unpadded Conv, perhaps behind Transposes or a Flatten — and takes that map as an
ordinary correction (W' = W [diag(γ)L, γ⊙l], b' = b + Wβ, graph/rewrite.py). Exact where the
fit is: at ratio 0 and for a duplicated channel. Anything else reading y is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.groups import ParamEdit
from onnxprune.ops.flow import State, const, rank_of
from onnxprune.ops.registry import handler_for
from onnxprune.plan import Correction, Plan

_LAYOUT = frozenset({"Transpose", "Flatten", "Squeeze", "Unsqueeze"})


def norm_readers(node: gs.Node) -> list[ParamEdit] | str:
    """The "in" edits of the layers that read LayerNorm `node`'s output (over its last axis)
    through their weights, or why its output is read some other way."""
    rank = rank_of(node.outputs[0])
    if rank is None:
        return "its output rank is unknown"
    width = int(const(node, 1).size)
    stack, edits = [(node.outputs[0], State(node.outputs[0].name, rank - 1, 0))], []
    while stack:
        tensor, state = stack.pop()
        if not tensor.outputs:
            return f"'{tensor.name}' is a graph output"
        for user in tensor.outputs:
            found = _reader_step(user, state, width)
            if isinstance(found, str):
                return found
            if isinstance(found, State):
                stack.append((user.outputs[0], found))
            else:
                edits += found
    return edits


def _reader_step(user: gs.Node, state: State, width: int) -> State | list[ParamEdit] | str:
    """A layout op passes the output on (its new State), a weight layer reads it (its edits)."""
    handler = handler_for(user)
    what = f"{user.op} '{user.name}'"
    index = next(i for i, t in enumerate(user.inputs) if t.name == state.tensor)
    result = None if handler is None else handler.step(user, index, state, width)
    refused = f"its output is read by {what}, not through a layer's weight"
    if result is None or result.kind == "block":
        return refused
    if user.op in _LAYOUT and result.kind == "through" and not result.edits:
        if result.next.spatial != 1:
            return f"its output is flattened with positions by {what}"
        return result.next
    if result.kind != "consume" or any(e.role != "in" or e.node != user.name for e in result.edits):
        return refused
    if user.op == "Conv" and (
        any(user.attrs.get("pads", []))
        or user.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID")
    ):
        return f"its output is read by the zero-padded {what} (β is not 0 in the padding)"
    return list(result.edits)


@dataclass(frozen=True)
class Rebuilt:
    """The map the readers of the rebuilt norm fold in: y = Mᵀ v + c (M is (k or k+1, C))."""

    width: int
    correction: Correction


def rebuild(graph: gs.Graph, node: gs.Node, plan: Plan, tap: str) -> Rebuilt | None:
    """Replace LayerNorm `node` (its input now holds the channels `plan` keeps, fitted by its
    correction at `tap`, the norm's input) by explicit ops writing v (module docstring) to its
    output.

    Returns the map its readers must fold in, or None when nothing changes (every channel
    kept in order with the identity map): the norm is then left as it is.
    """
    gamma = np.asarray(const(node, 1), np.float64).reshape(-1)
    width = gamma.size
    beta = const(node, 2) if len(node.inputs) > 2 and node.inputs[2].name else None
    beta = np.zeros(width) if beta is None else np.asarray(beta, np.float64).reshape(-1)
    beta = np.broadcast_to(beta, (width,))
    m_t, c = _fit(plan, tap, width)
    if m_t.shape == (width, width) and np.array_equal(m_t, np.eye(width)) and not np.any(c):
        return None
    centre = np.eye(width) - 1.0 / width
    lin, shift = centre @ m_t, centre @ c
    q, r = np.linalg.qr(lin)
    h = q.T @ shift
    rest = float(np.sum((shift - q @ h) ** 2))
    eps = float(node.attrs.get("epsilon", 1e-5))
    scaled = gamma[:, None] * lin
    offset = gamma * shift
    with_one = bool(np.any(offset))
    _write(graph, node, r.T, h, rest / width + eps, width, with_one)
    mapping = np.concatenate([scaled, offset[:, None]], axis=1) if with_one else scaled
    return Rebuilt(width, Correction(mapping.T, beta.copy()))


def _fit(plan: Plan, tap: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Mᵀ (C, k) and c (C,) of the fit at `tap`; without a correction, plain selection of the
    kept channels (of the rotated ones, a = Qᵀã, when the plan rotates)."""
    keep, correction = np.asarray(plan.keep), plan.corrections.get(tap)
    if correction is None:
        basis = np.eye(width) if plan.rotation is None else np.asarray(plan.rotation)
        return np.asarray(basis, np.float64)[keep].T, np.zeros(width)
    c = np.zeros(width) if correction.c is None else np.asarray(correction.c, np.float64)
    return np.asarray(correction.M, np.float64).T, c


def _write(
    graph: gs.Graph,
    node: gs.Node,
    r_t: np.ndarray,
    h: np.ndarray,
    constant: float,
    width: int,
    with_one: bool,
) -> None:
    """v = [z_S·r, r] (or z_S·r), r = 1/√(Σ(z_S Rᵀ + h)²/C + constant), written to the norm's
    output tensor over its last axis."""
    x, out = node.inputs[0], node.outputs[0]
    dtype = x.dtype or np.float32
    name = node.name
    node.outputs.clear()

    def var(suffix: str) -> gs.Variable:
        return gs.Variable(f"{name}__{suffix}", dtype=dtype)

    def value(suffix: str, array) -> gs.Constant:
        return gs.Constant(f"{name}__{suffix}", np.asarray(array, dtype=dtype))

    nodes = []
    t = var("rotated")
    nodes.append(gs.Node("MatMul", f"{name}__R", inputs=[x, value("R", r_t)], outputs=[t]))
    if np.any(h):
        shifted = var("shifted")
        nodes.append(gs.Node("Add", f"{name}__h", inputs=[t, value("h", h)], outputs=[shifted]))
        t = shifted
    square, total, mean, shifted, root, inverse = (
        var(s) for s in ("square", "sum", "var", "var_eps", "root", "inverse")
    )
    axes = gs.Constant(f"{name}__axes", np.array([-1], np.int64))
    nodes += [
        gs.Node("Mul", f"{name}__square", inputs=[t, t], outputs=[square]),
        gs.Node("ReduceSum", f"{name}__sum", {"keepdims": 1}, [square, axes], [total]),
        gs.Node("Div", f"{name}__width", inputs=[total, value("C", width)], outputs=[mean]),
        gs.Node("Add", f"{name}__eps", inputs=[mean, value("eps", constant)], outputs=[shifted]),
        gs.Node("Sqrt", f"{name}__sqrt", inputs=[shifted], outputs=[root]),
        gs.Node("Reciprocal", f"{name}__inverse", inputs=[root], outputs=[inverse]),
    ]
    scaled = var("scaled") if with_one else out
    nodes.append(gs.Node("Mul", f"{name}__scale", inputs=[x, inverse], outputs=[scaled]))
    if with_one:
        nodes.append(gs.Node("Concat", f"{name}__concat", {"axis": -1}, [scaled, inverse], [out]))
    graph.nodes += nodes
