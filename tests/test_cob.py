"""Change-of-basis pruning (METHODS.md §1): exact where the algebra says so, in real ORT.

- a full-width CoB rotation (and any block rotation) folded into the weights changes nothing,
  on tsra_vgg and on linear chains;
- TSRA commutes with rotations inside U and inside V and not with rotations mixing them;
- the analyzer refuses to rotate across ReLU, BatchNorm with affine, MaxPool, a per-channel
  RMSNormalization scale, and accepts TSRA, RMSNorm (function, opset 23, primitive pattern);
- after pruning, each TSRA's split is the number of kept channels before it;
- at a width that spans the layer's outputs, CoB is exact (linear chain: centred, mean folded;
  TSRA: per subspace rank ≤ d + 1; behind an RMSNorm only with --rms-correction).
"""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import assert_outputs_close, max_deviation, reference_feeds, reference_path, run_model
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from models.tsra import make_model, rmsnorm_node, tsra_node
from onnxprune.errors import UsageError
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import export, normalize
from onnxprune.graph.rewrite import rewrite
from onnxprune.methods.cob import block_pca, channel_ratio_for_params, fixed_keep, threshold_keep
from onnxprune.options import parse_threshold
from onnxprune.plan import Correction, Plan

RNG = np.random.default_rng(0)


def _orthogonal(m: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((m, m)))
    return q * np.sign(np.diag(r))


