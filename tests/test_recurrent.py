"""LSTM/GRU/RNN hidden units as groups (ops/recurrent.py), checked against a numpy reference.

- the analyzer finds one group per layer and direction, blocks what it cannot follow;
- any kept subset with any correction (M, c) equals, brute force, the original recurrence in
  numpy where every step's hidden state is replaced by its reconstruction Mᵀ h_S + c (selection:
  the removed units forced to 0), for LSTM (with peepholes), GRU (both linear_before_reset) and
  RNN, forward, reverse and bidirectional;
- ratio 0 is the identity; a duplicated hidden unit is removed exactly by ID; a constant input
  feature is removed exactly with its mean folded into the LSTM bias.
"""

from __future__ import annotations

import itertools

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close, data_path, reference_feeds, reference_path, run_model

import onnxprune
from onnxprune.calib.stats import tap_rows
from onnxprune.calib.torch_exec import check_against_ort
from onnxprune.errors import UsageError
from onnxprune.graph.analyze import analyze
from onnxprune.graph.groups import Tap
from onnxprune.graph.load import export, normalize
from onnxprune.graph.rewrite import rewrite
from onnxprune.plan import Correction, Plan

T, B, IN, H, K = 5, 3, 4, 3, 2
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def recurrent_model(
    op: str = "LSTM",
    direction: str = "forward",
    *,
    seed: int = 0,
    peepholes: bool = False,
    lbr: int = 1,
    weights: dict[str, np.ndarray] | None = None,
    zero_state: bool | str = False,
    read_final: bool = False,
    features: np.ndarray | None = None,
    final: bool | str = False,
) -> onnx.ModelProto:
    """x (T, N, IN) → MatMul+Add (IN features) → op → merge directions → MatMul (K) → y.

    `weights` overrides W, R, B; `features` the feature MatMul's weight (IN, IN). With `final`,
    the head reads the final states instead, as torch's `cat(h_n[-2], h_n[-1])`: a Gather of
    each direction from Y_h (indices 0 and -1), concatenated on the hidden axis (N, D·H);
    `final` "tf2onnx" reads them off Y as Keras' Bidirectional does: a Slice of each direction,
    then its last step (forward) or first (backward).
    `zero_state` True writes zero initial states as ConstantOfShape of a shape read from the
    features, "tf2onnx" as tf2onnx does: Expand(0, Cast(Concat(Slice(Cast(Shape), 1, 2), [H])))
    unsqueezed per direction and stacked."""
    b = graphs.Builder(seed)
    d = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    w = (weights or {}).get("W", 0.5 * b.rng.standard_normal((d, g * H, IN)))
    r = (weights or {}).get("R", 0.5 * b.rng.standard_normal((d, g * H, H)))
    bias = (weights or {}).get("B", 0.3 * b.rng.standard_normal((d, 2 * g * H)))
    fw = features if features is not None else 0.5 * b.rng.standard_normal((IN, IN))
    feat = b.node("MatMul", "feat", ["x", b.const("feat.w", fw.astype(np.float32))])
    feat = b.node("Add", "feat_add", [feat, b.rand("feat.b", IN)])
    inputs = [
        feat,
        *(b.const(n, v.astype(np.float32)) for n, v in (("W", w), ("R", r), ("B", bias))),
    ]
    if zero_state == "tf2onnx":
        i32 = onnx.TensorProto.INT32
        dims = b.node("Cast", "dims", [b.node("Shape", "shape", [feat])], to=i32)
        one, two = (b.const(n, np.array([v], np.int64)) for n, v in (("one", 1), ("two", 2)))
        batch = b.node("Slice", "batch", [dims, one, two])
        full = b.node(
            "Concat", "state_shape", [batch, b.const("hh", np.array([H], np.int32))], axis=0
        )
        full = b.node("Cast", "state_shape64", [full], to=onnx.TensorProto.INT64)
        state = b.node("Expand", "zeros", [b.const("zero", np.zeros((), np.float32)), full])
        state = b.node("Unsqueeze", "state", [state, b.const("first", np.array([0], np.int64))])
        if d == 2:
            state = b.node("Concat", "states", [state, state], axis=0)
        inputs += ["", state] + ([state] if op == "LSTM" else [])
    elif zero_state:
        zeros = np.zeros((d, 1, H), np.float32)
        shape = b.node("Shape", "shape", [feat], start=1, end=2)
        dims = [b.const("dd", np.array([d], np.int64)), shape, b.const("hh", np.array([H]))]
        full = b.node("Concat", "state_shape", dims, axis=0)
        state = b.node(
            "ConstantOfShape", "zeros", [full], value=onnx.numpy_helper.from_array(zeros[0, 0, :1])
        )
        inputs += ["", state] + ([state] if op == "LSTM" else [])
    if peepholes:
        inputs += [""] * (7 - len(inputs)) + [b.rand("P", d, 3 * H)]
    attrs = {"linear_before_reset": lbr} if op == "GRU" else {}
    seq = b.node(op, "rnn", inputs, outputs=2, hidden_size=H, direction=direction, **attrs)
    if final == "tf2onnx":
        picks = []
        for i in range(d):
            lo, hi = (T - 1, T) if i == 0 else (0, 1)
            one = b.node("Slice", f"dir{i}", [seq, *_ints(b, f"dir{i}", i, i + 1, 1)])
            one = b.node("Squeeze", f"dir{i}_sq", [one, *_ints(b, f"dir{i}_sq", 1)])
            one = b.node("Slice", f"step{i}", [one, *_ints(b, f"step{i}", lo, hi, 0)])
            picks.append(b.node("Squeeze", f"step{i}_sq", [one, *_ints(b, f"step{i}_sq", 0)]))
        seq = b.node("Concat", "finals", picks, axis=1)
    elif final:
        picks = [
            b.node("Gather", f"pick{i}", ["rnn_out1", b.const(f"dir{i}", np.array(i, np.int64))])
            for i in (0, -1)[:d]
        ]
        seq = b.node("Concat", "finals", picks, axis=1)
    elif d == 1:
        seq = b.node("Squeeze", "squeeze", [seq, b.const("axes", np.array([1], np.int64))])
    else:
        seq = b.node("Transpose", "transpose", [seq], perm=[0, 2, 1, 3])
        seq = b.node("Reshape", "merge", [seq, b.const("target", np.array([0, 0, -1], np.int64))])
    y = b.node("MatMul", "head", [seq, b.rand("head.w", d * H, K)])
    outputs = [y]
    if read_final:
        outputs.append(b.node("Relu", "final", ["rnn_out1"]))
    return b.model(outputs, inputs=[("x", (T, "N", IN))])


