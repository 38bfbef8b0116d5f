"""Pruning within attention heads (`--heads dims|both`): value dims by ID, query/key dims by the
score-preserving change of basis (methods/headdims.py, graph/headdims.py, within_heads.py).

What is exact: at full width the maps change no score but by a per-query constant (which the
softmax ignores), so the model is the same function; a value dim that is a multiple of another
of its head, or a key dim that is constant, goes with no change to the output either. The
query/key map is the best rank-k one for its error model, checked against brute-force pairs.
"""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest
import torch
from conftest import (
    assert_outputs_close,
    data_path,
    max_deviation,
    reference_path,
    run_model,
)
from test_attention import (
    BertStyleAttention,
    _export_bert_style,
    _padding_masks,
    _stated_entries,
)
from torch import nn

import onnxprune
from models.archs import Attention
from onnxprune.config import PruneConfig
from onnxprune.errors import UsageError
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import export, load_model, normalize
from onnxprune.methods.headdims import query_key_basis, value_dims
from onnxprune.plan import TapStats
from onnxprune.within_heads import prune_within_heads

TOKENS, DIM, HEADS = 6, 12, 3
D = DIM // HEADS


class Block(nn.Module):
    """Tokens (batch, 6, 12) → 3-head attention of 4 dims → mean over tokens → 4 scores;
    `scale` multiplies q by a per-feature constant before the heads (refused within heads);
    without `proj_bias` the out projection is a bare MatMul (the intercept then gets an Add)."""

    def __init__(self, scale: bool = False, proj_bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn, self.fc = Attention(DIM, HEADS), nn.Linear(DIM, 4)
        self.attn.proj.bias = self.attn.proj.bias if proj_bias else None
        if scale:
            self.attn.q.register_forward_hook(lambda _m, _i, out: out * torch.arange(1, DIM + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x).mean(dim=1))


def _inputs(n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, TOKENS, DIM)).astype(np.float32)


def _within(model: onnx.ModelProto, keep: int, feeds: dict[str, np.ndarray], values: str = "id"):
    """Every head group of `model` narrowed to `keep` dims per head, and the report rows."""
    graph = normalize(model)
    groups = analyze(graph)
    widths = {g.name: (keep, keep) for g in groups if g.head_dim > 1}
    pruned, rows = prune_within_heads(graph, groups, widths, [feeds], values=values)
    return export(pruned), rows


def _weight(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return onnx.numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == node.input[1])
    )


def test_full_width_maps_change_nothing():
    """k = D: the query/key maps are the identity on the scores up to per-query constants and
    the value map is the identity, so the layer is the same function on unseen inputs."""
    model = graphs.export_torch(Block(), (2, TOKENS, DIM))
    pruned, rows = _within(model, D, {"input": _inputs()})
    assert [row.kept for row in rows] == [DIM]
    assert_outputs_close(model, pruned, {"input": _inputs(8, seed=1)}, atol=1e-5)


@pytest.mark.parametrize("exporter", ["onnx", "dynamo.onnx"])
def test_full_width_is_exact_on_both_vit_exports(exporter):
    """The digits ViT of both exporters (a Concat of shape pieces, a constant target): all four
    blocks at full width give the original logits."""
    calib = np.load(data_path("vit"))["input"]
    model = load_model(reference_path("vit", exporter))
    pruned, rows = _within(model, 16, {"input": calib[:32]})
    assert len(rows) == 4 and all(row.status.startswith("pruned within heads") for row in rows)
    assert_outputs_close(model, pruned, {"input": calib[32:48]}, atol=1e-4)


def _redundant(module: Block) -> Block:
    """In every head: value dim 3 := 2 × value dim 1 (weights and bias), key dim 0 constant
    (zero weights, a nonzero bias): one dim of each can go with nothing lost."""
    with torch.no_grad():
        for h in range(HEADS):
            v, k = module.attn.v, module.attn.k
            v.weight[h * D + 3], v.bias[h * D + 3] = 2 * v.weight[h * D + 1], 2 * v.bias[h * D + 1]
            k.weight[h * D] = 0.0
            k.bias[h * D] = 0.5 + h
    return module


