"""Regressions for analyzer/rewriter defects found on real exports, each on its minimal graph.

SPPF (one tensor tapped at several Concat offsets), a stride-2 ConvTranspose consumer of a
constant correction, a Reshape that folds channels into the batch, ε on coupled groups, and the
RMSNorm divisor for methods other than cob.
"""

from __future__ import annotations

from dataclasses import replace

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close, max_deviation, run_model

import onnxprune
from onnxprune.calib.stats import tap_rows, tapped_session
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.groups import ChannelGroup
from onnxprune.graph.load import export, normalize
from onnxprune.graph.rewrite import rewrite
from onnxprune.plan import Correction, Plan


def _tensor(model: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The value of inner tensor `name` on `feeds`, read from ORT."""
    session, aliases = tapped_session(model, [name])
    return session.run(aliases, feeds)[0]


def _rows(array: np.ndarray) -> np.ndarray:
    """(N, C, H, W) → (N·H·W, C) in float64: channels as columns, positions as rows."""
    return np.moveaxis(array, 1, -1).reshape(-1, array.shape[1]).astype(np.float64)


def _sppf() -> onnx.ModelProto:
    """YOLOv8's SPPF: t = relu(c1(x)) (4 channels); Concat(t, mp(t), mp(mp(t))) → c2 → y."""
    b = graphs.Builder(40)
    t = b.relu("r1", b.conv("c1", "x", 3, 4))
    pool = {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}
    p1 = b.node("MaxPool", "mp1", [t], **pool)
    p2 = b.node("MaxPool", "mp2", [p1], **pool)
    cat = b.node("Concat", "cat", [t, p1, p2], axis=1)
    return b.model([b.conv("c2", cat, 12, 5)])


def _single_conv(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """A model holding only a 3×3 zero-padded conv with the given weights."""
    b = graphs.Builder(0)
    y = b.conv("c", "x", weight.shape[1], weight.shape[0], weight=weight, b=bias)
    return b.model([y], shape=("N", weight.shape[1], 8, 8))


def test_each_concat_segment_of_one_tensor_gets_its_own_least_squares_map():
    """SPPF holds the same 4 channels at offsets 0, 4, 8. The kept channels are shared, but each
    segment is reconstructed from its own kept channels: the plan must hold one correction per
    segment, equal to numpy's least squares on that segment's activations, and the pruned model
    must equal c2 applied to the per-segment reconstructions."""
    model = _sppf()
    calib = graphs.random_input(model, 16)
    group = next(g for g in onnxprune.analyze(model).groups if g.name == "c1")
    assert [t.key for t in group.taps] == ["cat_out", "cat_out@4", "cat_out@8"]
    result = onnxprune.prune(
        model, method="id", ratio=0.5, round_to=1, data=calib, verify=False,
        compensate="none", recalibrate=False,
    )  # fmt: skip
    plan = result.plans["c1"]
    keep = np.asarray(plan.keep)
    assert len(keep) == 2 and set(plan.corrections) == {t.key for t in group.taps}
    cat = _tensor(model, "cat_out", calib)
    rebuilt = []
    for s, key in enumerate(["cat_out", "cat_out@4", "cat_out@8"]):
        Z = _rows(cat[:, 4 * s : 4 * s + 4])
        M = np.linalg.lstsq(Z[:, keep], Z, rcond=None)[0]
        got = plan.corrections[key].M
        assert np.linalg.norm(got - M) <= 1e-6 * np.linalg.norm(M), key
        segment = np.einsum("nkhw,km->nmhw", cat[:, 4 * s + keep].astype(np.float64), M)
        rebuilt.append(segment)
    c2 = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    reference = _single_conv(c2["c2.w"], c2["c2.b"])
    expected = run_model(reference, {"x": np.concatenate(rebuilt, axis=1).astype(np.float32)})
    got = run_model(result.model, calib)
    scale = float(np.abs(expected["c_out"]).max())
    np.testing.assert_allclose(got["c2_out"], expected["c_out"], atol=1e-5 * scale)


def _batch_folding_reshape() -> onnx.ModelProto:
    """x[N,3,4,4] → c0(8) → relu → c1(4) → relu → Reshape [-1, 16] → MatMul (16×5) → y.

    The Reshape folds c1's channels into the batch axis: (N·4, H·W), not (N, C·H·W)."""
    b = graphs.Builder(41)
    h = b.relu("r0", b.conv("c0", "x", 3, 8))
    h = b.relu("r1", b.conv("c1", h, 8, 4))
    shape = b.const("flat.shape", np.array([-1, 16], dtype=np.int64))
    flat = b.node("Reshape", "flat", [h, shape])
    y = b.node("MatMul", "fc", [flat, b.rand("fc.w", 16, 5)])
    return b.model([y], shape=("N", 3, 4, 4))


def test_reshape_folding_channels_into_the_batch_blocks_its_group(save_tmp, tmp_path):
    """Only (batch, C·H·W) is a channel-major flatten; [-1, H·W] blocks c1's group, naming the
    Reshape, and pruning leaves that group whole instead of crashing in the rewriter."""
    model = _batch_folding_reshape()
    groups = {g.name: g for g in onnxprune.analyze(model).groups}
    assert not groups["c1"].prunable and groups["c1"].blocker == "flat"
    assert "Reshape 'flat'" in groups["c1"].reason
    assert groups["c0"].prunable
    path, out = save_tmp(model), tmp_path / "pruned.onnx"
    assert main([str(path), "--method", "magnitude", "--ratio", "0.5", "--round-to", "1",
                 "-o", str(out)]) == 0  # fmt: skip
    pruned = {t.name: list(t.dims) for t in onnx.load(str(out)).graph.initializer}
    weights = {name: dims for name, dims in pruned.items() if name.startswith(("c0.w", "c1.w"))}
    assert sorted(weights.values()) == [[4, 3, 3, 3], [4, 4, 3, 3]]  # c0 halved, c1 whole


def _constant_channel_into_conv_transpose(shape: tuple = ("N", 3, 8, 8)) -> onnx.ModelProto:
    """c1's channel 5 has a zero filter and bias 0.7 (0.7 everywhere after the ReLU); c1 is read
    by a stride-2 ConvTranspose (kernel 3, pads 1, output_padding 1): 8×8 → 16×16."""
    b = graphs.Builder(42)
    weight = (0.5 * b.rng.standard_normal((8, 3, 3, 3))).astype(np.float32)
    bias = (0.5 * b.rng.standard_normal(8)).astype(np.float32)
    weight[5], bias[5] = 0.0, 0.7
    h = b.relu("r1", b.conv("c1", "x", 3, 8, weight=weight, b=bias))
    inputs = [h, b.rand("up.w", 8, 4, 3, 3), b.rand("up.b", 4)]
    up = b.node("ConvTranspose", "up", inputs, kernel_shape=[3, 3], strides=[2, 2],
                pads=[1, 1, 1, 1], output_padding=[1, 1])  # fmt: skip
    return b.model([up], shape=shape)


def test_constant_folded_into_a_strided_conv_transpose_is_exact():
    """Removing the constant channel with its mean folded downstream reproduces the original: an
    output position of the ConvTranspose receives 1, 2 or 4 kernel taps, so the constant's
    response is a per-position map, not Σ W c in the bias."""
    model = _constant_channel_into_conv_transpose()
    common = {"method": "magnitude", "ratio": 1 / 8, "round_to": 1, "verify": False}
    calib = graphs.random_input(model, 16)
    compensated = onnxprune.prune(model, compensate="bias", data=calib, **common)
    assert compensated.plans["c1"].keep.tolist() == [0, 1, 2, 3, 4, 6, 7]
    test = graphs.random_input(model, 8, seed=3)
    assert_outputs_close(model, compensated.model, test, atol=1e-5)
    plain = onnxprune.prune(model, **common)
    assert max_deviation(model, plain.model, test) > 0.1


def _coupled_with_three_taps() -> onnx.ModelProto:
    """s = c1(x) + c2(x) (1×1 convs, coupled); s → c3, relu(s) → c4, relu(s) → GAP → fc: three
    taps with different statistics (s has rank ≤ 4 over positions, relu(s) does not)."""
    b = graphs.Builder(43)
    s = b.node("Add", "add", [b.conv("c1", "x", 3, 8, 1), b.conv("c2", "x", 3, 8, 1)])
    r = b.relu("r", s)
    flat = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [r])], axis=1)
    return b.model([b.conv("c3", s, 8, 4), b.conv("c4", r, 8, 4), b.gemm("fc", flat, 8, 3)])


