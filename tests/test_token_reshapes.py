"""Reshapes between conv feature maps and token sequences, as timm's hybrid models export them
(ops/reshape.py):

- LeViT's Linear + BatchNorm1d over tokens, `bn(y.flatten(0, 1)).reshape_as(y)`: MatMul →
  Flatten(axis 2) → BatchNormalization → Reshape(·, Shape(y)). The Flatten keeps the channels
  on its last axis, and the Reshape's target is y's shape, which shrinks with the same group.
- `y.flatten(2)` of a conv output (patch embeddings of LeViT, EfficientFormer): Reshape(y,
  Concat(Slice(Shape(y), 0, 2), [-1])) keeps the batch and channel axes, read from y's own shape.

Both are prunable and pruned exactly; a target that does not keep the channels is refused."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close, max_deviation, run_model

import onnxprune
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import normalize

TOKENS, DIM, HIDDEN, OUT = 5, 4, 6, 3
TWINS = {3: 0, 4: 1, 5: 2}  # hidden unit → the unit it repeats


def _linear_norm(twins: bool = True, *, shape_of: str = "y"):
    """x[N, 5, 4] → MatMul(4 → 6) = y → Flatten(axis 2) → BN(6) → Reshape(Shape(`shape_of`)) →
    Relu → MatMul(6 → 3) → out; beside it other = MatMul(x, 4 → 6) → ReduceSum → side. With
    `twins`, hidden units 3–5 repeat units 0–2 (weights and BN), so removing three units loses
    nothing when their twins take over their readout."""
    b = graphs.Builder(3)
    w1 = (0.5 * b.rng.standard_normal((DIM, HIDDEN))).astype(np.float32)
    g, beta = 1 + 0.3 * b.rng.standard_normal(HIDDEN), 0.5 * b.rng.standard_normal(HIDDEN)
    mean, var = 0.5 * b.rng.standard_normal(HIDDEN), 0.5 + b.rng.random(HIDDEN)
    if twins:
        for hi, lo in TWINS.items():
            w1[:, hi] = w1[:, lo]
            g[hi], beta[hi], mean[hi], var[hi] = g[lo], beta[lo], mean[lo], var[lo]
    y = b.node("MatMul", "fc1", ["x", b.const("fc1.w", w1)])
    flat = b.node("Flatten", "flat", [y], axis=2)
    params = [b.const(f"bn.{k}", v.astype(np.float32)) for k, v in
              (("g", g), ("beta", beta), ("mean", mean), ("var", var))]  # fmt: skip
    norm = b.node("BatchNormalization", "bn", [flat, *params], epsilon=1e-5)
    other = b.node("MatMul", "other", ["x", b.rand("other.w", DIM, HIDDEN)])
    target = b.node("Shape", "shape", [y if shape_of == "y" else other])
    restored = b.node("Reshape", "restore", [norm, target])
    h = b.relu("act", restored)
    out = b.node("MatMul", "fc2", [h, b.rand("fc2.w", HIDDEN, OUT)])
    side = b.node("ReduceSum", "side", [other], keepdims=0)  # `other` feeds the output too
    return b.model([out, side], shape=("N", TOKENS, DIM))


def _feeds(n: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, TOKENS, DIM)).astype(np.float32)
    return {"x": x}


def _hidden_group(model: onnx.ModelProto):
    groups = analyze(normalize(model))
    return next(g for g in groups if "fc1" in g.producers)


def test_the_hidden_units_behind_flatten_and_reshape_as_are_one_prunable_group():
    group = _hidden_group(_linear_norm())
    assert group.prunable, group.reason
    assert "fc2" in group.consumers


def test_a_target_read_from_a_tensor_not_pruned_alike_is_refused():
    """Shape(other) has y's shape, but other's units are not the group's: refused."""
    group = _hidden_group(_linear_norm(shape_of="other"))
    assert not group.prunable
    assert "restore" in group.reason


def test_ratio_zero_is_exact():
    model, feeds = _linear_norm(twins=False), _feeds()
    result = onnxprune.prune(model, method="id", ratio=0.0, data=feeds, allow_noop=True)
    assert_outputs_close(model, result.model, feeds, atol=1e-6)


def test_id_removes_the_twins_exactly_and_the_output_keeps_its_shape():
    model, feeds = _linear_norm(), _feeds()
    plain = dict(compensate="none", recalibrate=False, round_to=1, verify=False)
    result = onnxprune.prune(model, method="id", ratio=0.5, data=feeds, **plain)
    weights = {t.name: t for t in result.model.graph.initializer}
    fc1 = next(n for n in result.model.graph.node if n.name == "fc1")
    assert tuple(weights[fc1.input[1]].dims) == (DIM, HIDDEN - len(TWINS))
    onnx.checker.check_model(result.model, full_check=True)
    held = _feeds(16, seed=2)
    assert_outputs_close(model, result.model, held, atol=1e-5)
    assert run_model(result.model, held)["fc2_out"].shape == (16, TOKENS, OUT)
    dropped = onnxprune.prune(model, method="activation", ratio=0.5, data=feeds, **plain)
    assert max_deviation(model, dropped.model, held) > 1e-2  # the fold is what makes it exact