def _ints(b: graphs.Builder, name: str, *values: int) -> list[str]:
    """One 1-element int64 constant per value (a Slice's bounds and axis, a Squeeze's axes)."""
    return [b.const(f"{name}.{i}", np.array([v], np.int64)) for i, v in enumerate(values)]


def reference(model: onnx.ModelProto, x: np.ndarray, units: dict[int, tuple]) -> np.ndarray:
    """The output y of `recurrent_model` in numpy, the hidden state of direction d replaced at
    every step (and before the first) by Mᵀ h_S + c for `units[d]` = (keep, M, c); the final
    state (the last step forward, the first in reverse) where the head reads it."""
    init = {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer
    }
    node = next(n for n in model.graph.node if n.name == "rnn")
    op, attrs = node.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    feat = x.astype(np.float64) @ init["feat.w"] + init["feat.b"]
    d_total = init["W"].shape[0]
    outs = []
    for d in range(d_total):
        keep, m, c = units.get(d, (np.arange(H), np.eye(H), np.zeros(H)))
        steps = (
            range(T)
            if (d == 0 and attrs.get("direction", b"forward") != b"reverse")
            else range(T - 1, -1, -1)
        )
        params = {k: init[k][d] for k in ("W", "R", "B")}
        params["P"] = init["P"][d] if "P" in init else np.zeros(3 * H)
        seq = _run(op, attrs, params, feat, steps, keep, m, c)
        outs.append(seq[steps[-1]] if any(n.name == "finals" for n in model.graph.node) else seq)
    seq = np.concatenate(outs, axis=-1)  # (T, N, D·H), or (N, D·H) of the final states
    return seq @ init["head.w"]