@pytest.mark.parametrize("epsilon", [0.05, 0.1, 0.2, 0.3])
def test_epsilon_bounds_the_error_at_every_tap_of_a_coupled_group(epsilon):
    """The reported error of the coupled group is the max over its taps, it is ≤ ε, and the
    relative error of each tap, measured on the activations themselves, is ≤ ε too; one channel
    fewer would break ε at some tap (the width is the narrowest, not merely safe)."""
    model = _coupled_with_three_taps()
    calib = graphs.random_input(model, 32)
    result = onnxprune.prune(model, method="id", epsilon=epsilon, data=calib, round_to=1,
                             prune_residual=True, verify=False)  # fmt: skip
    group = next(g for g in result.groups if g.name == "c1")
    plan = result.plans["c1"]
    assert len(group.taps) == 3 and len(plan.corrections) == 3
    errors = _tap_errors(model, group, plan, calib)
    assert max(errors) <= epsilon + 1e-6, errors
    assert abs(plan.info["err"] - max(errors)) <= 1e-5, (plan.info["err"], errors)
    narrower = onnxprune.prune(model, method="id", ratio=(9 - len(plan.keep)) / 8, data=calib,
                               round_to=1, prune_residual=True, verify=False)  # fmt: skip
    assert len(narrower.plans["c1"].keep) == len(plan.keep) - 1
    assert max(_tap_errors(model, group, narrower.plans["c1"], calib)) > epsilon


