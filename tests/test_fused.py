"""Fused transformer ops written out as standard ops (graph/fused.py).

A tiny BERT (transformers' BertModel, random seeded weights, eager attention) exported by torch's
legacy exporter and passed through ONNX Runtime's transformer optimizer holds the ops users
meet: com.microsoft EmbedLayerNormalization, Attention (packed q|k|v weight, the mask as token
counts), SkipLayerNormalization and BiasGelu. Hand-built graphs cover MultiHeadAttention,
FastGelu, Gelu and opset-23 Attention. Every expansion is compared with ONNX Runtime running
the fused op itself.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close, run_model
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from benchmarks.zoo_models import import_torchvision
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import normalize

transformers = pytest.importorskip("transformers", reason="needs the models extra")
torch = pytest.importorskip("torch")

VOCAB, HIDDEN, HEADS, FFN, LAYERS, TOKENS = 40, 16, 4, 32, 2, 7
MS_OPS = {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"}


def _bert(duplicate_neuron: bool = False) -> torch.nn.Module:
    """A tiny BertModel returning last_hidden_state; with `duplicate_neuron`, FFN neuron 1 of
    layer 0 is a copy of neuron 0 (same input weights and bias)."""
    import_torchvision()  # transformers imports torchvision, whose CUDA build needs the stub
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    if duplicate_neuron:
        dense = bert.encoder.layer[0].intermediate.dense
        with torch.no_grad():
            dense.weight[1] = dense.weight[0]
            dense.bias[1] = dense.bias[0]

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state

    return Hidden().eval()


def _optimized(module: torch.nn.Module, tmp_path) -> onnx.ModelProto:
    """Legacy export (opset 17, batch and tokens dynamic), then ORT's BERT optimizer."""
    from onnxruntime.transformers.optimizer import optimize_model

    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "tokens"} for n in [*names, "hidden"]}
    args = tuple(torch.from_numpy(v) for v in _feeds(2).values())
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, buffer, dynamo=False, opset_version=17, input_names=names,
            output_names=["hidden"], dynamic_axes=axes,
        )  # fmt: skip
    path = tmp_path / "bert.onnx"
    path.write_bytes(buffer.getvalue())
    fused = optimize_model(str(path), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN)
    return fused.model


