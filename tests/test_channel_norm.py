"""LayerNorm over a group's channels (ConvNeXt's channels-last blocks), rebuilt from the kept
channels (graph/channel_norm.py).

`_convnext` is one ConvNeXt stage in miniature: a stem Conv writes the stream, a block
(depthwise 3×3 → Transpose → LayerNorm over C → Linear 4C → ReLU → Linear C → Transpose →
layer scale) adds to it, a downsampling LayerNorm (Transpose → LN → Transpose) feeds a 2×2
stride-2 Conv, then pooling and a Gemm. The stream group (stem + the block's second Linear)
is consumed by both LayerNorms.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close, run_model
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.errors import UsageError
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import export, normalize
from onnxprune.graph.rewrite import rewrite
from onnxprune.plan import Correction, Plan

C, HIDDEN, D, K = 8, 16, 6, 5


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _ln(name: str, x: str, out: str, inits: dict, rng) -> onnx.NodeProto:
    inits[f"{name}.g"] = (1 + 0.3 * rng.standard_normal(C)).astype(np.float32)
    inits[f"{name}.b"] = (0.3 * rng.standard_normal(C)).astype(np.float32)
    return helper.make_node(
        "LayerNormalization", [x, f"{name}.g", f"{name}.b"], [out], name, axis=-1, epsilon=1e-6
    )


def _convnext(duplicate: bool = False, seed: int = 0) -> onnx.ModelProto:
    """The miniature stage; `duplicate`: stream channel 1 equals channel 0 everywhere."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.5) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    inits = {
        "stem.w": w(C, 3, 1, 1), "stem.b": w(C), "dw.w": w(C, 1, 3, 3), "dw.b": w(C),
        "fc1.w": w(C, HIDDEN), "fc1.b": w(HIDDEN), "fc2.w": w(HIDDEN, C), "fc2.b": w(C),
        "scale": w(C, 1, 1), "down.w": w(D, C, 2, 2), "down.b": w(D), "head.w": w(K, D),
        "head.b": w(K),
    }  # fmt: skip
    if duplicate:  # every writer and per-channel op of the stream treats channel 1 as channel 0
        for name, axis in [("stem.w", 0), ("stem.b", 0), ("dw.w", 0), ("dw.b", 0),
                           ("fc2.w", 1), ("fc2.b", 0), ("scale", 0)]:  # fmt: skip
            value = np.moveaxis(inits[name], axis, 0)
            value[1] = value[0]
    nodes = [
        helper.make_node("Conv", ["x", "stem.w", "stem.b"], ["s0"], "stem"),
        helper.make_node("Conv", ["s0", "dw.w", "dw.b"], ["dw"], "dw", group=C, pads=[1] * 4),
        helper.make_node("Transpose", ["dw"], ["dw_t"], "t1", perm=[0, 2, 3, 1]),
        _ln("ln", "dw_t", "ln_out", inits, rng),
        helper.make_node("MatMul", ["ln_out", "fc1.w"], ["h"], "fc1"),
        helper.make_node("Add", ["h", "fc1.b"], ["h1"], "fc1_add"),
        helper.make_node("Relu", ["h1"], ["g"], "relu"),
        helper.make_node("MatMul", ["g", "fc2.w"], ["o"], "fc2"),
        helper.make_node("Add", ["o", "fc2.b"], ["o1"], "fc2_add"),
        helper.make_node("Transpose", ["o1"], ["o_t"], "t2", perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["o_t", "scale"], ["ls"], "layer_scale"),
        helper.make_node("Add", ["ls", "s0"], ["s1"], "residual"),
        helper.make_node("Transpose", ["s1"], ["s1_t"], "t3", perm=[0, 2, 3, 1]),
        _ln("down_ln", "s1_t", "dn", inits, rng),
        helper.make_node("Transpose", ["dn"], ["dn_t"], "t4", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["dn_t", "down.w", "down.b"], ["d"], "down", strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["d"], ["p"], "pool"),
        helper.make_node("Flatten", ["p"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "head.w", "head.b"], ["y"], "head", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", K])]
    return _model(nodes, inits, inputs, outputs)


def _feeds(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)}


def test_the_stream_is_consumed_by_both_layernorms_at_their_inputs():
    stream = next(g for g in analyze(normalize(_convnext())) if "fc2" in g.producers)
    assert stream.prunable and stream.coupled
    assert set(stream.consumers) == {"ln", "down_ln"}
    assert {t.tensor: t.axis for t in stream.taps} == {"dw_t": 3, "s1_t": 3}


def test_layernorm_read_other_than_through_weights_is_refused():
    model = _convnext()
    fc1 = next(i for i, node in enumerate(model.graph.node) if node.name == "fc1")
    model.graph.node[fc1].input[0] = "ln_relu"  # the block's first Linear reads ReLU(LN)
    model.graph.node.insert(fc1, helper.make_node("Relu", ["ln_out"], ["ln_relu"], "ln_relu"))
    stream = next(g for g in analyze(normalize(model)) if "fc2" in g.producers)
    assert not stream.prunable
    assert "read by Relu 'ln_relu', not through a layer's weight" in stream.reason


@pytest.mark.parametrize("method", ["id", "magnitude"])
def test_ratio_zero_is_exact(method):
    model = _convnext()
    pruned = onnxprune.prune(
        model, method=method, ratio=0.0, round_to=1, data=_feeds(64, 0), prune_residual=True
    )
    ops = [n.op_type for n in pruned.model.graph.node]
    assert ops.count("LayerNormalization") == 2  # all kept in order: left as they were
    assert_outputs_close(model, pruned.model, _feeds(8, 5), atol=1e-6)


def test_per_channel_biascomp_refuses_a_group_read_by_a_layernorm():
    with pytest.raises(UsageError, match="LayerNormalization 'down_ln' over its channels"):
        onnxprune.prune(
            _convnext(), method="biascomp", ratio=0.25, round_to=1, data=_feeds(16, 0),
            prune_residual=True,
        )  # fmt: skip


def test_a_duplicated_stream_channel_is_removed_exactly_through_both_layernorms():
    model = _convnext(duplicate=True)
    pruned = onnxprune.prune(
        model, method="id", ratio=1 / C, round_to=1, data=_feeds(64, 0), prune_residual=True,
        compensate="none", recalibrate=False, exclude=("^fc1", "^down"),
    )  # fmt: skip
    kept = {row.name: row.kept for row in pruned.report.groups}
    assert kept["stem"] == C - 1
    ops = [n.op_type for n in pruned.model.graph.node]
    assert "LayerNormalization" not in ops  # both rebuilt
    assert_outputs_close(model, pruned.model, _feeds(8, 5), atol=1e-5)


def _layernorm(z: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    centred = z - z.mean(axis=-1, keepdims=True)
    return gamma * centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + eps) + beta


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fit", ["selection", "affine", "permutation"])
def test_rebuilt_norm_equals_the_layernorm_of_the_fitted_input(seed, fit):
    """Brute force against numpy: for random kept channels S and a random fit z ≈ Mᵀ z_S + c at
    the block norm's input (or plain selection: the removed channels read as 0; or all channels
    in a random order), the pruned
    model computes exactly the original with the norm reading that reconstruction."""
    model = _convnext(seed=seed)
    graph = normalize(model)
    groups = analyze(graph)
    stream = next(g for g in groups if "fc2" in g.producers)
    rng = np.random.default_rng(100 + seed)
    keep = np.sort(rng.choice(C, size=int(rng.integers(2, C)), replace=False))
    if fit == "permutation":  # every channel kept, out of order: the norm is rebuilt all the same
        keep = rng.permutation(C)
    m = rng.standard_normal((len(keep), C)) if fit == "affine" else np.eye(C)[keep]
    c = rng.standard_normal(C) if fit == "affine" else None
    corrections = {"dw_t": Correction(m, c)} if fit == "affine" else {}
    pruned = export(rewrite(graph, groups, {stream.name: Plan(keep, corrections)}))

    # reference: the original with the block norm reading Mᵀ z_S + c, and the stream's removed
    # channels zero everywhere else (the downsampling norm's input: plain selection)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x = _feeds(4, 9)["x"]
    taps = run_model(_with_outputs(model, ["dw_t", "g", "s0"]), {"x": x})
    removed = np.setdiff1d(np.arange(C), keep)
    dw_t = taps["dw_t"].astype(np.float64)
    fitted = dw_t[..., keep] @ m + (0 if c is None else c)
    normed = _layernorm(fitted, inits["ln.g"], inits["ln.b"], 1e-6)
    hidden = np.maximum(normed @ inits["fc1.w"] + inits["fc1.b"], 0)
    block = (hidden @ inits["fc2.w"] + inits["fc2.b"]).transpose(0, 3, 1, 2) * inits["scale"]
    s1 = block + taps["s0"].astype(np.float64)
    s1[:, removed] = 0
    dn = _layernorm(s1.transpose(0, 2, 3, 1), inits["down_ln.g"], inits["down_ln.b"], 1e-6)
    down = _conv2x2(dn.transpose(0, 3, 1, 2), inits["down.w"]) + inits["down.b"][:, None, None]
    y = down.mean(axis=(2, 3)) @ inits["head.w"].T + inits["head.b"]
    got = run_model(pruned, {"x": x})["y"]
    assert np.abs(got - y).max() <= 1e-4 * max(1.0, np.abs(y).max())


def _conv2x2(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """2×2 stride-2 convolution without padding."""
    n, _, h, width = x.shape
    patches = x.reshape(n, x.shape[1], h // 2, 2, width // 2, 2)
    return np.einsum("ncxkyl,ockl->noxy", patches, w)


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    extra.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return extra


def _classifier(duplicate: bool, pads: int = 0) -> onnx.ModelProto:
    """ConvNeXt's head in miniature: Conv (C) → GlobalAveragePool → Transpose → LayerNorm over C
    → Transpose → Flatten → Gemm (`duplicate`: the conv's channel 1 equals channel 0); with
    `pads`, a padded 1×1 Conv reads the norm instead of the Gemm."""
    rng = np.random.default_rng(3)
    inits = {"c.w": rng.standard_normal((C, 3, 3, 3)).astype(np.float32),
             "c.b": rng.standard_normal(C).astype(np.float32),
             "g.w": rng.standard_normal((K, C)).astype(np.float32),
             "g.b": rng.standard_normal(K).astype(np.float32)}  # fmt: skip
    if duplicate:
        inits["c.w"][1], inits["c.b"][1] = inits["c.w"][0], inits["c.b"][0]
    nodes = [
        helper.make_node("Conv", ["x", "c.w", "c.b"], ["c"], "conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], "pool"),
        helper.make_node("Transpose", ["p"], ["p_t"], "t1", perm=[0, 2, 3, 1]),
        _ln("ln", "p_t", "n", inits, rng),
        helper.make_node("Transpose", ["n"], ["n_t"], "t2", perm=[0, 3, 1, 2]),
    ]
    if pads:
        inits["r.w"] = rng.standard_normal((K, C, 1, 1)).astype(np.float32)
        nodes.append(helper.make_node("Conv", ["n_t", "r.w"], ["y"], "reader", pads=[pads] * 4))
        shape = ["n", K, 1 + 2 * pads, 1 + 2 * pads]
    else:
        nodes.append(helper.make_node("Flatten", ["n_t"], ["f"], "flatten"))
        nodes.append(helper.make_node("Gemm", ["f", "g.w", "g.b"], ["y"], "head", transB=1))
        shape = ["n", K]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])]
    return _model(
        nodes, inits, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    )


def test_a_classifier_norm_folds_into_the_gemm_behind_transpose_and_flatten():
    model = _classifier(duplicate=True)
    conv = next(g for g in analyze(normalize(model)) if g.producers == ("conv",))
    assert conv.prunable and conv.consumers == ("ln",)
    pruned = onnxprune.prune(
        model, method="id", ratio=1 / C, round_to=1, data=_feeds(64, 0), compensate="none",
        recalibrate=False,
    )  # fmt: skip
    assert {row.name: row.kept for row in pruned.report.groups}["conv"] == C - 1
    assert "LayerNormalization" not in [n.op_type for n in pruned.model.graph.node]
    assert_outputs_close(model, pruned.model, _feeds(8, 5), atol=1e-5)


def test_a_norm_read_by_a_padded_conv_is_refused():
    conv = next(
        g for g in analyze(normalize(_classifier(False, pads=1))) if g.producers == ("conv",)
    )
    assert not conv.prunable and "zero-padded Conv 'reader'" in conv.reason