def _tap_errors(
    model: onnx.ModelProto, group: ChannelGroup, plan: Plan, feeds: dict[str, np.ndarray]
) -> list[float]:
    """‖Z − (Z_S M + 1cᵀ)‖_F / ‖Z‖_F at every tap, on the activations read from ORT."""
    errors = []
    for tap in group.taps:
        Z = tap_rows(_tensor(model, tap.tensor, feeds), tap, group.channels).astype(np.float64)
        correction = plan.corrections[tap.key]
        c = 0.0 if correction.c is None else correction.c
        approx = Z[:, plan.keep] @ correction.M + c
        errors.append(float(np.linalg.norm(Z - approx) / np.linalg.norm(Z)))
    return errors


def _rmsnorm_chain(kind: str) -> onnx.ModelProto:
    """c1(8) → RMSNorm over channels (Pow → ReduceMean → Add ε → Sqrt → Div) → c2(4) → y.

    kind "duplicate": c1's channel 7 repeats channel 3, both scaled up to carry over half of
    the energy (an average-energy channel leaves the mean divisor unchanged); "zero": channel 7
    is 0 everywhere; "zero-relu": the same with a ReLU before c2 (no rotation passes it)."""
    b = graphs.Builder(44)
    weight = (0.5 * b.rng.standard_normal((8, 3, 3, 3))).astype(np.float32)
    bias = (0.5 * b.rng.standard_normal(8)).astype(np.float32)
    if kind == "duplicate":
        weight[3], bias[3] = 3 * weight[3], 3 * bias[3]
    weight[7], bias[7] = (weight[3], bias[3]) if kind == "duplicate" else (0.0, 0.0)
    h = b.conv("c1", "x", 3, 8, weight=weight, b=bias)
    square = b.node("Pow", "sq", [h, b.const("two", np.array(2.0, dtype=np.float32))])
    mean = b.node("ReduceMean", "ms", [square], axes=[1], keepdims=1)
    eps = b.node("Add", "eps", [mean, b.const("eps.v", np.array(1e-6, dtype=np.float32))])
    normed = b.node("Div", "norm", [h, b.node("Sqrt", "rms", [eps])])
    if kind == "zero-relu":
        normed = b.relu("relu", normed)
    return b.model([b.conv("c2", normed, 8, 4)])


def _rmsnormalization_chain() -> onnx.ModelProto:
    """c1(8, channel 7 zero) → opset-23 RMSNormalization over C·H·W with a per-channel scale →
    c2(4) → y."""
    b = graphs.Builder(45)
    weight = (0.5 * b.rng.standard_normal((8, 3, 3, 3))).astype(np.float32)
    bias = (0.5 * b.rng.standard_normal(8)).astype(np.float32)
    weight[7], bias[7] = 0.0, 0.0
    scale = (0.5 + b.rng.random((8, 1, 1))).astype(np.float32)
    h = b.conv("c1", "x", 3, 8, weight=weight, b=bias)
    normed = b.node("RMSNormalization", "norm", [h, b.const("g", scale)], axis=1, epsilon=1e-6)
    return b.model([b.conv("c2", normed, 8, 4)], opset=23)


def _without_divisor_correction(model: onnx.ModelProto, result) -> onnx.ModelProto:
    """The same pruning with the RMS scale taken back out of c1's correction."""
    graph = normalize(model)
    plan = result.plans["c1"]
    scale = plan.info["rms_scale"]
    corrections = {k: Correction(c.M / scale, c.c) for k, c in plan.corrections.items()}
    plans = {**result.plans, "c1": replace(plan, corrections=corrections)}
    return export(rewrite(graph, result.groups, plans))


