"""Regressions for analyzer/rewriter defects found on real exports, each on its minimal graph.

SPPF (one tensor tapped at several Concat offsets), a stride-2 ConvTranspose consumer of a
constant correction, a Reshape that folds channels into the batch, ε on coupled groups, and the
RMSNorm divisor for methods other than cob.
"""

from __future__ import annotations

import graphs
import numpy as np
import onnx
from conftest import assert_outputs_close, max_deviation, run_model

import onnxprune
from onnxprune.calib.stats import tapped_session
from onnxprune.cli import main


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
    result = onnxprune.prune(model, method="id", ratio=0.5, round_to=1, data=calib, verify=False)
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


def _constant_channel_into_conv_transpose() -> onnx.ModelProto:
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
    return b.model([up])


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
