"""Tap reading and recalibration on real ONNX Runtime: streamed statistics equal dense ones, and
`--recalibrate` restores every adjusted layer's moments, also where ORT fuses residual Adds."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from conftest import assert_outputs_close, reference_feeds, reference_path
from graphs import Builder

import onnxprune
import onnxprune.calib.stats as stats_module
import onnxprune.recalibrate as recalibrate_module
from onnxprune.calib.stats import TapAccumulator, channel_moments, collect, tapped_session
from onnxprune.graph.groups import Tap
from onnxprune.graph.load import export, load_model, normalize
from onnxprune.graph.rewrite import affine_outputs
from onnxprune.recalibrate import recalibrate


def _unoptimized(model: onnx.ModelProto, names: list[str], feeds: dict) -> list[np.ndarray]:
    """The tensors `names` from a session with every graph optimization off (the reference)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    return session.run(names, feeds)


def _residual_inputs(model: onnx.ModelProto) -> list[str]:
    return [t for n in model.graph.node if n.op_type == "Add" for t in n.input
            if not t.startswith("onnx::")]  # fmt: skip


def test_tapped_session_reads_the_same_values_as_an_unoptimized_session():
    model = load_model(reference_path("resnet"))
    names = _residual_inputs(model)
    assert len(names) >= 4
    feeds = reference_feeds("resnet", 16)
    session, aliases = tapped_session(model, names)
    got = session.run(aliases, feeds)
    for ref, value in zip(_unoptimized(model, names, feeds), got, strict=True):
        np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-4)
    assert [o.name for o in session.get_outputs()][0] == "logits"  # the model's own output first


def test_streamed_statistics_equal_dense_ones_in_float64():
    model = load_model(reference_path("resnet"))
    name = _residual_inputs(model)[0]
    feeds = reference_feeds("resnet", 48)
    dense = _unoptimized(model, [name], feeds)[0].astype(np.float64)
    channels = dense.shape[1]
    rows = np.moveaxis(dense, 1, -1).reshape(-1, channels)
    tap = Tap(tensor=name, axis=1, offset=0, spatial=1)
    batches = [{"input": feeds["input"][i : i + 16]} for i in range(0, 48, 16)]
    stats = collect(model, [(tap, channels)], batches)[tap]
    assert stats.n == rows.shape[0]
    scale = np.abs(rows.T @ rows).max()
    np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_array_equal(stats.gram, stats.gram.T)
    np.testing.assert_allclose(stats.sum, rows.sum(0), rtol=1e-5, atol=1e-4)
    mean, var = channel_moments(model, {name: 1}, batches)[name]
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, rows.var(0), rtol=1e-4, atol=1e-6)


def test_accumulator_gram_is_exact_for_strided_views_and_empty_batches():
    rng = np.random.default_rng(0)
    acc, parts = TapAccumulator(5), []
    for n in (7, 0, 13):
        block = rng.standard_normal((n, 3, 5)).astype(np.float32)
        view = np.moveaxis(block, 1, 0).reshape(-1, 5)[::2]  # non-contiguous float32 rows
        acc.add(view)
        parts.append(view.astype(np.float64))
    rows = np.vstack(parts)
    np.testing.assert_allclose(acc.result().gram, rows.T @ rows, rtol=1e-12, atol=1e-12)
    assert acc.result().n == rows.shape[0]


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_recalibrate_on_resnet_with_residual_streams_restores_every_layer(target):
    """Regression: at these widths ORT fused a shortcut Conv into the residual Add and the
    recalibration pass failed with a raw RuntimeError ('Failed to find node output')."""
    feeds = reference_feeds("resnet", 128)
    result = onnxprune.prune(reference_path("resnet"), method="magnitude", recalibrate=True,
                             target_macs=target, round_to=1, prune_residual=True, data=feeds,
                             verify=False)  # fmt: skip
    assert any("recalibrated" in note for note in result.report.notes)
    original = load_model(reference_path("resnet"))
    adjusted = [n for n in result.model.graph.node
                if any(i.endswith("__recal") for i in n.input)]  # fmt: skip
    assert len(adjusted) >= 8
    for node in adjusted:
        name = node.output[0]
        ref_mean, ref_var = channel_moments(original, {name: 1}, [feeds])[name]
        mean, var = channel_moments(result.model, {name: 1}, [feeds])[name]
        group = next((g for g in result.groups if node.name in g.producers), None)
        keep = result.plans[group.name].keep if group and group.name in result.plans else None
        if keep is not None:
            ref_mean, ref_var = ref_mean[keep], ref_var[keep]
        live = ref_var > 1e-6 * ref_var.max()
        np.testing.assert_allclose(mean, ref_mean, atol=1e-3 * np.sqrt(ref_var.max()))
        np.testing.assert_allclose(var[live], ref_var[live], rtol=1e-3)


