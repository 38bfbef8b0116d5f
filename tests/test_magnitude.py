"""Magnitude ranking on what BatchNorm folding removes: γ, σ and the raw filter norms."""

from __future__ import annotations

import graphs
import numpy as np
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune.config import PruneConfig
from onnxprune.errors import UsageError
from onnxprune.graph.analyze import analyze as find_groups
from onnxprune.graph.load import folded_batchnorms, normalize
from onnxprune.graph.weights import producer_filters
from onnxprune.methods.magnitude import row_norms

EPS = float(np.float32(1e-3))  # the BatchNorm epsilon attribute, stored as float32


def _inits(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_fold_keeps_gamma_sigma_and_raw_norms(kind):
    model = graphs.conv_bn(kind)
    inits = _inits(model)
    producer = "c1" if kind == "conv" else "fc1"
    fold = folded_batchnorms(normalize(model))[producer]
    raw = inits[f"{producer}.w"].reshape(len(fold.gamma), -1)  # Conv (out, in, k, k); Gemm transB
    np.testing.assert_array_equal(fold.gamma, inits["bn.g"])
    np.testing.assert_allclose(fold.sigma, np.sqrt(inits["bn.var"] + EPS), rtol=1e-12)
    np.testing.assert_allclose(fold.raw_l1, np.abs(raw).sum(1), rtol=1e-12)
    np.testing.assert_allclose(fold.raw_l2, np.linalg.norm(raw, axis=1), rtol=1e-12)


def test_graphs_without_batchnorm_have_no_record():
    assert folded_batchnorms(normalize(graphs.conv_chain())) == {}


def _kept(model, criterion: str, norm: int = 1) -> np.ndarray:
    result = onnxprune.prune(
        model, method="magnitude", criterion=criterion, norm=norm, ratio=0.5, round_to=1,
        verify=False,
    )  # fmt: skip
    return np.asarray(result.plans["c1"].keep)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argsort(-scores, kind="stable")[:k])


@pytest.mark.parametrize("norm", [1, 2])
def test_each_criterion_keeps_the_channels_it_ranks_highest(norm):
    """Brute force on c1 → BN → ReLU → c3 (8 channels, keep 4): each criterion's kept set is the
    top 4 of its own formula computed from the ONNX initializers."""
    model = graphs.conv_bn("conv")
    inits = _inits(model)
    gamma, sigma = inits["bn.g"], np.sqrt(inits["bn.var"] + EPS)
    raw = inits["c1.w"].reshape(8, -1)
    raw_norm = np.linalg.norm(raw, ord=norm, axis=1)
    expected = {
        "gamma": np.abs(gamma),
        "bn-scale": np.abs(gamma) / sigma,
        "raw": raw_norm,
        "folded": raw_norm * np.abs(gamma) / sigma,
    }
    kept = {c: _kept(model, c, norm) for c in expected}
    for criterion, scores in expected.items():
        np.testing.assert_array_equal(kept[criterion], _top(scores, 4), err_msg=criterion)
    assert len({tuple(k) for k in kept.values()}) > 1  # the fixture tells the criteria apart


def test_without_batchnorm_every_criterion_is_the_filter_norm():
    model = graphs.conv_chain()
    kept = {c: tuple(_kept(model, c)) for c in ("gamma", "bn-scale", "raw", "folded")}
    assert len(set(kept.values())) == 1


def test_criterion_is_for_magnitude_only():
    with pytest.raises(UsageError, match="--criterion ranks --method magnitude"):
        PruneConfig(method="fpgm", criterion="gamma")
    with pytest.raises(UsageError, match="'criterion' must be one of"):
        PruneConfig(method="magnitude", criterion="beta")


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("layout", ["rows", "transposed"])
def test_row_norms_in_blocks_are_the_bits_of_the_whole_float64_norm(order, layout):
    """Row blocks of 3 rows (a 64-byte budget over 7-wide rows), the last one short, from the
    float32 weight or a transposed view of it (Gemm without transB): every row's norm is the
    one numpy gives on the float64 copy of the whole matrix, bit for bit."""
    weight = np.random.default_rng(order).standard_normal((7, 10)).astype(np.float32)
    rows = weight if layout == "rows" else weight.T[:, :7]
    expected = np.linalg.norm(np.asarray(rows, dtype=np.float64), ord=order, axis=1)
    found = row_norms(rows, order, block_bytes=8 * rows.shape[1] * 3)
    np.testing.assert_array_equal(found, expected)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_producer_filters_are_views_of_the_float32_weight(trans_b):
    """Magnitude reads the filters where they are: no float64 copy of the producer's weight."""
    b = graphs.Builder()
    h = b.relu("r1", b.gemm("fc1", "x", 6, 8, trans_b=trans_b))
    model = b.model([b.gemm("fc2", h, 8, 3)], inputs=[("x", ["N", 6])])
    graph = normalize(model)
    group = next(g for g in find_groups(graph) if g.name == "fc1")
    weight = next(n for n in graph.nodes if n.name == "fc1").inputs[1].values
    (filters,) = producer_filters(graph, group)
    assert filters.dtype == np.float32 and np.shares_memory(filters, weight)
    np.testing.assert_array_equal(filters, weight if trans_b else weight.T)
