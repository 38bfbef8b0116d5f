"""GroupNorm: groups of channels pruned whole, exactly where the math says (ops/group_norm.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import Builder

import onnxprune
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import normalize

C, G = 8, 4  # two channels per norm group


def gn_model(
    spelling: str = "exported", *, dup: bool = False, batch: object = "N"
) -> onnx.ModelProto:
    """x (batch, 3, 6, 6) → 1×1 Conv to C → GroupNorm(G) → Relu → 1×1 Conv to 5.

    `spelling`: "exported" (Reshape [0, G, -1] → InstanceNormalization → Reshape to Shape(x) →
    Mul γ → Add β, as both torch exporters write it; with a fixed batch the merge's target is
    a constant), "opset21" (one GroupNormalization op). `dup`: group 3 repeats group 1 (same
    filters, same γ and β)."""
    b = Builder(seed=3)
    w = (0.5 * b.rng.standard_normal((C, 3, 1, 1))).astype(np.float32)
    bias = (0.2 * b.rng.standard_normal(C)).astype(np.float32)
    if dup:
        w[6:8], bias[6:8] = w[2:4], bias[2:4]
    h = b.conv("c1", "x", 3, C, 1, weight=w, b=bias)
    gamma = (1 + 0.3 * b.rng.standard_normal(C)).astype(np.float32)
    beta = (0.3 * b.rng.standard_normal(C)).astype(np.float32)
    if dup:
        gamma[6:8], beta[6:8] = gamma[2:4], beta[2:4]
    if spelling == "exported":
        split = b.node("Reshape", "split", [h, b.const("gn.t", np.array([0, G, -1], np.int64))])
        ones, zeros = np.ones(G, np.float32), np.zeros(G, np.float32)
        normed = b.node(
            "InstanceNormalization", "inorm", [split, b.const("gn.1", ones), b.const("gn.0", zeros)]
        )
        if isinstance(batch, int):
            target = b.const("gn.shape", np.array([batch, C, 6, 6], np.int64))
        else:
            target = b.node("Shape", "shape", [h])
        merged = b.node("Reshape", "merge", [normed, target])
        g3 = gamma.reshape(C, 1, 1)
        scaled = b.node("Mul", "gamma", [merged, b.const("gn.g", g3)])
        y = b.node("Add", "beta", [scaled, b.const("gn.b", beta.reshape(C, 1, 1))])
        opset = 17
    else:
        opset = 21
        inputs = [h, b.const("gn.g", gamma), b.const("gn.b", beta)]
        y = b.node("GroupNormalization", "gnorm", inputs, num_groups=G, epsilon=1e-5)
    r = b.relu("r", y)
    out = b.conv("c2", r, C, 5, 1)
    if spelling == "exported":
        return b.model([out], shape=(batch, 3, 6, 6), opset=opset)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, 6, 6])
    y = onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [batch, 5, 6, 6])
    graph = onnx.helper.make_graph(b.nodes, "gn", [x], [y], b.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _weight(model: onnx.ModelProto, node: str) -> np.ndarray:
    (found,) = (n for n in model.graph.node if n.name == node)
    (weight,) = (t for t in model.graph.initializer if t.name == found.input[1])
    return onnx.numpy_helper.to_array(weight)


def _images(n: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)


def _reference(model: onnx.ModelProto, x: np.ndarray, kept_groups: list[int]) -> np.ndarray:
    """The network computed in numpy with only `kept_groups` of the norm read by c2."""
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    h = np.einsum("oc,nchw->nohw", w["c1.w"][:, :, 0, 0], x) + w["c1.b"].reshape(1, C, 1, 1)
    grouped = h.reshape(len(x), G, -1).astype(np.float64)
    mean, var = grouped.mean(-1, keepdims=True), grouped.var(-1, keepdims=True)
    normed = ((grouped - mean) / np.sqrt(var + 1e-5)).reshape(h.shape)
    gamma, beta = w["gn.g"].reshape(-1), w["gn.b"].reshape(-1)
    y = np.maximum(normed * gamma.reshape(1, C, 1, 1) + beta.reshape(1, C, 1, 1), 0)
    mask = np.zeros(C)
    for g in kept_groups:
        mask[2 * g : 2 * g + 2] = 1
    w2 = w["c2.w"][:, :, 0, 0] * mask
    return np.einsum("oc,nchw->nohw", w2, y) + w["c2.b"].reshape(1, 5, 1, 1)


@pytest.mark.parametrize("spelling", ["exported", "opset21"])
def test_a_producer_read_by_a_group_norm_prunes_in_whole_groups(spelling):
    (group, c2) = analyze(normalize(gn_model(spelling)))
    assert group.prunable and group.norm_group and not group.heads
    assert (group.channels, group.head_dim, group.unit) == (G, C // G, C // G)
    assert group.consumers == ("c2",)


@pytest.mark.parametrize("spelling", ["exported", "opset21"])
def test_selection_keeps_whole_groups_and_matches_the_network_without_them(spelling):
    model, x = gn_model(spelling), _images()
    pruned = onnxprune.prune(
        model, method="magnitude", ratio=0.5, data={"x": x}, round_to=1,
        compensate="none", recalibrate=False, sequential=False,
    )  # fmt: skip
    keep = sorted(int(k) for k in pruned.plans["c1"].keep)
    assert len(keep) == 2
    assert _weight(pruned.model, "c1").shape[0] == 4  # 2 groups × 2 channels
    want = _reference(gn_model("exported"), x[:8], keep)
    got = _run(pruned.model, x[:8])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("spelling", ["exported", "opset21"])
def test_ratio_zero_is_exact(spelling):
    model, x = gn_model(spelling), _images()
    pruned = onnxprune.prune(model, method="id", ratio=0.0, data={"x": x})
    want = _run(model, x[:8])
    np.testing.assert_allclose(
        _run(pruned.model, x[:8]), want, rtol=1e-5, atol=1e-5 * np.abs(want).max()
    )


@pytest.mark.parametrize("batch", ["N", 1])
def test_a_duplicated_group_is_removed_exactly(batch):
    """Group 3 repeats group 1 (same filters, γ, β: same statistics, same outputs): ID drops
    one of them and maps it onto the other, so the output does not change."""
    model = gn_model(dup=True, batch=batch)
    x = _images(48 if batch == "N" else 1)
    data = {"x": _images(48)}
    pruned = onnxprune.prune(model, method="id", ratio=0.25, data=data, round_to=1)
    assert len(pruned.plans["c1"].keep) == G - 1
    assert {1, 3} - {int(k) for k in pruned.plans["c1"].keep}
    want = _run(model, x[:8])
    np.testing.assert_allclose(
        _run(pruned.model, x[:8]), want, rtol=1e-4, atol=1e-4 * np.abs(want).max()
    )
    # the norm is still there, with G - 1 groups: the split's target and the instance norm's
    # scale and bias say so
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.model.graph.initializer}
    nodes = {n.name: n for n in pruned.model.graph.node}
    assert inits[nodes["split"].input[1]].tolist() == [0, G - 1, -1]
    assert [inits[name].shape for name in nodes["inorm"].input[1:]] == [(G - 1,)] * 2
    split = next(n for n in pruned.model.graph.node if n.op_type == "InstanceNormalization")
    scale = next(t for t in pruned.model.graph.initializer if t.name == split.input[1])
    assert onnx.numpy_helper.to_array(scale).shape == (G - 1,)


def test_channels_reaching_a_group_norm_not_whole_are_refused_with_the_reason():
    """Two producers concatenated before the norm: neither reaches it alone, so neither
    is pruned by groups, and removing single channels would change a group's statistics."""
    b = Builder(seed=1)
    a = b.conv("a", "x", 3, 4, 1)
    c = b.conv("c", "x", 3, 4, 1)
    cat = b.node("Concat", "cat", [a, c], axis=1)
    split = b.node("Reshape", "split", [cat, b.const("t", np.array([0, G, -1], np.int64))])
    ones, zeros = np.ones(G, np.float32), np.zeros(G, np.float32)
    normed = b.node(
        "InstanceNormalization", "inorm", [split, b.const("1", ones), b.const("0", zeros)]
    )
    merged = b.node("Reshape", "merge", [normed, b.node("Shape", "shape", [cat])])
    out = b.conv("c2", b.relu("r", merged), C, 5, 1)
    groups = analyze(normalize(b.model([out], shape=("N", 3, 6, 6))))
    for group in (g for g in groups if g.name in ("a", "c")):
        assert not group.prunable
        assert "GroupNorm" in group.reason and "2 channels together" in group.reason
