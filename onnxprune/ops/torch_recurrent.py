"""ONNX LSTM, GRU and RNN for the torch interpreter (ops/recurrent.py's handler returns them).

Written out step by step from the ONNX operator definitions (layout 0, default activations:
sigmoid for the gates, tanh otherwise), so every weight gets a gradient. Variants the
interpreter does not implement (sequence_lens, custom activations, clip, input_forget,
layout 1) are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from onnxprune.ops.torch_support import OpNode, Result

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {
    "LSTM": ["Sigmoid", "Tanh", "Tanh"],
    "GRU": ["Sigmoid", "Tanh"],
    "RNN": ["Tanh"],
}


def recurrent(n: OpNode, xs: list) -> Result:
    """Y (T, D, B, H), Y_h (D, B, H) and, for an LSTM, Y_c, as many as the node outputs."""
    _check(n, xs)
    x, w, r = xs[0], xs[1], xs[2]
    directions, size = w.shape[0], r.shape[-1]
    gates = _GATES[n.op_type]
    bias = optional(xs, 3)
    if bias is None:
        bias = x.new_zeros(directions, 2 * gates * size)
    ys, finals, cells = [], [], []
    reverse = n.get("direction", "forward") == "reverse"
    for d in range(directions):
        state = _initial(xs, 5, d, x, size)
        cell = _initial(xs, 6, d, x, size)
        peep = optional(xs, 7)
        params = (w[d], r[d], bias[d], None if peep is None else peep[d])
        order = range(x.shape[0] - 1, -1, -1) if (d == 1 or reverse) else range(x.shape[0])
        outs = [None] * x.shape[0]
        step = _STEPS[n.op_type]
        for t in order:
            state, cell = step(n, x[t], state, cell, params)
            outs[t] = state
        ys.append(torch.stack(outs))
        finals.append(state)
        cells.append(cell)
    results = (torch.stack(ys, dim=1), torch.stack(finals), torch.stack(cells))
    return results[: n.n_outputs] if n.n_outputs > 1 else results[0]


def optional(xs: list, i: int) -> Tensor | None:
    """Optional input i, None when omitted or empty-named."""
    return xs[i] if i < len(xs) else None


def _check(n: OpNode, xs: list) -> None:
    if n.get("layout", 0) != 0:
        raise n.unsupported("layout=1")
    if optional(xs, 4) is not None:
        raise n.unsupported("sequence_lens")
    if n.get("clip") is not None or n.get("input_forget", 0):
        raise n.unsupported("clip or input_forget")
    activations = n.get("activations")
    if activations is not None:
        expected = _DEFAULT_ACTIVATIONS[n.op_type]
        if list(activations) != expected * (len(activations) // len(expected)):
            raise n.unsupported(f"activations {activations}")


def _initial(xs: list, index: int, d: int, x: Tensor, size: int) -> Tensor:
    state = optional(xs, index)
    return x.new_zeros(x.shape[1], size) if state is None else state[d]


def _lstm(n: OpNode, x: Tensor, h: Tensor, c: Tensor, params) -> tuple[Tensor, Tensor]:
    w, r, b, p = params
    size = r.shape[-1]
    a = x @ w.T + h @ r.T + b[: 4 * size] + b[4 * size :]
    i, o, f, g = a.split(size, dim=1)
    if p is not None:
        pi, po, pf = p.split(size)
        i, f = i + pi * c, f + pf * c
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    if p is not None:
        o = o + po * c
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru(n: OpNode, x: Tensor, h: Tensor, c: Tensor, params) -> tuple[Tensor, Tensor]:
    w, r, b, _ = params
    size = r.shape[-1]
    xw = x @ w.T + b[: 3 * size]
    rb = b[3 * size :]
    zr = xw[:, : 2 * size] + h @ r[: 2 * size].T + rb[: 2 * size]
    z, reset = torch.sigmoid(zr).split(size, dim=1)
    if n.get("linear_before_reset", 0):
        candidate = torch.tanh(xw[:, 2 * size :] + reset * (h @ r[2 * size :].T + rb[2 * size :]))
    else:
        candidate = torch.tanh(xw[:, 2 * size :] + (reset * h) @ r[2 * size :].T + rb[2 * size :])
    return (1 - z) * candidate + z * h, c


def _rnn(n: OpNode, x: Tensor, h: Tensor, c: Tensor, params) -> tuple[Tensor, Tensor]:
    w, r, b, _ = params
    size = r.shape[-1]
    return torch.tanh(x @ w.T + h @ r.T + b[:size] + b[size:]), c


_STEPS: dict[str, Callable] = {"LSTM": _lstm, "GRU": _gru, "RNN": _rnn}