def _run(op: str, attrs: dict, p: dict, feat: np.ndarray, steps: range, keep, m, c) -> np.ndarray:
    """One direction; the recurrence and the output read the reconstruction of h_S."""
    n = feat.shape[1]
    h, cell = np.zeros((n, H)), np.zeros((n, H))
    out = np.zeros((T, n, H))
    g = GATES[op]
    wb, rb = p["B"][: g * H], p["B"][g * H :]

    def seen(state):  # what the recurrence and the consumer read
        return state[:, keep] @ m + c

    for t in steps:
        hr = seen(h)
        xw = feat[t] @ p["W"].T + wb
        if op == "LSTM":
            a = xw + hr @ p["R"].T + rb
            i, o, f, cc = np.split(a, 4, axis=1)
            pi, po, pf = np.split(p["P"], 3)
            i, f = _sigmoid(i + pi * cell), _sigmoid(f + pf * cell)
            cell = f * cell + i * np.tanh(cc)
            h = _sigmoid(o + po * cell) * np.tanh(cell)
        elif op == "GRU":
            rz = xw[:, : 2 * H] + hr @ p["R"][: 2 * H].T + rb[: 2 * H]
            z, r = _sigmoid(rz[:, :H]), _sigmoid(rz[:, H:])
            rh = p["R"][2 * H :]
            if attrs.get("linear_before_reset", 0):
                hh = np.tanh(xw[:, 2 * H :] + r * (hr @ rh.T + rb[2 * H :]))
            else:  # reads r ⊙ h: the kept units only, no reconstruction
                mask = np.zeros(H)
                mask[keep] = 1.0
                hh = np.tanh(xw[:, 2 * H :] + (r * h * mask) @ rh.T + rb[2 * H :])
            h = (1 - z) * hh + z * h  # each unit keeps its own state
        else:
            h = np.tanh(xw + hr @ p["R"].T + rb)
        out[t] = h
    return np.stack([seen(s) for s in out])


def _pruned(model: onnx.ModelProto, units: dict[int, tuple]) -> onnx.ModelProto:
    graph = normalize(model)
    groups = {g.name: g for g in analyze(graph)}
    plans = {}
    for d, (keep, m, c) in units.items():
        name = "rnn" if "rnn" in groups else f"rnn[{d * H}:{(d + 1) * H}]"
        group = groups[name]
        plans[name] = Plan(np.asarray(keep), {t.key: Correction(m, c) for t in group.taps})
    return export(rewrite(graph, tuple(groups.values()), plans))


CASES = [
    ("LSTM", "forward", {}),
    ("LSTM", "reverse", {"peepholes": True}),
    ("LSTM", "bidirectional", {"peepholes": True, "zero_state": True}),
    ("LSTM", "bidirectional", {"final": True}),
    ("GRU", "forward", {"lbr": 1}),
    ("GRU", "bidirectional", {"lbr": 0}),
    ("GRU", "bidirectional", {"lbr": 1, "final": True}),
    ("RNN", "bidirectional", {}),
]


@pytest.mark.parametrize("op, direction, options", CASES)
def test_every_subset_matches_the_reconstructed_recurrence(op, direction, options):
    """Brute force over every kept pair of 3 units, with plain selection and with a random
    correction (M, c) in the recurrence and the consumer (different per direction)."""
    model = recurrent_model(op, direction, **options)
    x = np.random.default_rng(1).standard_normal((T, 2, IN)).astype(np.float32)
    rng = np.random.default_rng(2)
    directions = 2 if direction == "bidirectional" else 1
    for keeps in itertools.product(itertools.combinations(range(H), 2), repeat=directions):
        for corrected in (False, True):
            units = {}
            for d, keep in enumerate(keeps):
                m = np.eye(H)[list(keep)]
                c = np.zeros(H)
                if corrected:
                    m = m + 0.3 * rng.standard_normal(m.shape)
                    c = 0.2 * rng.standard_normal(H)
                units[d] = (np.asarray(keep), m, c)
            got = run_model(_pruned(model, units), {"x": x})["head_out"]
            want = reference(model, x, units)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("op, direction, options", CASES)