def _feeds(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids, right-padded masks (1 … TOKENS real tokens) and segment ids."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, TOKENS + 1, n)
    mask = (np.arange(TOKENS)[None, :] < lengths[:, None]).astype(np.int64)
    return {
        "input_ids": rng.integers(0, VOCAB, (n, TOKENS)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": (np.arange(TOKENS)[None, :] >= TOKENS // 2).astype(np.int64) * mask,
    }


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> onnx.ModelProto:
    model = _optimized(_bert(), tmp_path_factory.mktemp("fused"))
    assert {n.op_type for n in model.graph.node if n.domain == "com.microsoft"} >= MS_OPS
    return model


def test_bert_after_ort_optimizer_has_heads_and_ffn_groups(fused):
    """Every Attention is a group of 4 heads over the three projections split from the packed
    weight; every BiasGelu FFN a group of 32 neurons."""
    groups = analyze(normalize(fused))
    heads = [g for g in groups if g.head_dim > 1]
    ffn = [g for g in groups if g.channels == FFN]
    assert [(g.channels, g.head_dim, g.prunable) for g in heads] == [(HEADS, 4, True)] * LAYERS
    assert [g.prunable for g in ffn] == [True] * LAYERS
    assert heads[0].producers == tuple(f"Attention_0/{x}_proj" for x in "qkv")


def test_ratio_zero_is_the_fused_model(fused):
    """Written out and pruned at ratio 0 (so every op is expanded), the model is the fused
    one's function, padding masks included."""
    result = onnxprune.prune(fused, method="magnitude", ratio=0.0, data=_feeds(8), verify=False)
    assert not {n.domain for n in result.model.graph.node} - {""}
    before, after = result.report.macs  # the fused ops' MACs are counted as written out
    assert before == after > 0
    assert_outputs_close(fused, result.model, _feeds(16, seed=1), atol=1e-5)


def test_heads_and_ffn_neurons_are_removed(fused):
    """Half the heads and neurons of every group go; the output keeps its shape and the head
    counts in the split Reshapes shrink with the weights."""
    result = onnxprune.prune(
        fused, method="magnitude", ratio=0.5, round_to=1, data=_feeds(8), verify=False
    )
    widths = {row.name: row.kept for row in result.report.groups}
    assert widths["Attention_0/q_proj"] == HEADS // 2
    assert widths["/bert/encoder/layer.0/intermediate/dense/MatMul"] == FFN // 2
    init = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert init["Attention_0/Wq__Attention_0/q_proj"].shape == (HIDDEN, HIDDEN // 2)
    before, after = result.report.macs
    assert after < 0.6 * before
    out = run_model(result.model, _feeds(4))
    assert next(iter(out.values())).shape == (4, TOKENS, HIDDEN)


def test_pruned_output_is_fused_again_by_ort_optimizer(fused, tmp_path):
    """The written-out attention is the pattern ORT's optimizer fuses: re-optimizing the pruned
    model gives back one Attention per layer (with the pruned head count, read from the
    Reshapes) that computes the same function. `id`'s intercept and recalibration shifts after
    the out projections are merged into its bias Add, which the fusion needs."""
    from onnxruntime.transformers.optimizer import optimize_model

    result = onnxprune.prune(fused, method="id", ratio=0.5, round_to=1, data=_feeds(64))
    result.save(tmp_path / "pruned.onnx")
    again = optimize_model(str(tmp_path / "pruned.onnx"), model_type="bert").model
    attention = [n for n in again.graph.node if n.op_type == "Attention"]
    assert len(attention) == LAYERS
    assert {helper.get_attribute_value(a) for n in attention for a in n.attribute} == {HEADS // 2}
    assert_outputs_close(result.model, again, _feeds(16, seed=4), atol=1e-5)


def test_duplicated_ffn_neuron_is_removed_exactly(tmp_path):
    """Neuron 1 of layer 0's FFN copies neuron 0: plain ID removes one of them and folds T = 1
    into the output projection, so the pruned model is the fused original's function."""
    model = _optimized(_bert(duplicate_neuron=True), tmp_path)
    data = _feeds(64, seed=2)
    result = onnxprune.prune(
        model,
        method="id",
        compensate="none",
        recalibrate=False,
        layer_ratios=((r"layer\.0/intermediate", 1 / FFN),),
        ratio=0.0,
        round_to=1,
        data=data,
        verify=False,
    )
    widths = {row.name: row.kept for row in result.report.groups}
    assert widths["/bert/encoder/layer.0/intermediate/dense/MatMul"] == FFN - 1
    assert_outputs_close(model, result.model, _feeds(16, seed=3), atol=1e-5)


def test_unhandled_attribute_is_refused_with_the_reason(fused):
    """A causal (unidirectional) Attention stays fused: its heads are listed as unprunable with
    the reason; the layer before it is pruned as usual."""
    model = onnx.ModelProto()
    model.CopyFrom(fused)
    node = [n for n in model.graph.node if n.op_type == "Attention"][-1]
    node.attribute.append(helper.make_attribute("unidirectional", 1))
    groups = {g.name: g for g in analyze(normalize(model))}
    refused = groups[node.name]
    assert not refused.prunable and "is unidirectional (causal)" in refused.reason
    assert groups["Attention_0/q_proj"].prunable


# ------------------------------------------------------------------ hand-built graphs

D_MODEL, N_HEADS = 8, 2


def _weights(seed: int, *shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _model(nodes, inputs, initializers, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=imports)


def _projections(duplicate_head: bool) -> tuple[list, dict]:
    """x → q, k, v (MatMuls, D_MODEL → D_MODEL); head 1 of each a copy of head 0 if asked."""
    wq, wk, wv, wo = _weights(4, *[(D_MODEL, D_MODEL)] * 4)
    if duplicate_head:
        half = D_MODEL // N_HEADS
        for w in (wq, wk, wv):
            w[:, half:] = w[:, :half]
    nodes = [helper.make_node("MatMul", ["x", f"W{c}"], [c]) for c in "qkv"]
    return nodes, {"Wq": wq, "Wk": wk, "Wv": wv, "Wo": wo}


def _attention23(
    duplicate_head: bool = False, opset: int = 23, nonpad: bool = False, **attrs
) -> onnx.ModelProto:
    """Opset-23 (or later) Attention on rank-3 q, k, v with a boolean key mask, then Wo;
    `nonpad`: with opset 24's nonpad_kv_seqlen input too."""
    nodes, weights = _projections(duplicate_head)
    extra = ["", "", "lengths"] if nonpad else []
    nodes += [
        helper.make_node("Attention", ["q", "k", "v", "mask", *extra], ["a"],
                         q_num_heads=N_HEADS, kv_num_heads=N_HEADS, **attrs),
        helper.make_node("MatMul", ["a", "Wo"], ["y"]),
    ]  # fmt: skip
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, D_MODEL]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["b", 1, 5, 5]),
    ]
    if nonpad:
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, ["b"]))
    return _model(nodes, inputs, weights, opset=opset)


