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

(v = r ⊙ z_S where γ ⊙ l = 0). Plain selection needs no MatMul: with m = Σz_S/C,
σ² = (Σ(z_S − m)² + (C − k)·m²)/C, centred before squaring (k MACs per position). Every
reader of y reads it through its weight — a MatMul, Gemm or unpadded Conv, perhaps behind
Transposes or a Flatten — and takes that map as an ordinary correction (W' = W [diag(γ)L,
γ⊙l], b' = b + Wβ, graph/rewrite.py). Exact where the fit is: at ratio 0 and for a
duplicated channel. Anything else reading y is refused.
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
    eps = float(node.attrs.get("epsilon", 1e-5))
    writer = _Writer(graph, node)
    if _selects(m_t, c):
        inverse = writer.selected_inverse(width, m_t.shape[1], eps)
    else:
        inverse = writer.fitted_inverse(lin, shift, width, eps)
    offset = gamma * shift
    with_one = bool(np.any(offset))
    writer.output(inverse, with_one)
    scaled = gamma[:, None] * lin
    mapping = np.concatenate([scaled, offset[:, None]], axis=1) if with_one else scaled
    return Rebuilt(width, Correction(mapping.T, beta.copy()))


def _selects(m_t: np.ndarray, c: np.ndarray) -> bool:
    """True for plain selection: every kept channel is one original channel, c = 0."""
    unit = np.all((m_t == 0) | (m_t == 1)) and np.all(m_t.sum(axis=0) == 1)
    return bool(unit and np.all(m_t.sum(axis=1) <= 1) and not np.any(c))


def _fit(plan: Plan, tap: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Mᵀ (C, k) and c (C,) of the fit at `tap`; without a correction, plain selection of the
    kept channels (of the rotated ones, a = Qᵀã, when the plan rotates)."""
    keep, correction = np.asarray(plan.keep), plan.corrections.get(tap)
    if correction is None:
        basis = np.eye(width) if plan.rotation is None else np.asarray(plan.rotation)
        return np.asarray(basis, np.float64)[keep].T, np.zeros(width)
    c = np.zeros(width) if correction.c is None else np.asarray(correction.c, np.float64)
    return np.asarray(correction.M, np.float64).T, c


class _Writer:
    """Writes the ops that replace one LayerNorm, named after it, over its input's last axis."""

    def __init__(self, graph: gs.Graph, node: gs.Node) -> None:
        self.graph, self.name = graph, node.name
        self.x, self.out = node.inputs[0], node.outputs[0]
        self.dtype = self.x.dtype or np.float32
        node.outputs.clear()

    def var(self, suffix: str) -> gs.Variable:
        return gs.Variable(f"{self.name}__{suffix}", dtype=self.dtype)

    def value(self, suffix: str, array) -> gs.Constant:
        return gs.Constant(f"{self.name}__{suffix}", np.asarray(array, dtype=self.dtype))

    def op(self, op: str, suffix: str, inputs: list, attrs: dict | None = None) -> gs.Variable:
        out = self.var(suffix)
        self.graph.nodes.append(gs.Node(op, f"{self.name}__{suffix}", attrs or {}, inputs, [out]))
        return out

    def sum_last(self, x: gs.Tensor, suffix: str) -> gs.Variable:
        axes = gs.Constant(f"{self.name}__{suffix}_axes", np.array([-1], np.int64))
        return self.op("ReduceSum", suffix, [x, axes], {"keepdims": 1})

    def selected_inverse(self, width: int, kept: int, eps: float) -> gs.Variable:
        """Plain selection (the removed channels read as 0): m = Σz_S/C, and
        σ² = (Σ(z_S − m)² + (C − k)·m²)/C, centred before squaring (k MACs per position)."""
        mean = self.op("Div", "mean", [self.sum_last(self.x, "sum"), self.value("C", width)])
        dev = self.op("Sub", "dev", [self.x, mean])
        spread = self.sum_last(self.op("Mul", "dev_sq", [dev, dev]), "dev_sum")
        if kept < width:  # the removed channels, each −m from the mean
            gone = self.op("Mul", "gone", [self.op("Mul", "mean_sq", [mean, mean]),
                                           self.value("removed", width - kept)])  # fmt: skip
            spread = self.op("Add", "spread", [spread, gone])
        return self._inverse(spread, width, eps)

    def fitted_inverse(
        self, lin: np.ndarray, shift: np.ndarray, width: int, eps: float
    ) -> gs.Variable:
        """A general fit: ‖L z_S + l‖² = ‖R z_S + Qᵀl‖² + ‖l − QQᵀl‖² with L = QR (k² MACs)."""
        q, r = np.linalg.qr(lin)
        h = q.T @ shift
        rest = float(np.sum((shift - q @ h) ** 2))
        t = self.op("MatMul", "R", [self.x, self.value("R_t", r.T)])
        if np.any(h):
            t = self.op("Add", "h", [t, self.value("h_value", h)])
        spread = self.sum_last(self.op("Mul", "square", [t, t]), "square_sum")
        if rest:
            spread = self.op("Add", "rest", [spread, self.value("rest_value", rest)])
        return self._inverse(spread, width, eps)

    def _inverse(self, spread: gs.Tensor, width: int, eps: float) -> gs.Variable:
        """r = 1/√(spread/C + ε)."""
        var = self.op("Div", "var", [spread, self.value("width", width)])
        root = self.op("Sqrt", "root", [self.op("Add", "var_eps", [var, self.value("eps", eps)])])
        return self.op("Reciprocal", "inverse", [root])

    def output(self, inverse: gs.Variable, with_one: bool) -> None:
        """v = [z_S·r, r] (or z_S·r) written to the norm's output tensor."""
        if not with_one:
            self.graph.nodes.append(
                gs.Node("Mul", f"{self.name}__scale", inputs=[self.x, inverse], outputs=[self.out])
            )
            return
        scaled = self.op("Mul", "scale", [self.x, inverse])
        self.graph.nodes.append(gs.Node("Concat", f"{self.name}__concat", {"axis": -1},
                                        [scaled, inverse], [self.out]))  # fmt: skip