def test_the_reference_is_onnx_runtimes_recurrence(op, direction, options):
    model = recurrent_model(op, direction, **options)
    x = np.random.default_rng(1).standard_normal((T, 2, IN)).astype(np.float32)
    want = reference(model, x, {})
    got = run_model(model, {"x": x})["head_out"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# --- the analyzer -------------------------------------------------------------------------


def _groups(model: onnx.ModelProto) -> dict:
    return {g.name: g for g in analyze(normalize(model))}


def test_one_group_per_direction_with_equal_widths_and_the_recurrence_tap():
    groups = _groups(recurrent_model("LSTM", "bidirectional"))
    forward, backward = groups["rnn[0:3]"], groups["rnn[3:6]"]
    for d, group in enumerate((forward, backward)):
        assert group.prunable and not group.rotatable
        assert group.consumers == ("head",) and group.ties == ("rnn:hidden",)
        assert [t.key for t in group.taps] == ["merge_out" if d == 0 else "merge_out@3"]
    assert groups["feat"].prunable and groups["feat"].consumers == ("rnn",)


def test_final_states_read_one_direction_each_are_followed_from_both_gathers():
    """cat(h_n[-2], h_n[-1]): direction d's units reach the head at d·H of the Concat; the
    recurrence's tap is direction d's entry of the (unread) sequence Y."""
    groups = _groups(recurrent_model("LSTM", "bidirectional", final=True))
    for d, name in enumerate(("rnn[0:3]", "rnn[3:6]")):
        group = groups[name]
        assert group.prunable and group.consumers == ("head",), group.reason
        assert group.taps == (Tap("rnn_out", 3, 0, select=(1, d)), Tap("finals_out", 1, d * H))


def test_a_selected_tap_reads_one_direction_of_the_sequence():
    y = np.random.default_rng(0).standard_normal((T, 2, B, H))
    for d in range(2):
        rows = tap_rows(y, Tap("y", 3, 0, select=(1, d)), H)
        np.testing.assert_array_equal(rows, y[:, d].reshape(-1, H))


def test_unidirectional_final_state_is_followed():
    group = _groups(recurrent_model("GRU", read_final=True))["rnn"]
    assert group.reason == "channels reach graph output 'final_out'"


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda m: _attr(m, "layout", 1), "layout=1"),
        (lambda m: _input(m, 5, "x"), "initial state that is neither constant nor zero"),
    ],
)
def test_unsupported_recurrent_nodes_are_refused_with_the_reason(change, reason):
    model = recurrent_model("LSTM")
    change(model)
    assert reason in _groups(model)["rnn"].reason


def test_bidirectional_final_states_are_refused():
    group = _groups(recurrent_model("LSTM", "bidirectional", read_final=True))["rnn[0:3]"]
    assert "final states Y_h/Y_c are read" in group.reason


def _attr(model: onnx.ModelProto, name: str, value: int) -> None:
    node = next(n for n in model.graph.node if n.name == "rnn")
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _input(model: onnx.ModelProto, index: int, tensor: str) -> None:
    node = next(n for n in model.graph.node if n.name == "rnn")
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = tensor


# --- end to end: exact where the algebra says so ------------------------------------------


def _x(n: int = 64, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, n, IN)).astype(np.float32)


@pytest.mark.parametrize("op, direction, options", CASES)
@pytest.mark.parametrize("method", ["magnitude", "id"])
def test_ratio_zero_is_the_identity(op, direction, options, method, save_tmp):
    path = save_tmp(recurrent_model(op, direction, **options))
    result = onnxprune.prune(path, method=method, ratio=0.0, round_to=1, data={"x": _x()})
    assert_outputs_close(path, result.model, {"x": _x(8, 4)}, atol=1e-6)


def _duplicated(op: str, d: int) -> dict[str, np.ndarray]:
    """W, R, B where unit 2 of every direction repeats unit 0 (same rows in every gate block):
    their hidden states are equal at every step."""
    rng, g = np.random.default_rng(5), GATES[op]
    w = rng.standard_normal((d, g * H, IN))
    r = rng.standard_normal((d, g * H, H))
    bias = rng.standard_normal((d, 2 * g * H))
    for k in range(g):
        w[:, k * H + 2], r[:, k * H + 2] = w[:, k * H], r[:, k * H]
        bias[:, k * H + 2], bias[:, (g + k) * H + 2] = bias[:, k * H], bias[:, (g + k) * H]
    return {"W": w, "R": r, "B": bias}