def _one_pass_per_layer(original, pruned, groups, plans, batches) -> None:
    """The recalibration as first written (the reference): layer after layer in graph order,
    a full pass of the whole pruned model for each."""
    targets = recalibrate_module._targets(pruned, groups, plans)
    reference = channel_moments(original, {t: axis for _, t, axis, _ in targets}, batches)
    for name, tensor, axis, keep in targets:
        mean, var = (values[keep] for values in reference[tensor])
        now_mean, now_var = channel_moments(export(pruned), {tensor: axis}, batches)[tensor]
        scale = np.ones_like(var)
        live = now_var > 1e-12 * max(float(now_var.max()), 1e-30)
        scale[live] = np.sqrt(var[live] / now_var[live])
        affine_outputs(pruned, name, scale, mean - scale * now_mean)


def _residual_with_border_shift():
    """graphs.residual_block pruned with exact borders: shift Adds after padded consumers."""
    model = graphs.residual_block()
    options = {"compensate": "bias", "exact_borders": True, "ratio": 0.25, "prune_residual": True}
    return model, graphs.random_input(model, 80), options


def _digits_resnet():
    options = {"target_macs": 0.5, "prune_residual": True}
    return load_model(reference_path("resnet")), reference_feeds("resnet", 80), options


@pytest.mark.parametrize(
    ("case", "spill"),
    [(_digits_resnet, False), (_residual_with_border_shift, False), (_digits_resnet, True)],
    ids=["resnet", "border-shift", "resnet-on-disk"],
)
def test_segmented_recalibration_equals_one_full_pass_per_layer(case, spill, monkeypatch):
    """The segmented single pass folds the same affines as re-running the whole pruned model
    for every layer (float32 rounding apart), over several batches; also with every held value
    in files (`spill`: HELD_BYTES = 0)."""
    if spill:
        monkeypatch.setattr(recalibrate_module, "HELD_BYTES", 0)
    model, feeds, options = case()
    result = onnxprune.prune(model, method="magnitude", round_to=1, data=feeds,
                             recalibrate=False, verify=False, holdout=0, **options)  # fmt: skip
    original = export(normalize(model))
    batches = [{k: v[i : i + 32] for k, v in feeds.items()} for i in range(0, 80, 32)]
    fast, slow = gs.import_onnx(result.model), gs.import_onnx(result.model)
    _, layers = recalibrate(
        lambda: original, fast, result.groups, result.plans, lambda: iter(batches)
    )
    _one_pass_per_layer(original, slow, result.groups, result.plans, batches)
    assert layers >= 3
    if case is _residual_with_border_shift:
        assert any(node.name.endswith("__shift_add") for node in fast.nodes)
    slow_values = {t.name: t.values for t in slow.tensors().values() if isinstance(t, gs.Constant)}
    recalibrated = [t for t in fast.tensors().values() if t.name.endswith("__recal")]
    assert len(recalibrated) >= layers
    for tensor in recalibrated:
        expected = slow_values[tensor.name]
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(tensor.values, expected, rtol=1e-4, atol=1e-5 * scale)
    assert_outputs_close(export(slow), export(fast), batches[0], atol=1e-5)