@pytest.mark.parametrize(
    ("values", "proj_bias"), [("id", True), ("pca", True), ("id", False)], ids=["id", "pca", "bare"]
)
def test_a_redundant_value_dim_and_a_constant_key_dim_are_pruned_exactly(values, proj_bias):
    """With one dim to spare per head in v and in k, D − 1 dims per head give the same
    function on unseen inputs: ID keeps one of each value pair and folds T into the out
    projection (PCA: its D − 1 directions span them); the key basis drops the constant key
    dim, whose only effect was a per-query constant on the scores. Narrowing without the
    redundancy changes the output."""
    model = graphs.export_torch(_redundant(Block(proj_bias=proj_bias)), (2, TOKENS, DIM))
    pruned, _ = _within(model, D - 1, {"input": _inputs()}, values)
    assert _weight(pruned, "/attn/proj/MatMul").shape == (HEADS * (D - 1), DIM)
    for name in ("q", "k", "v"):
        assert _weight(pruned, f"/attn/{name}/MatMul").shape == (DIM, HEADS * (D - 1))
    feeds = {"input": _inputs(8, seed=1)}
    assert_outputs_close(model, pruned, feeds, atol=1e-5)
    plain = graphs.export_torch(Block(), (2, TOKENS, DIM))
    narrowed, _ = _within(plain, D - 1, {"input": _inputs()})
    assert max_deviation(plain, narrowed, feeds) > 1e-3


def _stats(rows: np.ndarray) -> TapStats:
    rows = rows.astype(np.float64)
    return TapStats(len(rows), rows.sum(0), rows.T @ rows, np.abs(rows).sum(0))


def _pair_error(q: np.ndarray, k: np.ndarray, P: np.ndarray) -> float:
    """Brute force: the mean over every (query, key) pair of the squared score error, after
    taking out each query's mean error over the keys (the part the softmax ignores)."""
    error = q @ (np.eye(len(P)) - P) @ k.T
    error -= error.mean(axis=1, keepdims=True)
    return float(np.mean(error**2))