@pytest.mark.parametrize("op, direction", [("LSTM", "bidirectional"), ("GRU", "forward")])
@pytest.mark.parametrize("compensate", ["none", "bias"])
def test_duplicated_hidden_unit_is_removed_exactly_by_id(op, direction, compensate, save_tmp):
    d = 2 if direction == "bidirectional" else 1
    path = save_tmp(recurrent_model(op, direction, weights=_duplicated(op, d)))
    result = onnxprune.prune(
        path, method="id", compensate=compensate, recalibrate=False, ratio=1 / 3, round_to=1,
        exclude=["feat"], data={"x": _x()},
    )  # fmt: skip
    for name, plan in result.plans.items():
        assert len(plan.keep) == 2 and 1 in plan.keep, name
    assert_outputs_close(path, result.model, {"x": _x(8, 4)}, atol=1e-5)


@pytest.mark.parametrize("op, direction", [("LSTM", "bidirectional"), ("GRU", "forward")])
def test_tf2onnx_zero_states_block_neither_the_features_nor_the_hidden_units(op, direction):
    """tf2onnx reads the batch size off the features (Shape → Cast → Slice(1, 2)) to build zero
    initial states: the read misses the feature axis, and the states are provably zero."""
    groups = _groups(recurrent_model(op, direction, zero_state="tf2onnx"))
    inner = {n: g for n, g in groups.items() if n != "head"}  # the head reaches the output
    assert set(inner) == {"feat"} | {n for n in groups if n.startswith("rnn")}
    assert len(inner) == 1 + (2 if direction == "bidirectional" else 1)
    assert all(g.prunable for g in inner.values()), {n: g.reason for n, g in inner.items()}


def test_keras_bidirectional_last_steps_are_followed_per_direction():
    groups = _groups(recurrent_model("LSTM", "bidirectional", final="tf2onnx"))
    hidden = {n: g for n, g in groups.items() if n.startswith("rnn")}
    assert len(hidden) == 2 and all(g.prunable for g in hidden.values())
    assert all(g.consumers == ("head",) for g in hidden.values())


TF2ONNX_CASES = [
    ("LSTM", "bidirectional", {"zero_state": "tf2onnx"}),
    ("GRU", "forward", {"zero_state": "tf2onnx"}),
    ("LSTM", "bidirectional", {"final": "tf2onnx"}),
    ("GRU", "bidirectional", {"final": "tf2onnx"}),
]


@pytest.mark.parametrize("op, direction, options", TF2ONNX_CASES)
def test_tf2onnx_patterns_ratio_zero_and_a_duplicated_unit_exact(op, direction, options, save_tmp):
    """tf2onnx's zero states and its per-direction reads of a Bidirectional output: ratio 0
    reproduces the model, and id removes a duplicated hidden unit of each direction exactly."""
    d = 2 if direction == "bidirectional" else 1
    path = save_tmp(recurrent_model(op, direction, weights=_duplicated(op, d), **options))
    held = {"x": _x(8, 4)}
    same = onnxprune.prune(path, method="id", ratio=0.0, round_to=1, data={"x": _x()})
    assert_outputs_close(path, same.model, held, atol=1e-6)
    result = onnxprune.prune(
        path, method="id", compensate="none", recalibrate=False, ratio=1 / 3, round_to=1,
        exclude=["feat"], data={"x": _x()},
    )  # fmt: skip
    assert [len(plan.keep) for plan in result.plans.values()] == [2] * d
    assert_outputs_close(path, result.model, held, atol=1e-5)


