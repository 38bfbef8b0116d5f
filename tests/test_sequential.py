"""Sequential corrections (`--sequential`): each tap's map refit on the pruned model's own
activations. Exact where the method is exact, equal to a brute-force least squares on the pruned
model's activations, and better than the one-shot fit where upstream errors reach a tap."""

from __future__ import annotations

from dataclasses import replace

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close, run_model
from graphs import Builder
from test_recurrent import _x, recurrent_model

import onnxprune
from onnxprune.calib.stats import with_outputs
from onnxprune.config import PruneConfig
from onnxprune.errors import UsageError
from onnxprune.graph.analyze import analyze as find_groups
from onnxprune.graph.load import export, normalize
from onnxprune.graph.rewrite import rewrite
from onnxprune.graph.segments import segment_to
from onnxprune.methods.linalg import selection_map
from onnxprune.plan import Correction
from onnxprune.sequential import refold


def _mlp(
    widths: tuple[int, ...], seed: int = 0, duplicate: bool = False, rotate: bool = False
) -> onnx.ModelProto:
    """x[N, widths[0]] → (Gemm → Relu)* → Gemm(3) → y; with `duplicate`, unit 1 of every hidden
    layer repeats unit 0 (same weights and bias: equal activations); with `rotate`, the last
    Gemm is an orthogonal matrix, so the output's error is the last tap's."""
    b = Builder(seed)
    h = "x"
    for i, (fin, fout) in enumerate(zip(widths[:-1], widths[1:], strict=False)):
        w = (b.rng.standard_normal((fout, fin)) / np.sqrt(fin)).astype(np.float32)
        bias = (0.3 * b.rng.standard_normal(fout)).astype(np.float32)
        if duplicate:
            w[1], bias[1] = w[0], bias[0]
        node = b.node("Gemm", f"g{i}", [h, b.const(f"g{i}.w", w), b.const(f"g{i}.b", bias)],
                      transB=1)  # fmt: skip
        h = b.relu(f"r{i}", node)
    if not rotate:
        return b.model([b.gemm("out", h, widths[-1], 3)], shape=("N", widths[0]))
    q = np.linalg.qr(b.rng.standard_normal((widths[-1], widths[-1])))[0].astype(np.float32)
    y = b.node("Gemm", "out", [h, b.const("out.w", q), b.rand("out.b", widths[-1])], transB=1)
    return b.model([y], shape=("N", widths[0]))