def test_batches_run_in_parts_under_the_byte_budget_with_the_same_statistics(monkeypatch):
    """A batch whose taps exceed RUN_BYTES runs in parts (here one sample each): the streamed
    sums are the same up to float64 rounding."""
    model = load_model(reference_path("resnet"))
    names = _residual_inputs(model)[:2]
    feeds = reference_feeds("resnet", 24)
    taps = [(Tap(tensor=name, axis=1, offset=0, spatial=1), 8) for name in names]
    whole = collect(model, taps, [feeds])
    session, aliases = tapped_session(model, names)
    monkeypatch.setattr(stats_module, "RUN_BYTES", 1)
    assert len(list(stats_module.tap_runs(session, aliases, names, [feeds]))) == 24
    parts = collect(model, taps, [feeds])
    for tap, _ in taps:
        assert parts[tap].n == whole[tap].n
        scale = np.abs(whole[tap].gram).max()
        np.testing.assert_allclose(parts[tap].gram, whole[tap].gram, rtol=1e-9, atol=1e-12 * scale)
        np.testing.assert_allclose(parts[tap].sum, whole[tap].sum, rtol=1e-9, atol=1e-9)


def _token_ffn() -> onnx.ModelProto:
    """x[N,6,8] → MatMul (8×16) + bias → Relu → MatMul (16×8) + bias → y: a transformer FFN on
    token features, channels on the last axis."""
    b = Builder(3)
    h = b.node("MatMul", "up", ["x", b.rand("up.w", 8, 16)])
    h = b.relu("act", b.node("Add", "up_bias", [h, b.rand("up.b", 16)]))
    y = b.node("MatMul", "down", [h, b.rand("down.w", 16, 8)])
    return b.model([b.node("Add", "down_bias", [y, b.rand("down.b", 8)])], shape=("N", 6, 8))


@pytest.mark.parametrize("method, compensate", [("magnitude", "none"), ("id", "bias")])
def test_recalibrate_restores_a_matmul_consumers_moments_on_its_last_axis(method, compensate):
    """Regression: MatMul consumers (every Linear of an exported transformer) were skipped, so
    `--method id` recalibrated 0 layers of MiniLM's FFNs. With a bias correction the shift Add
    exists already and takes the affine's shift; without one it is created. Moments are read
    after the layer's bias Add, into which the written model merges the shift Add."""
    model = _token_ffn()
    feeds = {"x": np.random.default_rng(0).standard_normal((64, 6, 8)).astype(np.float32)}
    result = onnxprune.prune(model, method=method, compensate=compensate, recalibrate=True,
                             ratio=0.5, round_to=1, data=feeds, verify=False)  # fmt: skip
    assert "recalibrated the output mean and variance of 1 layers" in result.report.notes
    ref_mean, ref_var = channel_moments(model, {"down_bias_out": -1}, [feeds])["down_bias_out"]
    mean, var = channel_moments(result.model, {"down_bias_out": -1}, [feeds])["down_bias_out"]
    np.testing.assert_allclose(mean, ref_mean, atol=1e-4 * np.sqrt(ref_var.max()))
    np.testing.assert_allclose(var, ref_var, rtol=1e-4)
    unrecalibrated = onnxprune.prune(
        model,
        method=method,
        compensate=compensate,
        ratio=0.5,
        recalibrate=False,
        round_to=1,
        data=feeds,
        verify=False,
    )
    moments = channel_moments(unrecalibrated.model, {"down_bias_out": -1}, [feeds])
    _, var_before = moments["down_bias_out"]
    assert np.max(np.abs(var_before / ref_var - 1)) > 1e-2  # the pass had something to restore
