"""A weight that several nodes share (a detector's head, applied at every pyramid level) is
pruned once: the levels' groups are one group, with one selection and one correction fit on
every level's activations, and its copies stay one initializer with every method."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import Builder, two_level_head
from onnx import helper

import onnxprune
from onnxprune.cli.analyze import format_analysis, to_dict
from onnxprune.graph.segments import order_together

LEVELS = ("1", "2")


def _data(seed: int = 8, n: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)}


def _run(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """The tensors `names` of `model` on `x` (intermediate ones made graph outputs)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(
        helper.make_empty_tensor_value_info(n) for n in names if n not in known
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {"x": x})


def _weights_read(model: onnx.ModelProto, index: int) -> dict[str, str]:
    return {n.name: n.input[index] for n in model.graph.node if len(n.input) > index}


def test_the_levels_of_a_shared_head_are_one_group():
    analysis = onnxprune.analyze(two_level_head())
    groups = {g.name: g for g in analysis.groups}
    head = groups["s1"]
    assert head.producers == ("s1", "s2") and head.copies == 2 and head.prunable
    assert not head.coupled  # not a residual stream: pruned without --prune-residual
    assert head.pooled == (("rs1_out", "rs2_out"),)
    # c1's channels reach s at both levels (p1 and its pooled copy): one correction for both
    assert groups["c1"].copies == 1 and groups["c1"].pooled == (("r1_out", "pool_out"),)
    assert "s2" not in groups
    assert analysis.shared == ()  # nothing that pruning would cut apart
    line = next(x for x in format_analysis(analysis).splitlines() if x.startswith("s1 "))
    assert "2 readers of a shared weight, pruned as one" in line
    assert to_dict(analysis)["groups"][1]["pooled_taps"] == [["rs1_out", "rs2_out"]]


@pytest.mark.parametrize(
    ("method", "options"),
    [("id", {}), ("magnitude", {}), ("taylor", {}), ("cob", {}), ("fpgm", {}), ("ippro", {}),
     ("biascomp", {}), ("biascomp", {"joint": True})],
)  # fmt: skip
def test_every_method_keeps_each_shared_weight_one(method, options):
    """With each method's defaults (id: intercept, sequential refit, recalibration; biascomp:
    one shift per shared consumer, from the Jacobians of both outputs) s, t and their biases
    are read as one initializer by both levels, so the parameters fall."""
    model = two_level_head()
    result = onnxprune.prune(model, method=method, ratio=0.5, data=_data(), round_to=1, **options)
    for index in (1, 2):
        read = _weights_read(result.model, index)
        assert read["s1"] == read["s2"] and read["t1"] == read["t2"]
    # c1: 4 of 8 filters (3·9 weights and a bias each); s: 4 of 8 rows and input columns and
    # 4 biases; t: 4 input columns, each once
    removed = 4 * 28 + (8 * 8 - 4 * 4) * 9 + 4 + 4 * 4
    params = sum(int(np.prod(t.dims)) for t in result.model.graph.initializer)
    assert params == sum(int(np.prod(t.dims)) for t in model.graph.initializer) - removed
    assert not [n for n in result.report.notes if "separate copies" in n]