def test_constant_input_feature_folds_into_the_lstm_bias(save_tmp):
    """Feature 1 of the MatMul before the LSTM is a constant (zero weight column): ID with an
    intercept removes it exactly, W's columns taking M and Wb the shift W c."""
    features = 0.5 * np.random.default_rng(6).standard_normal((IN, IN))
    features[:, 1] = 0.0
    path = save_tmp(recurrent_model("LSTM", "bidirectional", features=features))
    result = onnxprune.prune(
        path, method="id", compensate="bias", recalibrate=False, ratio=0.25, round_to=1,
        exclude=["rnn"], data={"x": _x()},
    )  # fmt: skip
    assert list(result.plans) == ["feat"] and 1 not in result.plans["feat"].keep
    assert_outputs_close(path, result.model, {"x": _x(8, 4)}, atol=1e-5)


# --- the torch interpreter (gradient methods) ---------------------------------------------


@pytest.mark.parametrize("op, direction, options", CASES)
def test_torch_interpreter_runs_the_recurrence_like_onnx_runtime(op, direction, options):
    model = recurrent_model(op, direction, read_final=True, **options)
    graph = check_against_ort(model, {"x": _x(4)}, rtol=1e-4, atol=1e-5)
    out = graph.run({"x": _x(4)})
    sum(value.sum() for value in out.values()).backward()
    assert all(graph.params[name].grad is not None for name in ("W", "R", "B"))


def test_taylor_scores_lstm_hidden_units(save_tmp):
    path = save_tmp(recurrent_model("LSTM", "bidirectional"))
    x = _x()
    result = onnxprune.prune(
        path, method="taylor", ratio=1 / 3, round_to=1, exclude=["feat"],
        data={"x": x},
    )  # fmt: skip
    assert {len(p.keep) for p in result.plans.values()} == {2}


def test_per_channel_biascomp_refuses_recurrent_readers(save_tmp):
    path = save_tmp(recurrent_model("LSTM"))
    with pytest.raises(UsageError, match="read by LSTM 'rnn'"):
        onnxprune.prune(path, method="biascomp", ratio=0.3, data={"x": _x()})


# --- the recurrent reference models (both exporters) -------------------------------------


@pytest.mark.parametrize("exporter", ["onnx", "dynamo.onnx"])
@pytest.mark.parametrize("name, op", [("crnn", "LSTM"), ("crnn_gru", "GRU")])
def test_crnn_recurrent_units_and_the_conv_before_them_are_prunable(name, op, exporter):
    analysis = onnxprune.analyze(str(reference_path(name, exporter)))
    recurrent = [g for g in analysis.groups if op in g.name]
    assert len(recurrent) == 4 and all(g.prunable for g in recurrent)
    assert sum(g.prunable for g in analysis.groups) == len(analysis.groups) - 1  # the output


@pytest.mark.parametrize("exporter", ["onnx", "dynamo.onnx"])
@pytest.mark.parametrize("name", ["crnn", "crnn_gru"])
def test_crnn_keeps_string_accuracy_at_half_the_recurrent_parameters(name, exporter):
    """43 of 64 units per direction: 50.2 % fewer LSTM (or GRU) weights; ID within 2 points."""
    from models.crnn import string_accuracy

    path = reference_path(name, exporter)
    with np.load(data_path(name, "test")) as test:
        x, labels = test["input"][:300], test["labels"][:300]
    calib = reference_feeds(name, 128)
    result = onnxprune.prune(
        str(path), method="id", ratio=21 / 64, round_to=1, exclude=["Conv"], data=calib
    )
    assert {len(p.keep) for p in result.plans.values()} == {43}
    before = string_accuracy(run_model(path, {"input": x})["logits"], labels)
    after = string_accuracy(run_model(result.model, {"input": x})["logits"], labels)
    assert after >= before - 2.0


@pytest.mark.parametrize("exporter", ["onnx", "dynamo.onnx"])
def test_bilstm_classifier_keeps_accuracy_at_half_the_lstm_parameters(exporter):
    """The 2-layer bidirectional LSTM read as cat(h_n[-2], h_n[-1]): 44 of 64 units per
    direction, 50.1 % fewer LSTM weights; ID within 2 points on the test digits."""
    path = reference_path("bilstm", exporter)
    with np.load(data_path("bilstm", "test")) as test:
        x, labels = test["input"], test["labels"]
    result = onnxprune.prune(
        str(path), method="id", ratio=20 / 64, round_to=1, data=reference_feeds("bilstm", 256)
    )
    assert len(result.plans) == 4 and {len(p.keep) for p in result.plans.values()} == {44}
    before = np.mean(run_model(path, {"input": x})["logits"].argmax(1) == labels)
    after = np.mean(run_model(result.model, {"input": x})["logits"].argmax(1) == labels)
    assert after >= before - 0.02