def test_query_key_maps_are_the_best_rank_k_pair_by_brute_force():
    """On explicit queries and keys (3 dims, correlated, keys with a mean), the rank-1 map's
    predicted error is the brute-force error over all pairs, and no other rank-1 map — the
    PCA projections of the queries, the keys or both, nor 2000 random ones — does better."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((40, 3)) @ np.array([[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0, 0, 0.2]])
    k = rng.standard_normal((50, 3)) @ np.array([[0.3, 0.0, 0.0], [0.4, 1.5, 0.0], [0, 1, 1]])
    k += np.array([3.0, -1.0, 2.0])
    basis = query_key_basis(_stats(q), _stats(k), heads=1, keep=1)
    best = _pair_error(q, k, basis.A[0] @ basis.B[0].T)
    total = _pair_error(q, k, np.zeros((3, 3)))
    assert best == pytest.approx(basis.error**2 * total, rel=1e-9)
    candidates = [np.outer(u, u) for u in _top_directions(q, k)]
    candidates += [np.outer(a, b) for a, b in rng.standard_normal((2000, 2, 3))]
    assert min(_pair_error(q, k, P) for P in candidates) >= best * (1 - 1e-9)


def _top_directions(q: np.ndarray, k: np.ndarray) -> list[np.ndarray]:
    """The leading eigenvectors of E[qᵀq], Cov(k) and their sum (orthogonal choices of R)."""
    second, covariance = q.T @ q / len(q), np.cov(k.T, bias=True)
    return [np.linalg.eigh(S)[1][:, -1] for S in (second, covariance, second + covariance)]


@pytest.mark.parametrize("basis", ["id", "pca"])
def test_value_map_is_the_least_squares_fit_from_every_kept_dim(basis):
    """Brute force on explicit head outputs: the correction is the affine least-squares fit of
    all features on every head's kept dims (ID: kept columns; PCA: leading directions), and
    its error is that fit's."""
    rng = np.random.default_rng(1)
    out = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)) + rng.standard_normal(6)
    dims = value_dims(_stats(out), heads=2, keep=2, basis=basis)
    assert dims.maps.shape == (2, 3, 2)
    if basis == "id":
        assert set(np.unique(dims.maps)) == {0.0, 1.0} and (dims.maps.sum(axis=1) == 1).all()
    kept = np.hstack([out[:, h * 3 : (h + 1) * 3] @ dims.maps[h] for h in range(2)])
    design = np.hstack([kept, np.ones((200, 1))])
    solution, *_ = np.linalg.lstsq(design, out, rcond=None)
    np.testing.assert_allclose(dims.M, solution[:-1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dims.c, solution[-1], rtol=1e-6, atol=1e-8)
    residual = out - design @ solution
    assert dims.error == pytest.approx(np.linalg.norm(residual) / np.linalg.norm(out), rel=1e-6)


def test_a_per_feature_scale_before_the_heads_is_refused_with_the_reason():
    model = graphs.export_torch(Block(scale=True), (2, TOKENS, DIM))
    pruned, (row,) = _within(model, 2, {"input": _inputs()})
    assert row.kept == row.channels and "lies between a projection and the heads" in row.status
    assert_outputs_close(model, pruned, {"input": _inputs(4)}, atol=0.0)


def test_prune_with_heads_dims_and_both():
    """`heads="dims"` narrows every head (query/key dims by `qk_ratio` where given) and leaves
    the head count; `both` then also removes whole heads (one width for q, k and v: no
    `qk_ratio`); the width searches refuse it (they count whole heads)."""
    model = graphs.export_torch(Block(), (2, TOKENS, DIM))
    data = {"input": _inputs()}
    options = dict(ratio=0.5, round_to=1, exclude=["proj"], data=data, verify=False)
    dims = onnxprune.prune(model, method="id", heads="dims", qk_ratio=0.75, **options)
    assert _weight(dims.model, "/attn/q/MatMul").shape == (DIM, HEADS * 1)
    assert _weight(dims.model, "/attn/v/MatMul").shape == (DIM, HEADS * 2)
    statuses = [row.status for row in dims.report.groups]
    assert sum(s.startswith("pruned within heads: q/k 4 → 1, v 4 → 2") for s in statuses) == 1
    both = onnxprune.prune(model, method="id", heads="both", **options)
    for name in ("k", "v"):
        assert _weight(both.model, f"/attn/{name}/MatMul").shape == (DIM, 4)  # 2 heads × 2
    out = run_model(both.model, {"input": _inputs(4)})["logits"]
    assert out.shape == (4, 4) and np.isfinite(out).all()
    with pytest.raises(UsageError, match="--heads dims takes --ratio"):
        PruneConfig(heads="dims", target_macs=0.5)
    for heads in ("whole", "both"):
        with pytest.raises(UsageError, match="needs --heads dims"):
            PruneConfig(heads=heads, qk_ratio=0.5)


@pytest.mark.parametrize("merge_constant", [False, True], ids=["merge-1", "merge-HD"])
def test_bert_style_targets_state_the_new_head_width(merge_constant):
    """transformers' export (head count -1 beside shape pieces, merge H·D or -1): the split
    targets state D' and the merge H·D' (or keep -1), and the model runs at other token
    counts; at full width it is the original function there."""
    model = _export_bert_style(BertStyleAttention(merge_constant))
    tokens = TOKENS + 2
    x = np.random.default_rng(3).standard_normal((48, tokens, 6)).astype(np.float32)
    data = {"input": x, "mask": _padding_masks(48, tokens)}
    full, _ = _within(model, 2, data)
    assert_outputs_close(model, full, data, atol=1e-5)
    narrow, (row,) = _within(model, 1, data)
    assert row.kept == 3, row.status
    stated = [_stated_entries(n) for n in normalize(narrow).nodes if n.op == "Reshape"]
    assert stated == [[-1, 1]] * 3 + [[3 if merge_constant else -1]]
    out = run_model(narrow, {"input": x[:4, :TOKENS], "mask": _padding_masks(4, TOKENS)})
    assert np.isfinite(out["logits"]).all()


def test_verification_compares_narrowed_heads_with_the_original():
    """The statistics pass of a `--heads dims` prune runs the narrowed graph, so verification
    must not take the original's outputs from it: the reported deviation is the pruned model's
    against the original itself (taken from that pass, the digits ViT reported 0.065 for 0.070)."""
    model = onnx.load(reference_path("vit"))
    with np.load(data_path("vit")) as data:
        fit, held = data["input"][:128], data["input"][400:432]
    result = onnxprune.prune(
        model, method="id", ratio=0.5, heads="dims", round_to=1, data={"input": fit},
        verify_data={"input": held},
    )  # fmt: skip
    ref = run_model(model, {"input": held})["logits"]
    got = run_model(result.model, {"input": held})["logits"]
    expected = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert expected > 1e-2  # narrowing changed the outputs: the check can tell them apart
    np.testing.assert_allclose(result.report.verification.rel_l2, expected, rtol=1e-3)