def _inputs(n: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs on a fixed 4-dimensional subspace plus a little noise: redundant activations."""
    basis = np.random.default_rng(100).standard_normal((4, width))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)) @ basis + 0.05 * rng.standard_normal((n, width))
    return {"x": x.astype(np.float32)}


SMALL_GRAPHS = [  # (builder, prune options): one small graph per kind of tap and reader
    (graphs.conv_chain, {}),
    (graphs.concat, {}),
    (graphs.flatten_gemm, {}),
    (graphs.matmul_chain, {}),
    (graphs.residual_block, {"prune_residual": True}),
    (graphs.se_block, {}),
]


def _relative(model: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict) -> float:
    ref, got = (next(iter(run_model(m, feeds).values())) for m in (model, pruned))
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("build, options", SMALL_GRAPHS)
def test_ratio_zero_is_the_identity(build, options, save_tmp):
    path = save_tmp(build())
    model = onnx.load(path)
    data = graphs.random_input(model, 64)
    result = onnxprune.prune(path, method="id", ratio=0.0, data=data, sequential=True, **options)
    assert any("sequential fit" in note for note in result.report.notes)
    assert_outputs_close(path, result.model, graphs.random_input(model, 8, seed=1), atol=1e-5)


def test_duplicated_units_are_still_removed_exactly(save_tmp):
    model = _mlp((6, 5, 5), duplicate=True)
    path = save_tmp(model)
    result = onnxprune.prune(path, method="id", ratio=0.2, round_to=1, data=_inputs(256, 6, 0),
                             sequential=True, recalibrate=False)  # fmt: skip
    assert all(len(plan.keep) == 4 for plan in result.plans.values())
    assert all(plan.info["seq"] < 1e-4 for plan in result.plans.values())
    assert_outputs_close(path, result.model, _inputs(16, 6, 1), atol=1e-4)


def test_each_map_is_the_least_squares_fit_on_the_pruned_models_activations(save_tmp):
    model = _mlp((8, 10, 8))
    path, data = save_tmp(model), _inputs(300, 8, 0)
    options = {
        "method": "id",
        "ratio": 0.5,
        "round_to": 1,
        "data": data,
        "recalibrate": False,
        "verify": False,  # nothing held out: the fit takes every sample
    }
    one_shot = onnxprune.prune(path, **options, sequential=False)
    result = onnxprune.prune(path, **options, sequential=True)
    feeds = data
    original = run_model(with_outputs(model, ["r0_out", "r1_out"]), feeds)
    pruned = run_model(with_outputs(result.model, ["r0_out", "r1_out"]), feeds)
    for name in ("g0", "g1"):
        before, after = one_shot.plans[name], result.plans[name]
        np.testing.assert_array_equal(after.keep, before.keep)
        assert after.info["seq"] <= after.info["drift"] + 1e-9
    # the first tap has nothing pruned before it: the one-shot map is already the fit there
    np.testing.assert_allclose(result.plans["g0"].corrections["r0_out"].M,
                               one_shot.plans["g0"].corrections["r0_out"].M, atol=1e-5)  # fmt: skip
    # the second reads the first's errors: for the removed channels a ridge fit (ρ chosen on two
    # folds) toward M₀; the kept channels pass through as in the one-shot map
    before = one_shot.plans["g1"].corrections["r1_out"]
    M0, ridge = before.M, result.plans["g1"].info["ridge"]
    M, c = _brute_force(pruned["r1_out"], original["r1_out"], M0, ridge)
    got = result.plans["g1"].corrections["r1_out"]
    kept = np.isin(np.arange(M.shape[1]), result.plans["g1"].keep)
    M[:, kept], c[kept] = M0[:, kept], before.c[kept]
    assert (~kept).any()
    np.testing.assert_allclose(got.M, M, atol=1e-4 * np.abs(M).max())
    np.testing.assert_allclose(got.c, c, atol=1e-4 * max(1.0, np.abs(c).max()))


def _brute_force(
    x: np.ndarray, a: np.ndarray, M0: np.ndarray, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """argmin ‖(a − ā) − (x − x̄)M‖²/n + λ‖M − M0‖² and c = ā − Mᵀx̄, by lstsq on the rows,
    λ = ridge·tr(C)/k."""
    x, a = x.astype(np.float64), a.astype(np.float64)
    n, k = x.shape
    xc, ac = (x - x.mean(0)) / np.sqrt(n), (a - a.mean(0)) / np.sqrt(n)
    lam = ridge * np.sum(xc * xc) / k
    rows = np.vstack([xc, np.sqrt(lam) * np.eye(k)])
    targets = np.vstack([ac, np.sqrt(lam) * M0])
    M = np.linalg.lstsq(rows, targets, rcond=None)[0]
    return M, a.mean(0) - M.T @ x.mean(0)


def test_the_output_deviation_falls_where_upstream_errors_reach_the_last_tap(save_tmp):
    # the output is an orthogonal map of the last tap: its error is the tap's, whose removed
    # channels' part the refit minimises over every map of the pruned activations (the one-shot
    # map among them); the kept channels pass through in both
    model = _mlp((12, 32, 32, 32, 32), rotate=True)
    path, fit = save_tmp(model), _inputs(512, 12, 0)
    options = {"method": "id", "ratio": 0.5, "round_to": 1, "data": fit, "recalibrate": False,
               "verify": False}  # fmt: skip
    one_shot = onnxprune.prune(path, **options, sequential=False)
    result = onnxprune.prune(path, **options, sequential=True)
    before, after = (_relative(model, r.model, fit) for r in (one_shot, result))
    assert after <= before * (1 + 1e-4)
    held_out = _inputs(512, 12, 7)
    before, after = (_relative(model, r.model, held_out) for r in (one_shot, result))
    assert after < 0.99 * before, (before, after)


def test_mean_shift_compensation_refits_only_the_intercept(save_tmp):
    path = save_tmp(graphs.conv_chain())
    data = graphs.random_input(onnx.load(path), 64)
    options = {"method": "magnitude", "compensate": "bias", "ratio": 0.5, "round_to": 1}
    one_shot = onnxprune.prune(path, data=data, sequential=False, **options)
    result = onnxprune.prune(path, data=data, sequential=True, **options)
    first, second = (result.plans[name] for name in ("c1", "c2"))
    M = second.corrections["r2_out"].M
    np.testing.assert_array_equal(M, selection_map(6, second.keep))
    old = one_shot.plans["c2"].corrections["r2_out"].c
    assert not np.allclose(second.corrections["r2_out"].c, old)
    np.testing.assert_allclose(first.corrections["r1_out"].c,
                               one_shot.plans["c1"].corrections["r1_out"].c, atol=1e-5)  # fmt: skip


def test_a_map_folded_into_a_recurrence_stays_and_the_others_are_refit(save_tmp):
    path = save_tmp(recurrent_model("LSTM"))
    options = {"method": "id", "ratio": 1 / 3, "round_to": 1, "data": {"x": _x()}}
    one_shot = onnxprune.prune(path, **options, sequential=False)
    result = onnxprune.prune(path, sequential=True, **options)
    assert any("read by a recurrence keep the method's map" in n for n in result.report.notes)
    before, after = one_shot.plans["rnn"].corrections, result.plans["rnn"].corrections
    np.testing.assert_array_equal(after["rnn_out"].M, before["rnn_out"].M)  # the recurrence's
    assert not np.allclose(after["squeeze_out"].M, before["squeeze_out"].M)  # the Linear's
    assert "seq" in result.plans["feat"].info
    still = onnxprune.prune(path, sequential=True, **{**options, "ratio": 0.0})
    assert_outputs_close(path, still.model, {"x": _x(8, 4)}, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "magnitude"}, "folds none"),
        ({"method": "cob"}, "rotated basis"),
        ({"method": "magnitude", "granularity": "weight", "sparsity": 0.5}, "granularity"),
    ],
)
def test_methods_without_a_correction_are_refused(options, message):
    with pytest.raises(UsageError, match=message):
        PruneConfig(sequential=True, **options)


def test_a_segment_by_need_runs_only_what_its_end_needs_and_hands_on_the_rest():
    model = graphs.residual_block()
    first = segment_to(model, "r2_out", set())
    names = [model.graph.node[i].name for i in first.nodes]
    assert names == ["c1", "r1", "c2", "r2"] and first.inputs == ("x",)
    assert first.outputs == ("r2_out", "r1_out")  # r1 is read by the residual Add later
    second = segment_to(model, "r3_out", set(names))
    assert [model.graph.node[i].name for i in second.nodes] == ["c3", "add", "r3"]
    assert set(second.inputs) == {"r1_out", "r2_out"}
    assert segment_to(model, "r1_out", set(names)) is None


def test_id_refits_sequentially_by_default_and_the_others_do_not():
    assert PruneConfig(method="id").sequential is True
    assert PruneConfig(method="id", sequential=False).sequential is False
    assert PruneConfig(method="magnitude", compensate="lsq").sequential is False


def test_before_a_fine_tune_id_fits_one_shot_unless_asked():
    assert PruneConfig(method="id", finetune_steps=10).sequential is False
    assert PruneConfig(method="id", finetune_steps=10, sequential=True).sequential is True
    assert PruneConfig(method="id", finetune_steps=10).recalibrate is True


@pytest.mark.parametrize("build, options", SMALL_GRAPHS)
def test_refolding_only_the_readers_gives_the_whole_rewrites_model(
    build, options, save_tmp, monkeypatch
):
    """After each tap the layers reading it are refolded in place (graph/refold.py); the
    refit and the pruned model are those of rewriting the whole graph after every tap."""
    path = save_tmp(build())
    model = onnx.load(path)
    options = {"method": "id", "ratio": 0.5, "round_to": 1, "data": graphs.random_input(model, 64),
               "sequential": True, **options}  # fmt: skip
    applied = []

    def spy(*args, **kwargs):
        applied.append(refold(*args, **kwargs))
        return applied[-1]

    monkeypatch.setattr(onnxprune.sequential, "refold", spy)
    cheap = onnxprune.prune(path, **options)
    monkeypatch.setattr(onnxprune.sequential, "refold", lambda *args, **kwargs: False)
    whole = onnxprune.prune(path, **options)
    assert all(applied), applied
    for name, plan in whole.plans.items():
        for key, correction in plan.corrections.items():
            got = cheap.plans[name].corrections[key]
            scale = max(1.0, float(np.abs(correction.M).max()))
            np.testing.assert_allclose(got.M, correction.M, atol=1e-6 * scale)
    assert_outputs_close(whole.model, cheap.model, graphs.random_input(model, 8, seed=1))


@pytest.mark.parametrize(
    "build",
    [graphs.conv_chain, graphs.concat, graphs.se_block, graphs.matmul_chain, graphs.flatten_gemm],
)
def test_refold_writes_the_constants_a_whole_rewrite_gives(build):
    """Changing one tap's correction and refolding its readers into the rewritten model gives
    the export of the whole rewrite with the new correction, constant by constant."""
    model = build()
    result = onnxprune.prune(model, method="id", ratio=0.5, round_to=1, verify=False,
                             data=graphs.random_input(model, 64), sequential=False)  # fmt: skip
    graph = normalize(model)
    groups = find_groups(graph)
    rewritten = export(rewrite(graph, groups, result.plans))
    rng, plans = np.random.default_rng(0), dict(result.plans)
    for name in result.plans:
        for key, old in result.plans[name].corrections.items():
            c = None if old.c is None else rng.standard_normal(np.shape(old.c))
            new = Correction(rng.standard_normal(np.shape(old.M)), c)
            plan = plans[name]
            plans[name] = replace(plan, corrections={**plan.corrections, key: new})
            assert refold(rewritten, graph, groups, plans, {key})
            got, expected = _constants(rewritten), _constants(export(rewrite(graph, groups, plans)))
            assert got.keys() == expected.keys()
            for place, value in expected.items():
                np.testing.assert_array_equal(got[place], value)


def _constants(model: onnx.ModelProto) -> dict[tuple[str, int], np.ndarray]:
    """Every initializer a node reads, by node name and input position."""
    held = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        (node.name, i): held[name]
        for node in model.graph.node
        for i, name in enumerate(node.input)
        if name in held
    }


@pytest.mark.parametrize("samples_per_run", [1, 3])
def test_a_sites_fold_sums_equal_the_sums_of_its_samples_rows(samples_per_run):
    """Rows wait per fold until a quarter of the width has come; the sums of each fold are then
    those of its samples' rows (sample i in fold i mod 2), whatever the runs' sizes; a fold no
    sample reached has zero sums."""
    from onnxprune.graph.groups import Tap
    from onnxprune.sequential import Site

    rng = np.random.default_rng(0)
    k, m, positions, total = 3, 16, 1, 9  # 1 row per sample: fewer than m // 4 per run
    x, a = rng.normal(size=(total, positions, k)), rng.normal(size=(total, positions, m))
    site = Site("g", "t", Tap("t", 1, 0), m, np.arange(k), Correction(np.zeros((k, m)), None))
    for start in range(0, total, samples_per_run):
        part = slice(start, start + samples_per_run)
        count = len(x[part])
        site.add(x[part].reshape(-1, k), a[part].reshape(-1, m), count)
    site.flush()
    for fold, sums in enumerate(site.folds):
        xs, as_ = x[fold::2].reshape(-1, k), a[fold::2].reshape(-1, m)
        expected = {"n": len(xs), "sx": xs.sum(0), "sa": as_.sum(0), "xx": xs.T @ xs,
                    "xa": xs.T @ as_, "AA": as_.T @ as_}  # fmt: skip
        assert sums.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_allclose(sums[name], value, rtol=1e-12, atol=1e-12 * total * m)
    lone = Site("g", "t", Tap("t", 1, 0), m, np.arange(k), Correction(np.zeros((k, m)), None))
    lone.add(x[0].reshape(-1, k), a[0].reshape(-1, m), 1)
    lone.flush()
    assert lone.folds[1]["n"] == 0 and not lone.folds[1]["AA"].any()
    assert lone.folds[1]["xa"].shape == (k, m)


def chooser_model() -> onnx.ModelProto:
    """Rows of x chosen by a score the pruned group g0 computes (NonZero(g3(relu(g0 x)) > 0)),
    then g1 → relu → g2 on the chosen rows: as a detector's region features follow proposals."""
    b = Builder(8)
    axis1, axis0 = b.const("ax1", np.array([1], np.int64)), b.const("ax0", np.array([0], np.int64))
    score = b.node(
        "Squeeze", "score", [b.gemm("g3", b.relu("r0", b.gemm("g0", "x", 8, 6)), 6, 1), axis1]
    )
    chosen = b.node(
        "NonZero", "nz", [b.node("Greater", "pos", [score, b.const("t", np.float32(0))])]
    )
    rows = b.node("Gather", "pick", ["x", b.node("Squeeze", "flat", [chosen, axis0])], axis=0)
    y = b.gemm("g2", b.relu("r1", b.gemm("g1", rows, 8, 6)), 6, 4)
    model = b.model([], shape=("N", 8))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, ["K", 4])
    )
    return model


def test_taps_on_rows_the_data_chooses_keep_the_method_map():
    """Pruning g0 moves the score, so the two models choose other rows of x (the refit paired
    them row by row and failed on unequal counts); r1's map stays the one-shot fit."""
    from onnxprune.sequential import chosen_rows

    model = chooser_model()
    assert {"r1_out", "g2_out"} <= chosen_rows(model) and "r0_out" not in chosen_rows(model)
    data = {"x": np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)}
    options = {"method": "id", "ratio": 0.5, "data": data, "round_to": 1, "recalibrate": False}
    refit = onnxprune.prune(model, sequential=True, **options)
    one_shot = onnxprune.prune(model, sequential=False, **options)
    (note,) = [n for n in refit.report.notes if "rows the data chooses" in n]
    assert "'r1_out'" in note
    kept, fitted = (r.plans["g1"].corrections["r1_out"] for r in (refit, one_shot))
    np.testing.assert_array_equal(kept.M, fitted.M)
    refits = [n for n in refit.report.notes if "refit on the pruned model's activations" in n]
    assert "at 1 taps" in refits[0]  # r0, whose rows are the samples', still is