def test_the_pooled_map_is_least_squares_over_every_level():
    """ID's one-shot map at the head's taps equals a least-squares fit with intercept of all of
    the head's channels from its kept ones, on the rows of both levels stacked."""
    model, data = two_level_head(), _data()
    options = {"recalibrate": False, "sequential": False, "verify_data": _data(9, 8)}
    result = onnxprune.prune(model, method="id", ratio=0.5, data=data, round_to=1, **options)
    plan = result.plans["s1"]
    one, two = (plan.corrections[f"rs{level}_out"] for level in LEVELS)
    np.testing.assert_array_equal(one.M, two.M)
    rows = np.concatenate(
        [
            a.transpose(0, 2, 3, 1).reshape(-1, 8)
            for a in _run(model, data["x"], ["rs1_out", "rs2_out"])
        ]
    ).astype(np.float64)
    design = np.column_stack([rows[:, plan.keep], np.ones(len(rows))])
    solution, *_ = np.linalg.lstsq(design, rows, rcond=None)
    scale = np.abs(solution).max()
    np.testing.assert_allclose(one.M, solution[:-1], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(one.c, solution[-1], rtol=0, atol=1e-6 * scale)


def test_duplicated_channels_are_removed_exactly_at_every_level():
    """s's filters 4–7 copy 0–3: ID removes the copies at both levels, folds them into the one
    t, and the outputs do not change."""
    model, data = two_level_head(duplicated=True), _data()
    result = onnxprune.prune(model, method="id", ratio=0.0, recipe={"s1": 0.5}, data=data,
                             round_to=1)  # fmt: skip
    assert sorted(result.plans["s1"].keep.tolist()) == [0, 1, 2, 3]
    read = _weights_read(result.model, 1)
    assert read["t1"] == read["t2"]
    x = _data(10, 8)["x"]
    for want, got in zip(_run(model, x, ["t1_out", "t2_out"]),
                         _run(result.model, x, ["t1_out", "t2_out"]), strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_recalibration_restores_the_moments_pooled_over_the_levels():
    """The copies of t get one affine: over both levels together t's outputs have the original's
    mean and variance per channel on the samples recalibrated on."""
    model, data = two_level_head(), _data()
    result = onnxprune.prune(model, method="magnitude", ratio=0.5, data=data, round_to=1,
                             recalibrate=True, verify_data=_data(9, 8))  # fmt: skip
    read = _weights_read(result.model, 1)
    assert read["t1"] == read["t2"] and read["s1"] == read["s2"]

    def pooled(m: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
        outs = _run(m, data["x"], ["t1_out", "t2_out"])
        rows = np.concatenate([o.transpose(0, 2, 3, 1).reshape(-1, 4) for o in outs])
        return rows.mean(0), rows.var(0)

    (mean, var), (got_mean, got_var) = pooled(model), pooled(result.model)
    np.testing.assert_allclose(got_mean, mean, rtol=0, atol=1e-4 * np.sqrt(var.max()))
    np.testing.assert_allclose(got_var, var, rtol=1e-4)


def test_a_layer_between_the_copies_leaves_their_values_held():
    """u, recalibrated between the two levels' t, does not drop level 1's t before level 2's
    is measured; both levels still read one t."""
    model = two_level_head(side=True)
    result = onnxprune.prune(model, method="id", ratio=0.5, data=_data(), round_to=1)
    read = _weights_read(result.model, 1)
    assert read["t1"] == read["t2"] and read["s1"] == read["s2"]
    assert "recalibrated the output mean and variance of 5 layers" in result.report.notes
    (refit,) = [n for n in result.report.notes if n.startswith("sequential fit")]
    assert " at 4 taps " in refit  # both copies of c1's and of s's taps


def test_levels_that_cannot_be_joined_are_pruned_apart_and_named():
    """Level 2's head reaches a graph output, so its group cannot be pruned: level 1's is
    pruned alone, s becomes two copies, and analyze and the report name it."""
    model = two_level_head(exposed=True)
    analysis = onnxprune.analyze(model)
    groups = {g.name: g for g in analysis.groups}
    assert groups["s1"].prunable and groups["s1"].copies == 1
    assert not groups["s2"].prunable
    assert analysis.shared == (("s.w", 2), ("t.w", 2))  # s's rows and t's columns, level 1 only
    result = onnxprune.prune(model, method="magnitude", ratio=0.5, data=_data(), round_to=1)
    read = _weights_read(result.model, 1)
    assert read["s1"] != read["s2"]
    (note,) = [n for n in result.report.notes if "separate copies" in n]
    assert note.startswith("2 weight(s)") and "e.g. 's.w', read by 2 nodes" in note


def test_a_block_shared_across_depth_is_joined_and_recalibrated_apart():
    """One MLP block (w1, w2) applied twice in a row (ALBERT-style): its hidden groups join,
    and w1 stays one initializer; the second application's input is computed from the first,
    so their recalibration cannot be pooled in one pass: w2's copies are adjusted apart, and
    the report names them."""
    b = Builder(3)
    w1, b1, w2, b2 = b.rand("w1", 8, 16), b.rand("b1", 16), b.rand("w2", 16, 8), b.rand("b2", 8)
    h = "x"
    for layer in ("1", "2"):
        a = b.relu(f"r{layer}", b.node("Gemm", f"f{layer}", [h, w1, b1]))
        h = b.node("Add", f"add{layer}", [h, b.node("Gemm", f"g{layer}", [a, w2, b2])])
    model = b.model([h], shape=("N", 8))
    (hidden,) = [g for g in onnxprune.analyze(model).groups if g.prunable and not g.coupled]
    assert hidden.copies == 2 and hidden.pooled == (("r1_out", "r2_out"),)
    x = np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32)
    result = onnxprune.prune(model, method="id", ratio=0.5, data={"x": x}, round_to=1)
    read = _weights_read(result.model, 1)
    assert read["f1"] == read["f2"] and read["g1"] != read["g2"]
    (note,) = [n for n in result.report.notes if "separate copies" in n]
    assert "e.g. 'w2', read by 2 nodes" in note
    magnitude = onnxprune.prune(model, method="magnitude", ratio=0.5, data={"x": x}, round_to=1)
    read = _weights_read(magnitude.model, 1)
    assert read["f1"] == read["f2"] and read["g1"] == read["g2"]


def test_order_together_moves_the_copies_before_their_readers():
    """a and b are copies: the reader of a, listed before b, moves after it; copies computed
    one from the other cannot be ordered so, and the model stays as it was."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="A"),
        helper.make_node("Neg", ["a"], ["ra"], name="RA"),
        helper.make_node("Abs", ["x"], ["b"], name="B"),
        helper.make_node("Add", ["ra", "b"], ["y"], name="Y"),
    ]
    info = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    model = helper.make_model(helper.make_graph(nodes, "g", [info], [out]))
    assert order_together(model, [("a", "b")])
    assert [n.name for n in model.graph.node] == ["A", "B", "RA", "Y"]
    assert not order_together(model, [("a", "ra")])
    assert [n.name for n in model.graph.node] == ["A", "B", "RA", "Y"]