@pytest.mark.parametrize(
    ("kind", "method"),
    [("zero", "magnitude"), ("opset23", "magnitude"), ("duplicate", "id"), ("zero-relu", "cob")],
    ids=["zero", "opset23-zero", "duplicate", "cob-unrotated"],
)
def test_rmsnorm_divisor_is_corrected_for_methods_other_than_cob(kind, method):
    """Removing channels changes RMSNorm's divisor √(Σ x²/C): the consumers of its output are
    rescaled by √(C·E_S / (k·E)). A removed zero channel is then reproduced exactly (the factor is
    √(8/7) for every sample); a removed duplicate closely, and far better than without it. cob
    corrects the divisor itself where it rotates (--rms-correction); a group it cannot rotate is
    planned as by id, with this correction."""
    model = _rmsnormalization_chain() if kind == "opset23" else _rmsnorm_chain(kind)
    calib, test = graphs.random_input(model, 32), graphs.random_input(model, 8, seed=3)
    group = next(g for g in onnxprune.analyze(model).groups if g.name == "c1")
    energies = "c1_out" if kind == "opset23" else "norm_out"  # before the per-channel scale
    tap = "relu_out" if kind == "zero-relu" else "norm_out"
    assert group.prunable and [(k, t.tensor) for k, t in group.normalized] == [(tap, energies)]
    assert not group.rotatable or kind != "zero-relu"
    common = {"method": method, "round_to": 1, "data": calib, "verify": False}
    assert_outputs_close(model, onnxprune.prune(model, ratio=0.0, **common).model, test)
    result = onnxprune.prune(model, ratio=1 / 8, **common)
    removed = set(range(8)) - set(result.plans["c1"].keep.tolist())
    assert removed <= ({3, 7} if kind == "duplicate" else {7}) and len(removed) == 1
    if kind != "duplicate":
        assert result.plans["c1"].info["rms_scale"] == pytest.approx(np.sqrt(8 / 7), rel=1e-6)
        assert_outputs_close(model, result.model, test, atol=1e-4)
        return
    corrected = relative_l2(model, result.model, test)
    uncorrected = relative_l2(model, _without_divisor_correction(model, result), test)
    assert corrected <= 0.7 * uncorrected, (corrected, uncorrected)


def relative_l2(model_a: onnx.ModelProto, model_b: onnx.ModelProto, feeds) -> float:
    """‖b − a‖ / ‖a‖ over the single output."""
    (a,), (b,) = run_model(model_a, feeds).values(), run_model(model_b, feeds).values()
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))


def test_constant_into_a_conv_transpose_of_unknown_size_is_refused():
    """With dynamic spatial dims the per-position response has no fixed shape: one-line error
    naming the node, not a bias that is wrong at every other position."""
    model = _constant_channel_into_conv_transpose(("N", 3, "H", "W"))
    calib = graphs.random_input(model, 8)
    with pytest.raises(OnnxPruneError, match="ConvTranspose 'up' has dynamic spatial dims"):
        onnxprune.prune(model, method="magnitude", ratio=1 / 8, round_to=1, data=calib,
                        compensate="bias", verify=False)  # fmt: skip


def _normalized_rows() -> onnx.ModelProto:
    """c1(8) → h / Expand(clip(‖h‖ over W), Shape(h)) → c2(4): torch's export of
    F.normalize(h, dim=-1), as in Swin V2's cosine attention."""
    b = graphs.Builder(44)
    h = b.conv("c1", "x", 3, 8)
    norm = b.node("ReduceL2", "l2", [h], axes=[-1], keepdims=1)
    norm = b.node("Clip", "clip", [norm, b.const("eps", np.float32(1e-12))])
    expanded = b.node("Expand", "expand", [norm, b.node("Shape", "shape", [h])])
    return b.model([b.conv("c2", b.node("Div", "div", [h, expanded]), 8, 4)])


def test_expand_to_the_shape_of_its_divisor_is_bypassed_and_prunes_exactly():
    """The Expand only broadcasts what Div broadcasts anyway: normalization drops it (same
    outputs), so its Shape no longer reads c1's channel count and c1 is prunable. Pruning c1 then
    equals the original with c2's weights on the removed channels zeroed (each channel is
    normalized over its own row)."""
    model = _normalized_rows()
    test = graphs.random_input(model, 8, seed=3)
    normalized = export(normalize(model))
    assert "Expand" not in {n.op_type for n in normalized.graph.node}
    assert_outputs_close(model, normalized, test, atol=1e-6)
    group = next(g for g in onnxprune.analyze(model).groups if g.name == "c1")
    assert group.prunable, group.reason
    result = onnxprune.prune(
        model, method="magnitude", ratio=0.5, round_to=1, compensate="none", verify=False
    )
    keep = np.asarray(result.plans["c1"].keep)
    assert len(keep) == 4
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    weight = next(t for t in zeroed.graph.initializer if t.name == "c2.w")
    values = onnx.numpy_helper.to_array(weight).copy()
    values[:, np.setdiff1d(np.arange(8), keep)] = 0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, "c2.w"))
    assert_outputs_close(zeroed, result.model, test, atol=1e-5)