def test_zero_bias_and_peepholes_are_sliced_like_any(save_tmp):
    """All-zero B and P are ordinary constants: sliced, not mistaken for absent inputs."""
    zeros = {"B": np.zeros((1, 8 * H))}
    model = recurrent_model("LSTM", weights=zeros, peepholes=True)
    p = next(t for t in model.graph.initializer if t.name == "P")
    p.CopyFrom(onnx.numpy_helper.from_array(np.zeros((1, 3 * H), np.float32), "P"))
    path = save_tmp(model)
    result = onnxprune.prune(
        path, method="magnitude", ratio=1 / 3, round_to=1, exclude=["feat"], data={"x": _x()}
    )
    units = {0: (np.asarray(result.plans["rnn"].keep), np.eye(H)[result.plans["rnn"].keep], 0)}
    x = _x(8, 4)
    np.testing.assert_allclose(
        run_model(result.model, {"x": x})["head_out"], reference(model, x, units), rtol=1e-4,
        atol=1e-5,
    )  # fmt: skip


def test_magnitude_ranks_units_by_their_input_rows_in_every_gate(save_tmp):
    """Unit 1's W rows are 10× larger in every gate block: magnitude keeps it."""
    rng = np.random.default_rng(7)
    w = 0.1 * rng.standard_normal((1, 4 * H, IN))
    w[0, 1::H] *= 100.0
    path = save_tmp(recurrent_model("LSTM", weights={"W": w}))
    result = onnxprune.prune(
        path, method="magnitude", ratio=2 / 3, round_to=1, exclude=["feat"], data={"x": _x()}
    )
    assert list(result.plans["rnn"].keep) == [1]


def test_ippro_pairs_unit_rows_with_their_gradients(save_tmp):
    path = save_tmp(recurrent_model("GRU", "bidirectional"))
    result = onnxprune.prune(
        path, method="ippro", ratio=1 / 3, round_to=1, exclude=["feat"], data={"x": _x()}
    )
    assert {len(p.keep) for p in result.plans.values()} == {2}


# --- torch classifiers reading h_n[-1] (a Gather on the direction axis) or y[-1] ----------

HIDDEN = 8


def _classifier(read: str, seed: int = 0, duplicate: bool = False, layers: int = 1):
    """x (T, N, IN) → torch LSTM(HIDDEN, `layers`) → `read` → Linear(·, K): "hn" reads h_n[-1],
    "last" y[-1], "hn2" the bidirectional cat(h_n[-2], h_n[-1]), "both" the bidirectional
    cat(y[-1], h_n[-2], h_n[-1]) (the merged sequence and the final states). With `duplicate`,
    unit 2 repeats unit 0 in every gate block of every layer (equal hidden states at every
    step)."""
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            directions = 2 if read in ("hn2", "both") else 1
            self.lstm = torch.nn.LSTM(IN, HIDDEN, layers, bidirectional=directions == 2)
            self.fc = torch.nn.Linear((4 if read == "both" else directions) * HIDDEN, K)

        def forward(self, x):
            y, (h, _) = self.lstm(x)
            if read == "hn":
                return self.fc(h[-1])
            if read == "last":
                return self.fc(y[-1])
            if read == "both":
                return self.fc(torch.cat([y[-1], h[-2], h[-1]], dim=1))
            return self.fc(torch.cat([h[-2], h[-1]], dim=1))

    torch.manual_seed(seed)
    module = Classifier().eval()
    if duplicate:
        with torch.no_grad():
            for value in module.lstm.parameters():
                blocks = value.view(4, HIDDEN, *value.shape[1:])
                blocks[:, 2] = blocks[:, 0]
    return module