def _weight(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((scale * RNG.standard_normal(shape)).astype(np.float32), name)


def _mlp(fin: int, width: int, mid: list[str], fout: int = 3) -> onnx.ModelProto:
    """x(N, fin) → fc1(width) → mid ops ("rms", "tsra") → fc2(fout) → y."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h0"], name="fc1", transB=1)]
    for i, op in enumerate(mid):
        name = f"{op}{i}"
        nodes.append(
            rmsnorm_node(f"h{i}", f"h{i + 1}", name=name)
            if op == "rms"
            else tsra_node(f"h{i}", f"h{i + 1}", width // 2, 1, name)
        )
    last = f"h{len(mid)}"
    nodes.append(helper.make_node("Gemm", [last, "w2", "b2"], ["y"], name="fc2", transB=1))
    inits = [
        _weight("w1", width, fin),
        _weight("b1", width),
        _weight("w2", fout, width),
        _weight("b2", fout),
    ]
    value = helper.make_tensor_value_info
    return make_model(
        nodes,
        [value("x", TensorProto.FLOAT, ["N", fin])],
        [value("y", TensorProto.FLOAT, ["N", fout])],
        inits,
    )


def _x(n: int, f: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, f)).astype(np.float32)}


def _tsra_only(c: int, split: int) -> onnx.ModelProto:
    value = helper.make_tensor_value_info
    return make_model(
        [tsra_node("x", "y", split)],
        [value("x", TensorProto.FLOAT, ["N", c])],
        [value("y", TensorProto.FLOAT, ["N", c])],
    )


# --- equivariance of the real ONNX TSRA function ------------------------------------------------


def test_tsra_commutes_with_block_rotations_and_not_with_mixing_ones():
    c, split = 10, 4
    model, x = _tsra_only(c, split), _x(64, c, 1)["x"].astype(np.float64)
    block = np.zeros((c, c))
    block[:split, :split] = _orthogonal(split, RNG)
    block[split:, split:] = _orthogonal(c - split, RNG)
    mixing = _orthogonal(c, RNG)

    def sigma(v: np.ndarray) -> np.ndarray:
        return run_model(model, {"x": v.astype(np.float32)})["y"].astype(np.float64)

    np.testing.assert_allclose(sigma(x @ block.T), sigma(x) @ block.T, atol=1e-5, rtol=1e-5)
    assert np.max(np.abs(sigma(x @ mixing.T) - sigma(x) @ mixing.T)) > 0.1


# --- full-width rotations are exact -------------------------------------------------------------


def test_full_width_cob_on_tsra_vgg_changes_nothing():
    path = reference_path("tsra_vgg")
    result = onnxprune.prune(path, method="cob", ratio=0.0, data=reference_feeds("tsra_vgg", 256))
    rotated = [p for p in result.plans.values() if p.rotation is not None]
    assert len(rotated) == 7
    assert all(not np.allclose(p.rotation, np.eye(len(p.keep)), atol=1e-2) for p in rotated)
    test = reference_feeds("tsra_vgg", 64, "test")
    assert_outputs_close(onnx.load(str(path)), result.model, test, atol=1e-5, rtol=1e-4)


def test_random_block_rotations_on_tsra_vgg_change_nothing_and_mixing_ones_do():
    graph = normalize(onnx.load(str(reference_path("tsra_vgg"))))
    groups = [g for g in analyze(graph) if g.prunable]
    assert all(g.rotatable and g.subspaces == (g.channels // 2,) for g in groups)

    def plans(mix: bool) -> dict[str, Plan]:
        out = {}
        for g in groups:
            q = _orthogonal(g.channels, RNG) if mix else np.zeros((g.channels, g.channels))
            if not mix:
                for a, b in g.ranges:
                    q[a:b, a:b] = _orthogonal(b - a, RNG)
            corrections = {t.tensor: Correction(q) for t in g.taps}
            out[g.name] = Plan(np.arange(g.channels), corrections, rotation=q)
        return out

    test = reference_feeds("tsra_vgg", 32, "test")
    original = export(graph)
    assert_outputs_close(
        original, export(rewrite(graph, tuple(groups), plans(False))), test, atol=1e-5, rtol=1e-4
    )
    assert max_deviation(original, export(rewrite(graph, tuple(groups), plans(True))), test) > 0.1


def _matmul_chain() -> onnx.ModelProto:
    """x[N,6] → MatMul (6×10) + per-feature bias → MatMul (10×3): the bias Add turns with Q."""
    b = graphs.Builder(13)
    h = b.node(
        "Add", "bias", [b.node("MatMul", "m1", ["x", b.rand("m1.w", 6, 10)]), b.rand("m1.b", 10)]
    )
    return b.model([b.node("MatMul", "m2", [h, b.rand("m2.w", 10, 3)])], shape=("N", 6))


@pytest.mark.parametrize(
    "build",
    [graphs.linear_conv_chain, _matmul_chain, lambda: _mlp(5, 12, [])],
    ids=["conv", "matmul", "gemm"],
)
def test_full_width_cob_on_a_linear_chain_changes_nothing(build):
    model = build()
    result = onnxprune.prune(model, method="cob", ratio=0.0, data=graphs.random_input(model, 64))
    assert any(p.rotation is not None and p.info["centred"] for p in result.plans.values())
    assert_outputs_close(
        model, result.model, graphs.random_input(model, 8, seed=5), atol=1e-5, rtol=1e-5
    )


# --- exact at rank-deficient width --------------------------------------------------------------


def test_cob_on_a_linear_chain_is_exact_at_the_rank_of_its_outputs():
    model = _mlp(4, 24, [])  # fc1's outputs span a 4-dim affine subspace of R^24
    calib, test = _x(256, 4, 1), _x(16, 4, 2)
    exact = onnxprune.prune(model, method="cob", ratio=20 / 24, round_to=1, data=calib)
    assert len(exact.plans["fc1"].keep) == 4
    assert_outputs_close(model, exact.model, test, atol=1e-5, rtol=1e-5)
    short = onnxprune.prune(model, method="cob", ratio=21 / 24, round_to=1, data=calib)
    assert max_deviation(model, short.model, test) > 1e-2
    # without a rotation, four selected channels are far from exact
    plain = onnxprune.prune(model, method="id", ratio=20 / 24, round_to=1, data=calib,
                            compensate="none", recalibrate=False)  # fmt: skip
    assert max_deviation(model, plain.model, test) > max_deviation(model, exact.model, test) + 1e-3


def test_cob_through_tsra_is_exact_at_d_plus_one_per_subspace():
    model = _mlp(4, 32, ["tsra"])  # each 16-wide subspace spans ≤ 4 + 1 dims
    calib, test = _x(256, 4, 1), _x(16, 4, 2)
    result = onnxprune.prune(model, method="cob", ratio=22 / 32, round_to=1, data=calib)
    keep = result.plans["fc1"].keep
    assert ((keep < 16).sum(), (keep >= 16).sum()) == (5, 5)
    assert_outputs_close(model, result.model, test, atol=1e-5, rtol=1e-5)
    split = next(n for n in result.model.graph.node if n.op_type == "TSRA").attribute
    assert {a.name: a.i for a in split}["split"] == 5


def test_behind_an_rmsnorm_only_the_divisor_correction_makes_it_exact():
    model = _mlp(4, 32, ["rms", "tsra"])
    calib, test = _x(256, 4, 1), _x(16, 4, 2)
    common = {"method": "cob", "ratio": 22 / 32, "round_to": 1, "data": calib}
    fixed = onnxprune.prune(model, rms_correction=True, **common)
    assert fixed.plans["fc1"].info["rms_scale"] == pytest.approx(np.sqrt(32 / 10), rel=1e-6)
    assert_outputs_close(model, fixed.model, test, atol=1e-4, rtol=1e-4)
    assert max_deviation(model, onnxprune.prune(model, **common).model, test) > 1e-2


# --- rotation legality --------------------------------------------------------------------------


def _bn_after_pool() -> onnx.ModelProto:
    b = graphs.Builder(7)
    h = b.bn("bn", b.node("AveragePool", "pool", [b.conv("c1", "x", 3, 6)], kernel_shape=[2, 2]), 6)
    return b.model([b.conv("c2", h, 6, 4)])


def _maxpool() -> onnx.ModelProto:
    b = graphs.Builder(8)
    h = b.node("MaxPool", "pool", [b.conv("c1", "x", 3, 6)], kernel_shape=[2, 2])
    return b.model([b.conv("c2", h, 6, 4)])


@pytest.mark.parametrize(
    "build, blocker",
    [
        (graphs.conv_chain, "Relu 'r1'"),
        (_bn_after_pool, "BatchNormalization 'bn' has a per-channel affine"),
        (_maxpool, "MaxPool 'pool' takes a per-channel max"),
    ],
    ids=["relu", "batchnorm", "maxpool"],
)
def test_the_analyzer_refuses_rotation_across(build, blocker):
    group = next(g for g in analyze(normalize(build())) if g.name == "c1")
    assert group.prunable and not group.rotatable
    assert blocker in group.rotation_block


def test_explicit_cob_on_a_non_rotatable_group_says_so_and_selects_without_rotation():
    model = graphs.conv_chain()
    result = onnxprune.prune(
        model, method="cob", ratio=0.5, round_to=1, data=graphs.random_input(model, 16)
    )
    assert all(p.rotation is None and p.info["rotated"] == 0 for p in result.plans.values())
    (note,) = [n for n in result.report.notes if n.startswith("cob:")]
    assert "2 group(s) cannot be rotated" in note and "Relu 'r1'" in note


def _rms_pattern(square: str, inverse: bool) -> onnx.ModelProto:
    """c1(6) → x / sqrt(mean_c(x²) + ε) written with primitives → avgpool → c2(4)."""
    b = graphs.Builder(9)
    h = b.conv("c1", "x", 3, 6)
    sq = (
        b.node("Pow", "sq", [h, b.const("two", np.array(2, np.float32))])
        if square == "pow"
        else b.node("Mul", "sq", [h, h])
    )
    ms = b.node("ReduceMean", "ms", [sq], axes=[1], keepdims=1)
    rms = b.node("Sqrt", "rt", [b.node("Add", "eps", [ms, b.const("e", np.float32(1e-6))])])
    y = (
        b.node("Mul", "nrm", [h, b.node("Reciprocal", "inv", [rms])])
        if inverse
        else b.node("Div", "nrm", [h, rms])
    )
    y = b.node("AveragePool", "pool", [y], kernel_shape=[2, 2])
    return b.model([b.conv("c2", y, 6, 4)])


@pytest.mark.parametrize("square, inverse", [("pow", False), ("mul", True)])
def test_primitive_rmsnorm_pattern_is_rotatable_and_prunes_validly(square, inverse):
    model = _rms_pattern(square, inverse)
    group = next(g for g in analyze(normalize(model)) if g.name == "c1")
    assert group.rotatable and group.invariants == (("rmsnorm", "nrm"),)
    calib, test = graphs.random_input(model, 32), graphs.random_input(model, 8, seed=4)
    full = onnxprune.prune(model, method="cob", ratio=0.0, data=calib)
    assert_outputs_close(model, full.model, test, atol=1e-5, rtol=1e-5)
    half = onnxprune.prune(model, method="magnitude", ratio=0.5, round_to=1)
    assert run_model(half.model, test)[half.model.graph.output[0].name].shape[1] == 4


def _rmsnormalization(scale: np.ndarray) -> onnx.ModelProto:
    b = graphs.Builder(10)
    h = b.node(
        "RMSNormalization",
        "rmsn",
        [b.conv("c1", "x", 3, 6), b.const("s", scale)],
        axis=1,
        epsilon=1e-5,
    )
    return b.model([b.conv("c2", h, 6, 4)], opset=23)


def test_opset23_rmsnormalization_with_a_uniform_scale_is_rotatable():
    ones = _rmsnormalization(np.ones((6, 1, 1), np.float32))
    graph = normalize(ones)
    group = next(g for g in analyze(graph) if g.name == "c1")
    assert group.rotatable and group.invariants == (("rmsnorm", "rmsn"),)
    q = _orthogonal(6, RNG)
    plan = Plan(np.arange(6), {group.taps[0].tensor: Correction(q)}, rotation=q)
    test = graphs.random_input(ones, 4, seed=2)
    assert_outputs_close(ones, export(rewrite(graph, (group,), {"c1": plan})), test, atol=1e-5)
    pruned = export(rewrite(graph, (group,), {"c1": Plan(np.array([0, 2, 3]))}))
    assert numpy_helper.to_array(
        next(t for t in pruned.graph.initializer if t.name.startswith("s"))
    ).shape == (3, 1, 1)
    scaled = _rmsnormalization(np.linspace(0.5, 2, 6, dtype=np.float32).reshape(6, 1, 1))
    group = next(g for g in analyze(normalize(scaled)) if g.name == "c1")
    assert group.prunable and "per-channel scale" in group.rotation_block


def test_opset23_rmsnormalization_prunes_end_to_end_with_cob(save_tmp):
    model = _rmsnormalization(np.ones((6, 1, 1), np.float32))
    path = save_tmp(model)
    data = graphs.random_input(model, 64, seed=3)
    full = onnxprune.prune(path, method="cob", ratio=0.0, data=data, round_to=1)
    assert_outputs_close(model, full.model, graphs.random_input(model, 8, seed=4), atol=1e-4)
    half = onnxprune.prune(path, method="cob", ratio=0.5, data=data, round_to=1)
    assert half.model.opset_import[0].version == 23
    assert half.report.macs[1] < half.report.macs[0]
    onnx.checker.check_model(half.model, full_check=True)


# --- the split attribute after pruning ----------------------------------------------------------


def _concat_tsra() -> onnx.ModelProto:
    """ca(4) ⊕ cb(6) → TSRA(split 7) → c2: the split falls inside cb's channels."""
    b = graphs.Builder(11)
    cat = b.node("Concat", "cat", [b.conv("ca", "x", 3, 4), b.conv("cb", "x", 3, 6)], axis=1)
    b.nodes.append(tsra_node(cat, "t", 7, 1, "tsra"))
    model = b.model([b.conv("c2", "t", 10, 4)], opset=18, extra_opsets=[("onnxprune", 1)])
    model.functions.extend(make_model([], [], []).functions)
    return model


@pytest.mark.parametrize("method", ["magnitude", "random", "cob"])
def test_split_is_the_number_of_kept_channels_before_it(method):
    model = _concat_tsra()
    groups = {g.name: g for g in analyze(normalize(model))}
    assert groups["ca"].subspaces == () and groups["cb"].subspaces == (3,)
    result = onnxprune.prune(
        model, method=method, ratio=0.5, round_to=1, data=graphs.random_input(model, 32)
    )
    keep_a, keep_b = result.plans["ca"].keep, result.plans["cb"].keep
    split = next(
        a.i
        for n in result.model.graph.node
        if n.op_type == "TSRA"
        for a in n.attribute
        if a.name == "split"
    )
    assert split == len(keep_a) + int((keep_b < 3).sum())
    assert 0 < (keep_b < 3).sum() < len(keep_b)  # both subspaces of cb keep a channel
    out = run_model(result.model, graphs.random_input(model, 2))
    assert np.all(np.isfinite(next(iter(out.values()))))


def test_every_method_keeps_a_channel_in_each_subspace():
    model = _mlp(4, 8, ["tsra"])
    weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    weights["w1"][4:] *= 1e-3  # every V filter is tiny: magnitude alone would keep only U
    del model.graph.initializer[:]
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    result = onnxprune.prune(model, method="magnitude", ratio=0.75, round_to=1)
    keep = result.plans["fc1"].keep
    assert (keep < 4).sum() == 1 and (keep >= 4).sum() == 1  # still 2 channels, one per subspace
    assert result.plans["fc1"].info["subspace_swap"] == 1
    calib = _x(64, 4, 1)
    by_id = onnxprune.prune(model, method="id", ratio=0.75, round_to=1, data=calib)
    plan = by_id.plans["fc1"]  # id's own map is replaced by the least-squares map of the splice
    assert len(plan.keep) == 2 and (plan.keep >= 4).sum() == 1
    assert plan.info["subspace_swap"] == 1 and plan.corrections


# --- selection rules and options ----------------------------------------------------------------


def test_block_pca_is_block_diagonal_orthogonal_and_descending():
    h = RNG.standard_normal((200, 6)) @ RNG.standard_normal((6, 6))
    Q, lam = block_pca(h.T @ h, ((0, 2), (2, 6)))
    np.testing.assert_allclose(Q @ Q.T, np.eye(6), atol=1e-12)
    assert not np.any(Q[:2, 2:]) and not np.any(Q[2:, :2])
    assert lam[0] >= lam[1] and np.all(np.diff(lam[2:]) <= 0)
    np.testing.assert_allclose(np.diag(Q @ (h.T @ h) @ Q.T), lam, rtol=1e-10)


def test_fixed_and_threshold_selection_per_subspace():
    imp = np.array([9.0, 5.0, 0.5, 0.1, 8.0, 0.7, 0.6, 0.2])
    ranges = ((0, 4), (4, 8))
    assert fixed_keep(imp, ranges, 4).tolist() == [0, 1, 4, 5]
    assert fixed_keep(imp, ranges, 1).tolist() == [0, 4]  # ≥ 1 per subspace
    assert threshold_keep(imp, ranges, "max", 0.1).tolist() == [0, 1, 4]
    assert threshold_keep(imp, ranges, "mean", 1.0).tolist() == [0, 1, 4]
    assert threshold_keep(imp, ranges, "median", 1.0).tolist() == [0, 1, 4, 5]
    assert threshold_keep(imp, ranges, "zscore", 0.0).tolist() == [0, 1, 4]
    assert channel_ratio_for_params(0.75) == pytest.approx(0.5)


def test_cob_threshold_prunes_and_options_are_validated():
    model = _mlp(4, 32, ["tsra"])
    result = onnxprune.prune(model, method="cob", threshold="max:0.1", data=_x(128, 4, 1))
    assert len(result.plans["fc1"].keep) == 10  # rank 5 per subspace; the rest has λ = 0
    for bad in ("top:0.1", "max", "max:x", "mean:-1"):
        with pytest.raises(UsageError):
            parse_threshold(bad)
    with pytest.raises(UsageError, match="option of --method cob"):
        onnxprune.prune(model, method="magnitude", threshold="max:0.1")
    with pytest.raises(UsageError, match="--compensate"):
        onnxprune.prune(model, method="cob", compensate="bias", data=_x(8, 4, 1))
    with pytest.raises(UsageError, match="chooses the widths"):
        onnxprune.prune(model, method="cob", threshold="max:0.1", target_params=0.5)


def test_cli_prunes_tsra_vgg_with_cob(tmp_path):
    from onnxprune.cli import main

    out = tmp_path / "p.onnx"
    code = main(
        [
            str(reference_path("tsra_vgg")),
            "--method",
            "cob",
            "--param-ratio",
            "0.75",
            "--data",
            "models/digits32_calib.npz",
            "--calib-samples",
            "128",
            "--round-to",
            "1",
            "-o",
            str(out),
            "--rms-correction",
        ]
    )
    assert code == 0
    pruned = onnx.load(str(out))
    assert sum(numpy_helper.to_array(t).size for t in pruned.graph.initializer) < 0.3 * 401450
    assert isinstance(gs.import_onnx(pruned), gs.Graph)


def test_cob_on_a_linear_chain_reaches_the_eckart_young_optimum():
    """Centred PCA + mean folding is the best rank-k affine fit of the tap: brute force by SVD."""
    model = _mlp(10, 16, [])
    calib = _x(300, 10, 3)
    result = onnxprune.prune(model, method="cob", ratio=0.75, round_to=1, data=calib, holdout=0)
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    z = calib["x"] @ weights["w1"].T + weights["b1"]  # the tap: fc1's outputs
    centred = z - z.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    optimum = np.sqrt(np.sum(s[4:] ** 2) / np.sum(z**2))
    assert result.plans["fc1"].info["err"] == pytest.approx(optimum, rel=1e-4)
    # and no selection of 4 original channels, even with the best affine map, gets there
    assert (
        onnxprune.prune(model, method="id", ratio=0.75, round_to=1, data=calib, compensate="bias")
        .plans["fc1"]
        .info["err"]
        > 1.05 * optimum
    )
