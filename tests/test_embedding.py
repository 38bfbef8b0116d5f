"""Embedding scores (onnxprune.measure.embedding) against brute-force definitions, and their use
by `bench --eval` and the sweep's Evaluator on a tiny token-embedding encoder run by ORT."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import run_model
from onnx import TensorProto, helper

from onnxprune.calib.data import Dataset
from onnxprune.cli import main
from onnxprune.compare.sweep import Evaluator
from onnxprune.errors import DataError
from onnxprune.measure.embedding import (
    cosine_matrix,
    embedding_scores,
    mean_pool,
    nearest_neighbour_agreement,
    pairwise_spearman,
    token_state_mask,
)

N, S, H, VOCAB = 12, 7, 5, 20


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token states (N, S, H) and a padding mask with 2..S real tokens per sentence."""
    rng = np.random.default_rng(seed)
    states = rng.standard_normal((N, S, H)).astype(np.float32)
    lengths = rng.integers(2, S + 1, size=N)
    mask = (np.arange(S)[None, :] < lengths[:, None]).astype(np.int64)
    return states, mask


def test_mean_pool_averages_only_the_real_tokens():
    states, mask = _batch()
    pooled = mean_pool(states, mask)
    for i in range(N):
        real = [states[i, t].astype(np.float64) for t in range(S) if mask[i, t]]
        np.testing.assert_allclose(pooled[i], np.mean(real, axis=0), rtol=1e-12)
    changed = states.copy()
    changed[mask == 0] = 1e6  # padded positions hold anything
    np.testing.assert_array_equal(mean_pool(changed, mask), pooled)


def test_scores_equal_their_brute_force_definitions():
    states, mask = _batch(0)
    noisy = states + 0.7 * np.random.default_rng(1).standard_normal(states.shape).astype(np.float32)
    scores = embedding_scores(states, noisy, mask)
    a, b = mean_pool(states, mask), mean_pool(noisy, mask)
    cosines = [a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i]) for i in range(N)]
    assert scores.cosine == pytest.approx(np.mean(cosines), rel=1e-12)

    def nearest(e: np.ndarray, i: int) -> int:
        others = [j for j in range(N) if j != i]
        return max(others, key=lambda j: e[i] @ e[j] / np.linalg.norm(e[i]) / np.linalg.norm(e[j]))

    agree = np.mean([nearest(a, i) == nearest(b, i) for i in range(N)])
    assert scores.retrieval == pytest.approx(agree, abs=1e-12)
    assert 0 < scores.retrieval < 1  # the noise moves some neighbours, not all
    pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
    sims_a = np.array([cosine_matrix(a)[i, j] for i, j in pairs])
    sims_b = np.array([cosine_matrix(b)[i, j] for i, j in pairs])
    ranks_a, ranks_b = np.argsort(np.argsort(sims_a)), np.argsort(np.argsort(sims_b))  # no ties
    assert scores.spearman == pytest.approx(np.corrcoef(ranks_a, ranks_b)[0, 1], rel=1e-12)


def test_identical_and_positively_rescaled_states_score_one():
    states, mask = _batch(2)
    scale = np.random.default_rng(3).uniform(0.1, 10.0, size=(N, 1, 1)).astype(np.float32)
    for got in (states, states * scale):  # a per-sentence scale leaves every direction alone
        scores = embedding_scores(states, got, mask)
        assert scores.cosine == pytest.approx(1.0, abs=1e-6)
        assert scores.retrieval == 1.0
        assert scores.spearman == pytest.approx(1.0, abs=1e-12)


def test_nearest_neighbour_agreement_on_a_known_swap():
    # 0 and 1 are each other's nearest, as are 2 and 3; the new model makes 2's nearest 0
    ref = np.array([[1.0, 0.9, 0.0, 0.0], [0.9, 1.0, 0.0, 0.0],
                    [0.0, 0.0, 1.0, 0.8], [0.0, 0.0, 0.8, 1.0]])  # fmt: skip
    got = ref.copy()
    got[2, 0] = got[0, 2] = 0.85
    assert nearest_neighbour_agreement(ref, got) == 0.75
    assert pairwise_spearman(ref, ref) == pytest.approx(1.0)


def test_pooled_embeddings_are_accepted_and_too_few_sentences_refused():
    a = np.random.default_rng(0).standard_normal((5, 4))
    assert embedding_scores(a, a).cosine == pytest.approx(1.0)
    with pytest.raises(DataError, match="at least 3 sentences"):
        embedding_scores(a[:2], a[:2])
    with pytest.raises(DataError, match="token states"):
        embedding_scores(a[:, :, None, None], a[:, :, None, None], np.ones((5, 4)))


def test_token_states_need_an_attention_mask_of_their_first_two_dims():
    states, mask = _batch()
    assert token_state_mask(states, {"attention_mask": mask}) is mask
    assert token_state_mask(states, {"input_ids": mask}) is None  # a 3-D output alone is not
    assert token_state_mask(states, {"attention_mask": mask[:, :3]}) is None
    assert token_state_mask(states[:, 0], {"attention_mask": mask}) is None


def _encoder(weight: np.ndarray) -> onnx.ModelProto:
    """input_ids → embedding table → MatMul(weight) → tanh: token states (N, S, H)."""
    table = np.random.default_rng(7).standard_normal((VOCAB, H)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
        helper.make_node("MatMul", ["embedded", "weight"], ["projected"]),
        helper.make_node("Tanh", ["projected"], ["states"]),
        # the mask is an input as in exported encoders; this toy multiplies it in
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]),
        helper.make_node("Mul", ["states", "mask3"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "S"])
            for n in ("input_ids", "attention_mask")
        ],  # fmt: skip
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", "S", H])],
        [
            onnx.numpy_helper.from_array(table, "table"),
            onnx.numpy_helper.from_array(weight, "weight"),
            onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), "axis"),
        ],  # fmt: skip
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bench_eval_and_evaluator_score_an_encoder(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((H, H)).astype(np.float32)
    models = [_encoder(weight), _encoder(weight + 0.3 * rng.standard_normal((H, H)).astype("f"))]
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for model, path in zip(models, paths, strict=True):
        onnx.save(model, path)
    _, mask = _batch()
    feeds = {"input_ids": rng.integers(0, VOCAB, size=(N, S)), "attention_mask": mask}
    np.savez(tmp_path / "eval.npz", **feeds)
    out = tmp_path / "bench.json"
    args = ["bench", *map(str, paths), "--eval", str(tmp_path / "eval.npz"), "--json", str(out),
            "--input-shape", f"input_ids:1,{S}", "--input-shape", f"attention_mask:1,{S}",
            "--repeats", "2", "--warmup", "0", "--min-time", "0"]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    outputs = [run_model(m, feeds)["last_hidden_state"] for m in models]
    expected = embedding_scores(outputs[0], outputs[1], mask)
    assert rows[0]["cosine"] == pytest.approx(1.0) and rows[0]["retrieval"] == 1.0
    for key in ("cosine", "retrieval", "spearman"):
        assert rows[1][key] == pytest.approx(getattr(expected, key), rel=1e-6)
    assert expected.cosine < 0.999  # the perturbed weight is measurably different
    evaluator = Evaluator(models[0], Dataset(feeds))
    assert evaluator.metric == "cosine" and evaluator.higher_is_better
    assert evaluator(models[1]).value == pytest.approx(expected.cosine, rel=1e-6)