def _export(module, exporter: str, path) -> str:
    """`module` exported by the legacy ("onnx") or the dynamo exporter, batch dynamic."""
    import warnings

    import torch

    x = torch.randn(T, 2, IN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "onnx":
            torch.onnx.export(
                module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                output_names=["y"], dynamic_axes={"x": {1: "N"}, "y": {0: "N"}},
            )  # fmt: skip
        else:
            batch = torch.export.Dim("N")
            torch.onnx.export(
                module, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                dynamic_shapes=({1: batch},), verbose=False,
            )  # fmt: skip
    return str(path)


EXPORTERS = ["onnx", "dynamo"]


READS = [("hn", 1), ("last", 1), ("hn", 2), ("hn2", 1), ("hn2", 2), ("both", 1)]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("read, layers", READS)
def test_classifier_reading_the_final_state_is_prunable(read, layers, exporter, tmp_path):
    """h_n[-1] of a stacked LSTM is a Gather of the layers' Y_h concatenated on axis 0: the
    loader lets it read the last layer's Y_h (graph/load.py), so every layer is a group (one
    per direction of a bidirectional one, whose cat(h_n[-2], h_n[-1]) Gathers each direction)."""
    path = _export(_classifier(read, layers=layers), exporter, tmp_path / "m.onnx")
    groups = [g for g in onnxprune.analyze(path).groups if g.channels == HIDDEN]
    directions = 2 if read in ("hn2", "both") else 1
    assert len(groups) == directions * layers, [g.name for g in groups]
    assert all(g.prunable for g in groups), [g.reason for g in groups]
    result = onnxprune.prune(path, method="id", ratio=0.0, round_to=1, data={"x": _x()})
    assert_outputs_close(path, result.model, {"x": _x(8, 4)}, atol=1e-6)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("read, layers", READS)
def test_classifier_duplicated_unit_is_removed_exactly_by_id(read, layers, exporter, tmp_path):
    module = _classifier(read, duplicate=True, layers=layers)
    path = _export(module, exporter, tmp_path / "m.onnx")
    result = onnxprune.prune(
        path, method="id", compensate="none", recalibrate=False, ratio=1 / HIDDEN, round_to=1,
        data={"x": _x()},
    )  # fmt: skip
    assert len(result.plans) == (2 if read in ("hn2", "both") else 1) * layers
    for plan in result.plans.values():
        assert len(plan.keep) == HIDDEN - 1 and not {0, 2} <= set(plan.keep.tolist())
    assert_outputs_close(path, result.model, {"x": _x(8, 4)}, atol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("read", ["hn", "hn2"])
def test_classifier_at_half_the_units_is_the_lstm_of_the_kept_units(read, exporter, tmp_path):
    """Magnitude at 50 %: the pruned model equals, in torch, an LSTM built from the kept units'
    rows of every gate block (and columns of the recurrence) of each direction → Linear on
    their columns (direction d's at d·HIDDEN of cat(h_n[-2], h_n[-1]))."""
    import torch

    module = _classifier(read, seed=1)
    path = _export(module, exporter, tmp_path / "m.onnx")
    result = onnxprune.prune(path, method="magnitude", ratio=0.5, round_to=1, data={"x": _x()})
    keeps = [torch.as_tensor(np.sort(result.plans[name].keep)) for name in sorted(result.plans)]
    assert len(keeps) == (2 if read == "hn2" else 1) and {len(k) for k in keeps} == {HIDDEN // 2}
    small = torch.nn.LSTM(IN, HIDDEN // 2, bidirectional=read == "hn2")
    with torch.no_grad():
        for name, value in module.lstm.named_parameters():
            keep = keeps[name.endswith("_reverse")]
            value = value[torch.cat([g * HIDDEN + keep for g in range(4)])]
            getattr(small, name).copy_(value[:, keep] if name.startswith("weight_hh") else value)
        x = torch.as_tensor(_x(8, 4))
        columns = torch.cat([d * HIDDEN + keep for d, keep in enumerate(keeps)])
        finals = small(x)[1][0][-len(keeps) :]  # h_n[-1], or h_n[-2] and h_n[-1]
        expected = torch.cat(list(finals), dim=1) @ module.fc.weight[:, columns].T + module.fc.bias
    got = run_model(result.model, {"x": _x(8, 4)})["y"]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