def _flatten2(twins: bool = True, *, channel_entry_last: bool = False, stated: bool = False):
    """x[N, 3, 4, 4] → Conv(6) = y → Reshape(y, Concat(Slice(Shape(y), 0, 2), [-1])) → (N, 6,
    16) → Transpose → (N, 16, 6) → Relu → MatMul(6 → 3) → out. `channel_entry_last` reads the
    target as (N, -1, 6) instead: the same count, but the data reinterpreted, not kept.
    `stated`: the dynamo exporter's constant target [-1, 6, 16] with `allowzero` 1. With
    `twins`, channels 3–5 repeat channels 0–2."""
    b = graphs.Builder(4)
    w = (0.5 * b.rng.standard_normal((HIDDEN, 3, 3, 3))).astype(np.float32)
    bias = (0.5 * b.rng.standard_normal(HIDDEN)).astype(np.float32)
    if twins:
        for hi, lo in TWINS.items():
            w[hi], bias[hi] = w[lo], bias[lo]
    y = b.conv("conv", "x", 3, HIDDEN, weight=w, b=bias)
    shape = b.node("Shape", "shape", [y])
    ints = {k: b.const(k, np.array([v], dtype=np.int64)) for k, v in
            (("zero", 0), ("one", 1), ("two", 2), ("minus", -1))}  # fmt: skip
    if stated:
        target = b.const("target", np.array([-1, HIDDEN, 16], dtype=np.int64))
    elif channel_entry_last:
        batch = b.node("Slice", "batch", [shape, ints["zero"], ints["one"]])
        count = b.node("Slice", "count", [shape, ints["one"], ints["two"]])
        target = b.node("Concat", "target", [batch, ints["minus"], count], axis=0)
    else:
        # with its axes stated, as the legacy exporter writes it
        lead = b.node("Slice", "lead", [shape, ints["zero"], ints["two"], ints["zero"]])
        target = b.node("Concat", "target", [lead, ints["minus"]], axis=0)
    flat = b.node("Reshape", "flat2", [y, target], **({"allowzero": 1} if stated else {}))
    tokens = b.node("Transpose", "tokens", [flat], perm=[0, 2, 1])
    out = b.node("MatMul", "fc", [b.relu("act", tokens), b.rand("fc.w", HIDDEN, OUT)])
    return b.model([out], shape=("N", 3, 4, 4))


def _conv_group(model: onnx.ModelProto):
    return next(g for g in analyze(normalize(model)) if "conv" in g.producers)


@pytest.mark.parametrize("stated", [False, True], ids=["shape-read", "dynamo-constant"])
def test_flatten2_keeps_the_conv_channels_prunable(stated):
    group = _conv_group(_flatten2(stated=stated))
    assert group.prunable, group.reason
    assert "fc" in group.consumers


def test_a_target_that_moves_the_read_channel_count_is_refused():
    group = _conv_group(_flatten2(channel_entry_last=True))
    assert not group.prunable
    assert group.reason == "Reshape 'flat2' does not flatten from the channel axis"


@pytest.mark.parametrize("stated", [False, True], ids=["shape-read", "dynamo-constant"])
def test_flatten2_ratio_zero_and_the_twins_are_exact(stated):
    """The dynamo target [-1, 6, 16] states the channel count: it becomes [0, 3, 16]."""
    feeds = {"x": np.random.default_rng(5).standard_normal((64, 3, 4, 4)).astype(np.float32)}
    held = {"x": np.random.default_rng(6).standard_normal((16, 3, 4, 4)).astype(np.float32)}
    plain = dict(compensate="none", recalibrate=False, round_to=1, verify=False)
    model = _flatten2(twins=False, stated=stated)
    result = onnxprune.prune(model, method="id", ratio=0.0, data=feeds, allow_noop=True)
    assert_outputs_close(model, result.model, held, atol=1e-6)
    model = _flatten2(stated=stated)
    result = onnxprune.prune(model, method="id", ratio=0.5, data=feeds, **plain)
    conv = next(n for n in result.model.graph.node if n.name == "conv")
    weights = {t.name: t for t in result.model.graph.initializer}
    assert tuple(weights[conv.input[1]].dims) == (HIDDEN - len(TWINS), 3, 3, 3)
    onnx.checker.check_model(result.model, full_check=True)
    assert_outputs_close(model, result.model, held, atol=1e-5)


def test_an_unfold_into_patches_is_refused_with_its_reason():
    """MobileViT's unfold `reshape(B·C·nh, ph, nw, pw)` states the axis before the channels as
    the batch times the channel count (times nh), computed from the input's shape: the channels
    move into that axis, which no rule follows; the group is refused at that Reshape."""
    b = graphs.Builder(6)
    y = b.conv("conv", "x", 3, HIDDEN)
    batch = b.node("Gather", "batch", [b.node("Shape", "shape", [y]), b.const("i0", np.int64(0))])
    folded = b.node(
        "Mul", "folded", [b.node("Mul", "by_c", [batch, b.const("c", np.int64(HIDDEN))]),
                          b.const("nh", np.int64(2))])  # fmt: skip
    pieces = [b.node("Unsqueeze", "lead", [folded, b.const("ax", np.array([0], np.int64))])]
    pieces.append(b.const("rest", np.array([2, 2, 2], np.int64)))
    patches = b.node("Reshape", "unfold", [y, b.node("Concat", "target", pieces, axis=0)])
    out = b.node("MatMul", "fc", [b.relu("act", patches), b.rand("fc.w", 2, OUT)])
    group = _conv_group(b.model([out], shape=("N", 3, 4, 4)))
    assert not group.prunable
    assert group.reason == (
        "Reshape 'unfold' folds the channels into the axis before them (an unfold into patches, "
        "MobileViT's): not followed"
    )