def _mha() -> onnx.ModelProto:
    """com.microsoft MultiHeadAttention with a packed bias and a raw key padding mask."""
    nodes, weights = _projections(duplicate_head=False)
    (weights["bias"],) = _weights(5, (3 * D_MODEL,))
    nodes += [
        helper.make_node("MultiHeadAttention", ["q", "k", "v", "bias", "mask"], ["a"],
                         domain="com.microsoft", num_heads=N_HEADS),
        helper.make_node("MatMul", ["a", "Wo"], ["y"]),
    ]  # fmt: skip
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, D_MODEL]),
        helper.make_tensor_value_info("mask", TensorProto.INT32, ["b", 5]),
    ]
    return _model(nodes, inputs, weights, opset=17)


def _ffn(op: str) -> onnx.ModelProto:
    """x → MatMul → FastGelu (with bias) or Gelu → MatMul."""
    w1, w2, b1 = _weights(6, (D_MODEL, 12), (12, D_MODEL), (12,))
    act = ["h", "b1"] if op == "FastGelu" else ["h"]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node(op, act, ["g"], domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "W2"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, D_MODEL])]
    return _model(nodes, inputs, {"W1": w1, "W2": w2, "b1": b1}, opset=17)


def _masked_feeds(model: onnx.ModelProto, n: int = 6) -> dict[str, np.ndarray]:
    (x,) = _weights(7, (n, 5, D_MODEL))
    keep = np.arange(5)[None, :] < np.array([5, 3, 1, 4, 2, 5])[:n, None]
    feeds = {"x": x}
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    if types.get("mask") == TensorProto.BOOL:
        feeds["mask"] = np.repeat(keep[:, None, None, :], 5, axis=2)
    elif "mask" in types:
        feeds["mask"] = keep.astype(np.int32)
    return feeds


@pytest.mark.parametrize(
    "build",
    [
        _attention23,
        lambda: _attention23(opset=24),
        lambda: _attention23(opset=25),
        _mha,
        lambda: _ffn("FastGelu"),
        lambda: _ffn("Gelu"),
    ],
    ids=["attention23", "attention24", "attention25", "multiheadattention", "fastgelu", "gelu"],
)
def test_expansion_is_the_fused_op(build):
    """Each written-out op computes what ONNX Runtime's own kernel does (masks included), and
    its group is prunable."""
    model = build()
    result = onnxprune.prune(model, method="magnitude", ratio=0.0, round_to=1, verify=False)
    assert {n.op_type for n in result.model.graph.node}.isdisjoint(
        {"Attention", "MultiHeadAttention", "FastGelu", "Gelu"}
    )
    assert_outputs_close(model, result.model, _masked_feeds(model), atol=1e-5)
    first = analyze(normalize(model))[0]  # the last MatMul writes the graph output
    assert first.prunable and first.producers[0] in ("q", "MatMul_0"), first.reason


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: _attention23(opset=24, nonpad=True), "nonpad_kv_seqlen (opset 24)"),
        (lambda: _attention23(opset=25, left_window_size=2), "sliding window (opset 25)"),
    ],
    ids=["nonpad_kv_seqlen", "window"],
)
def test_what_later_attention_adds_is_refused_with_the_reason(build, reason):
    """Opset 24's padding lengths and opset 25's sliding window are not written out: the heads
    stay whole, with the reason."""
    groups = analyze(normalize(build()))
    refused = [g for g in groups if not g.prunable and reason in (g.reason or "")]
    assert refused, [g.reason for g in groups]


def test_duplicated_head_of_opset23_attention_is_removed_exactly():
    """Head 1 copies head 0 in q, k and v: ID over heads removes one and folds the map into
    Wo, exactly."""
    model = _attention23(duplicate_head=True)
    data = _masked_feeds(model) | {"x": _weights(8, (64, 5, D_MODEL))[0]}
    data["mask"] = np.ones((64, 1, 5, 5), bool)
    result = onnxprune.prune(
        model, method="id", compensate="none", recalibrate=False, ratio=0.5, round_to=1,
        data=data, verify=False,
    )  # fmt: skip
    assert result.report.groups[0].kept == 1
    assert_outputs_close(model, result.model, _masked_feeds(model), atol=1e-5)
