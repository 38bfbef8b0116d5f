"""Channel rules for real architectures (the op handlers, onnxprune/ops), each on a minimal graph.

Every rule is checked the same way: ratio 0 reproduces the original, and a pruned model runs in
ONNX Runtime and equals a numpy reference of what the pruning should do (the original with the
removed channels' readers zeroed, or a brute-force recomputation), with the rewritten constants
(group, split sizes, slice bounds, shapes) asserted where they change.
"""

from __future__ import annotations

import json

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close
from test_rewrite import zero_removed_inputs

import onnxprune
from onnxprune.budget import cost_of
from onnxprune.cli import main
from onnxprune.compare import allocate, measure_sensitivity
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import export, normalize
from onnxprune.measure.cost import count
from onnxprune.options import CHANNEL_METHODS


def _groups(model: onnx.ModelProto) -> dict:
    return {g.name: g for g in analyze(normalize(model))}


def _initializer(model: onnx.ModelProto, node: str, index: int) -> np.ndarray:
    """The constant input `index` of node `node` in `model`."""
    name = next(n for n in model.graph.node if n.name == node).input[index]
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _attr(model: onnx.ModelProto, node: str, attr: str) -> object:
    proto = next(n for n in model.graph.node if n.name == node)
    return onnx.helper.get_attribute_value(next(a for a in proto.attribute if a.name == attr))


def _prune_exact(model: onnx.ModelProto, ratio: float = 0.5, **options: object):
    """Prune with `ratio`; the result must equal the original with removed readers zeroed."""
    result = onnxprune.prune(model, ratio=ratio, round_to=1, prune_residual=True, **options)
    reference = zero_removed_inputs(normalize(model), result.groups, result.plans)
    feeds = graphs.random_input(model, 8)  # a fixed batch stays fixed
    assert_outputs_close(reference, result.model, feeds, atol=1e-5)
    return result


# --- grouped convolutions outside any pruned group -----------------------------------------------


def resnext_block(duplicates: bool = False) -> onnx.ModelProto:
    """c0(8) → relu → c1 (1×1, 8) → relu → g (3×3, group 2) → relu → c3 (1×1, 8) → relu →
    c4(4) → y: a ResNeXt bottleneck. With `duplicates`, c1's channels 1 and 6 repeat 0 and 5,
    one inside each conv group of g."""
    b = graphs.Builder(40)
    w1 = (0.5 * b.rng.standard_normal((8, 8, 1, 1))).astype(np.float32)
    b1 = (0.5 * b.rng.standard_normal(8)).astype(np.float32)
    if duplicates:
        for p in (w1, b1):
            p[1], p[6] = p[0], p[5]
    h = b.relu("r0", b.conv("c0", "x", 3, 8))
    h = b.relu("r1", b.conv("c1", h, 8, 8, 1, weight=w1, b=b1))
    h = b.relu("rg", b.conv("g", h, 8, 8, group=2))
    h = b.relu("r3", b.conv("c3", h, 8, 8, 1))
    return b.model([b.conv("c4", h, 8, 4)])


def test_grouped_conv_outside_pruned_groups_keeps_group_and_weights():
    model = resnext_block()
    exact = onnxprune.prune(model, ratio=0.0, round_to=1)
    assert_outputs_close(model, exact.model, graphs.random_input(model, 8), atol=1e-5)
    result = _prune_exact(model, exclude=["^c1", "^g"])
    assert set(result.plans) == {"c0", "c3"}
    assert _attr(result.model, "g", "group") == 2
    np.testing.assert_array_equal(_initializer(result.model, "g", 1), _initializer(model, "g", 1))
    assert _initializer(result.model, "c0", 1).shape[0] == 4


def test_grouped_conv_prunes_each_conv_group_alike_and_keeps_group():
    model = resnext_block()
    result = _prune_exact(model)
    assert {"c1[0:4]", "c1[4:8]", "g[0:4]", "g[4:8]"} <= set(result.plans)
    assert _attr(result.model, "g", "group") == 2
    assert _initializer(result.model, "g", 1).shape == (4, 2, 3, 3)  # 2 of 4 in and out
    assert _initializer(result.model, "c1", 1).shape[0] == 4


def test_tied_conv_groups_keep_equal_widths_under_unequal_ratios():
    """The strongest request wins; excluding one conv group leaves all of them alone."""
    model = resnext_block()
    result = onnxprune.prune(model, ratio=0.0, round_to=1, recipe={"g[0:4]": 0.5})
    assert len(result.plans["g[0:4]"].keep) == len(result.plans["g[4:8]"].keep) == 2
    result = onnxprune.prune(model, ratio=0.5, round_to=1, recipe={"c1[4:8]": 0.25})
    assert len(result.plans["c1[0:4]"].keep) == len(result.plans["c1[4:8]"].keep) == 2
    result = onnxprune.prune(model, ratio=0.5, round_to=1, exclude=[r"^g\[4"])
    assert not {"g[0:4]", "g[4:8]"} & set(result.plans) and "c1[0:4]" in result.plans
    assert _initializer(result.model, "g", 1).shape == (8, 2, 3, 3)


def test_cli_analyze_names_the_parts_and_their_ties(save_tmp, capsys):
    assert main(["analyze", str(save_tmp(resnext_block())), "--json", "-"]) == 0
    rows = {g["name"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    assert rows["g[4:8]"]["ties"] == ["g:out"] and rows["g[4:8]"]["producers"] == ["g"]
    assert rows["c1[0:4]"]["ties"] == ["g:in"] and rows["c0"]["ties"] == []


def test_a_mac_target_allocation_keeps_tied_conv_groups_equal():
    model = resnext_block()
    result = onnxprune.prune(
        model, method="id", target_macs=0.5, round_to=1, data=graphs.random_input(model, 64)
    )
    for tie in (("c1[0:4]", "c1[4:8]"), ("g[0:4]", "g[4:8]")):
        assert len({len(result.plans[name].keep) for name in tie}) == 1
    assert _attr(result.model, "g", "group") == 2
    assert result.report.macs[1] <= 0.5 * result.report.macs[0] * 1.01


def test_an_error_bound_holds_in_every_tied_conv_group():
    """Each conv group picks its width for ε; all are then planned at the widest, which still
    meets ε in every one of them."""
    model = resnext_block(duplicates=True)
    result = onnxprune.prune(
        model, method="id", epsilon=0.2, round_to=1, data=graphs.random_input(model, 64)
    )  # alone, c1's conv groups would keep 3 and 2 channels, g's 3 and 4
    for tie in (("c1[0:4]", "c1[4:8]"), ("g[0:4]", "g[4:8]")):
        assert len({len(result.plans[name].keep) for name in tie}) == 1
        assert all(result.plans[name].info["err"] <= 0.2 for name in tie)
    assert _attr(result.model, "g", "group") == 2


def test_sensitivity_recipe_is_exact_with_tied_conv_groups(save_tmp, tmp_path):
    """A sensitivity probe of one conv group prunes all of them, and the allocation's MACs
    count them all: pruning with its recipe lands exactly on the MACs it reports."""
    path = save_tmp(resnext_block())
    evaluation = tmp_path / "eval.npz"
    np.savez(evaluation, x=graphs.random_input(resnext_block(), 16)["x"])
    sens = measure_sensitivity(path, "magnitude", data=None, evaluation=evaluation, round_to=1)
    assert sens.points["g[0:4]"][1].kept == 2  # ratio 0.5 on g[0:4] alone: g[4:8] follows
    allocation = allocate(path, sens, 0.4, round_to=1)  # narrows g's conv groups
    assert allocation.kept["g[0:4]"] == allocation.kept["g[4:8]"] < 4
    pruned = onnxprune.prune(path, ratio=0.0, recipe=allocation.ratios, round_to=1)
    before, after = pruned.report.macs
    assert after / before == pytest.approx(allocation.reached_macs, abs=1e-9)
    assert after / before <= 0.4


def test_id_recovers_a_duplicate_inside_each_conv_group_exactly():
    """Each conv group reads only its own channels, so a channel can only be rebuilt from kept
    channels of its own conv group: the duplicates sit one in each, and ID removes both."""
    model = resnext_block(duplicates=True)
    result = onnxprune.prune(
        model,
        method="id",
        ratio=0.0,
        round_to=1,
        recipe={"c1[0:4]": 0.25, "c1[4:8]": 0.25},
        data=graphs.random_input(model, 64),
    )
    assert set(result.plans["c1[0:4]"].keep.tolist()) in ({0, 2, 3}, {1, 2, 3})
    assert set(result.plans["c1[4:8]"].keep.tolist()) in ({0, 1, 3}, {0, 2, 3})
    assert _attr(result.model, "g", "group") == 2
    assert _initializer(result.model, "g", 1).shape == (8, 3, 3, 3)
    assert_outputs_close(model, result.model, graphs.random_input(model, 8, seed=5), atol=1e-5)


def regnet_block() -> onnx.ModelProto:
    """c1(8) → relu → g (group 2) → relu = t; gate = sigmoid(ce(relu(cr(GAP(t))))) [8];
    c3(t · gate) → y: RegNet-Y's SE behind a grouped conv."""
    b = graphs.Builder(45)
    t = b.relu("rg", b.conv("g", b.relu("r1", b.conv("c1", "x", 3, 8)), 8, 8, group=2))
    gate = b.relu("rr", b.conv("cr", b.node("GlobalAveragePool", "gap", [t]), 8, 2, 1))
    gate = b.node("Sigmoid", "sig", [b.conv("ce", gate, 2, 8, 1)])
    return b.model([b.conv("c3", b.node("Mul", "gate", [t, gate]), 8, 4)])


def test_se_gate_behind_a_grouped_conv_is_cut_into_its_conv_groups():
    model = regnet_block()
    groups = _groups(model)
    for lo, hi in ((0, 4), (4, 8)):
        group = groups[f"g[{lo}:{hi}]"]
        assert group.prunable and group.producers == ("g", "ce")
        assert set(group.consumers) == {"cr", "c3"} and group.ties == ("g:out",)
    exact = onnxprune.prune(model, ratio=0.0, round_to=1, prune_residual=True)
    assert_outputs_close(model, exact.model, graphs.random_input(model, 8), atol=1e-5)
    result = _prune_exact(model)
    assert _attr(result.model, "g", "group") == 2
    assert _initializer(result.model, "g", 1).shape == (4, 2, 3, 3)
    assert _initializer(result.model, "ce", 1).shape[0] == 4


# --- Split on the channel axis (YOLOv8 C2f, CSP) -------------------------------------------------


def c2f_block(form: str = "input", sizes: tuple[int, int] = (4, 4)) -> onnx.ModelProto:
    """c0(8) → relu → c1 (1×1, 8) → relu → Split(sizes) → y0, y1; y1 → b1(4) → relu = m;
    Concat(y0, y1, m) → c2(4) → y. `form`: the sizes as an input (opset 17), the `split`
    attribute (opset 11) or `num_outputs` (opset 18, equal sizes).

    c0's channel 5 is the constant 0.7 (zero filter); c1's channels 2 and 6 duplicate 0 and 4,
    one in each Split output, so ID removes them exactly."""
    b = graphs.Builder(41)
    w0 = (0.5 * b.rng.standard_normal((8, 3, 3, 3))).astype(np.float32)
    b0 = (0.5 * b.rng.standard_normal(8)).astype(np.float32)
    w0[5], b0[5] = 0.0, 0.7
    w1 = (0.5 * b.rng.standard_normal((8, 8, 1, 1))).astype(np.float32)
    b1 = (0.5 * b.rng.standard_normal(8)).astype(np.float32)
    for p in (w1, b1):
        p[2], p[6] = p[0], p[4]
    h = b.relu("r0", b.conv("c0", "x", 3, 8, weight=w0, b=b0))
    h = b.relu("r1", b.conv("c1", h, 8, 8, 1, weight=w1, b=b1))
    opset = {"input": 17, "attribute": 11, "num_outputs": 18}[form]
    if form == "input":
        split_sizes = b.const("split.sizes", np.array(sizes, dtype=np.int64))
        y0 = b.node("Split", "split", [h, split_sizes], outputs=2, axis=1)
    elif form == "attribute":
        y0 = b.node("Split", "split", [h], outputs=2, axis=1, split=list(sizes))
    else:
        y0 = b.node("Split", "split", [h], outputs=2, axis=1, num_outputs=2)
    y1 = "split_out1"
    m = b.relu("rb", b.conv("b1", y1, sizes[1], 4))
    cat = b.node("Concat", "cat", [y0, y1, m], axis=1)
    return b.model([b.conv("c2", cat, 12, 4)], opset=opset)


def _split_sizes(model: onnx.ModelProto) -> list[int]:
    node = next(n for n in model.graph.node if n.op_type == "Split")
    if len(node.input) > 1:
        return _initializer(model, node.name, 1).tolist()
    return list(_attr(model, node.name, "split"))


@pytest.mark.parametrize(
    "form, sizes",
    [("input", (4, 4)), ("input", (3, 5)), ("attribute", (5, 3)), ("num_outputs", (4, 4))],
)
def test_split_cuts_the_producer_into_one_group_per_output(form, sizes):
    model = c2f_block(form, sizes)
    groups = _groups(model)
    first, second = f"c1[0:{sizes[0]}]", f"c1[{sizes[0]}:8]"
    assert {first, second, "b1"} <= {name for name, g in groups.items() if g.prunable}
    assert groups[first].consumers == ("c2",)
    assert set(groups[second].consumers) == {"b1", "c2"}
    in_offsets = {(e.node, e.offset) for e in groups[second].edits if e.role == "in"}
    assert in_offsets == {("b1", 0), ("c2", sizes[0])}
    exact = onnxprune.prune(model, ratio=0.0, round_to=1)
    assert_outputs_close(model, exact.model, graphs.random_input(model, 8), atol=1e-5)
    result = _prune_exact(model)
    kept = [len(result.plans[name].keep) for name in (first, second)]
    assert (
        _split_sizes(result.model)
        == kept
        == [sizes[0] - sizes[0] // 2, 8 - sizes[0] - (8 - sizes[0]) // 2]
    )
    assert _initializer(result.model, "c1", 1).shape[0] == sum(kept)


@pytest.mark.parametrize("recalibrate", [False, True], ids=["plain", "recalibrated"])
def test_id_folds_duplicates_in_each_split_output_and_a_constant_into_the_split_producer(
    recalibrate,
):
    """The constant channel's shift lands in c1's bias, mapped through both of c1's groups.
    Recalibrating an exact prune changes nothing when c1's kept outputs are matched to their
    original channels across both groups."""
    model = c2f_block()
    recipe = {"c0": 1 / 8, "c1[0:4]": 1 / 4, "c1[4:8]": 1 / 4}
    result = onnxprune.prune(
        model,
        method="id",
        compensate="bias",
        ratio=0.0,
        round_to=1,
        recipe=recipe,
        recalibrate=recalibrate,
        data=graphs.random_input(model, 64),
    )
    assert result.plans["c0"].keep.tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert len(result.plans["c1[0:4]"].keep) == len(result.plans["c1[4:8]"].keep) == 3
    assert _split_sizes(result.model) == [3, 3]
    assert_outputs_close(model, result.model, graphs.random_input(model, 8, seed=5), atol=1e-5)


# --- Slice on the channel axis ----------------------------------------------------------------

_END = np.iinfo(np.int64).max


def sliced(steps: int = 1, from_end: bool = False) -> onnx.ModelProto:
    """h = relu(c1(x)) [8]; ya = ca(h[:, 2:6]); yb = cb(h[:, 6:]); yc = cc(h) (three outputs).
    With `from_end`, sa is h[:, -6:-2]."""
    b = graphs.Builder(42)
    h = b.relu("r1", b.conv("c1", "x", 3, 8))
    one = b.const("one", np.array([1], dtype=np.int64))
    bounds = {"sa": (-6, -2, steps) if from_end else (2, 6, steps), "sb": (6, _END, 1)}
    outs = {}
    for name, (start, end, step) in bounds.items():
        s = b.const(f"{name}.s", np.array([start], dtype=np.int64))
        e = b.const(f"{name}.e", np.array([end], dtype=np.int64))
        st = b.const(f"{name}.st", np.array([step], dtype=np.int64))
        outs[name] = b.node("Slice", name, [h, s, e, one, st])
    ya = b.conv("ca", outs["sa"], 4 // steps, 4)
    yb = b.conv("cb", outs["sb"], 2, 4)
    return b.model([ya, yb, b.conv("cc", h, 8, 4)])


@pytest.mark.parametrize("from_end", [False, True], ids=["from-start", "from-end"])
def test_slice_cuts_the_group_at_its_bounds_and_moves_them(from_end):
    model = sliced(from_end=from_end)
    groups = _groups(model)
    assert {"c1[0:2]", "c1[2:6]", "c1[6:8]"} <= {n for n, g in groups.items() if g.prunable}
    assert set(groups["c1[0:2]"].consumers) == {"cc"}  # its channels are sliced away
    assert set(groups["c1[2:6]"].consumers) == {"ca", "cc"}
    assert set(groups["c1[6:8]"].consumers) == {"cb", "cc"}
    exact = onnxprune.prune(model, ratio=0.0, round_to=1)
    assert_outputs_close(model, exact.model, graphs.random_input(model, 8), atol=1e-5)
    result = _prune_exact(model)  # keeps 1, 2, 1 channels of the three parts
    assert [len(result.plans[f"c1[{r}]"].keep) for r in ("0:2", "2:6", "6:8")] == [1, 2, 1]
    # 4 channels left: sa keeps [1, 3), what c1[2:6] kept; from the end that is [-3, -1)
    assert _initializer(result.model, "sa", 1).tolist() == [-3 if from_end else 1]
    assert _initializer(result.model, "sa", 2).tolist() == [-1 if from_end else 3]
    assert _initializer(result.model, "sb", 1).tolist() == [3]
    assert _initializer(result.model, "sb", 2).tolist() == [_END]


def test_slice_with_a_step_on_the_channels_blocks():
    group = _groups(sliced(steps=2))["c1[0:6]"]  # sb still cuts the group at 6
    assert not group.prunable and group.blocker == "sa" and "step" in group.reason


# --- Gather on another axis than the channels ------------------------------------------------


def gathered(on_channels: bool = False) -> onnx.ModelProto:
    """h = c1(x) [N, 8, 8, 8] (linear: the group is rotatable); ya = ca(h[:, :, [0, 2, 5]])
    (1-D indices keep the rank); yb = m(h[:, :, 3, 3]) (scalar indices remove axes after the
    channels) with m a Gemm (8→4). With `on_channels`, ya's Gather picks channels [0, 2, 5]
    instead (axis 1, ca reads 3). yc = cc(h[:, :, 1:3]): a Slice on another axis passes too."""
    b = graphs.Builder(44)
    h = b.conv("c1", "x", 3, 8)
    rows = b.const("rows", np.array([0, 2, 5], dtype=np.int64))
    picked = b.node("Gather", "ga", [h, rows], axis=1 if on_channels else 2)
    ya = b.conv("ca", picked, 3 if on_channels else 8, 4)
    three = b.const("three", np.array(3, dtype=np.int64))
    row = b.node("Gather", "gb", [h, three], axis=2)
    yb = b.gemm("m", b.node("Gather", "gc", [row, three], axis=-1), 8, 4)
    bounds = [
        b.const(n, np.array([v], dtype=np.int64)) for n, v in (("lo", 1), ("hi", 3), ("ax", 2))
    ]
    yc = b.conv("cc", b.node("Slice", "rows13", [h, *bounds]), 8, 4)
    return b.model([ya, yb, yc])


def test_gather_on_another_axis_passes_the_channels():
    model = gathered()
    group = _groups(model)["c1"]
    assert group.prunable and group.rotatable and set(group.consumers) == {"ca", "m", "cc"}
    feeds = graphs.random_input(model, 8)
    for method in ("magnitude", "cob"):  # cob: a full rotation of the channels through Gather
        exact = onnxprune.prune(
            model, method=method, ratio=0.0, round_to=1, data=graphs.random_input(model, 32, 1)
        )
        assert_outputs_close(model, exact.model, feeds, atol=1e-5)
    assert exact.plans["c1"].info["rotated"] == 1.0  # cob's rotation changed c1's filters
    assert not np.allclose(_initializer(exact.model, "c1", 1), _initializer(model, "c1", 1))
    result = _prune_exact(model)
    assert len(result.plans["c1"].keep) == 4
    assert _initializer(result.model, "ca", 1).shape[1] == 4
    assert _initializer(result.model, "m", 1).shape[1] == 4


def test_gather_on_the_channel_axis_blocks():
    group = _groups(gathered(on_channels=True))["c1"]
    assert not group.prunable and group.blocker == "ga" and "channel axis" in group.reason


# --- Transpose (ConvNeXt's channels-last block) and LayerNormalization -------------------------


def channels_last(norm: bool) -> onnx.ModelProto:
    """c0(8) → Transpose(0,2,3,1) [→ LayerNorm] → m1 (8→16) + b → sigmoid → m2 (16→8) + b →
    Transpose(0,3,1,2) → c2(4) → y: ConvNeXt's block with its MLP on the last axis."""
    b = graphs.Builder(43)
    h = b.node("Transpose", "to_last", [b.conv("c0", "x", 3, 8)], perm=[0, 2, 3, 1])
    if norm:
        h = b.node("LayerNormalization", "ln", [h, b.rand("ln.g", 8), b.rand("ln.b", 8)], axis=-1)
    h = b.node(
        "Add", "m1_bias", [b.node("MatMul", "m1", [h, b.rand("m1.w", 8, 16)]), b.rand("m1.b", 16)]
    )
    h = b.node("Sigmoid", "act", [h])
    h = b.node(
        "Add", "m2_bias", [b.node("MatMul", "m2", [h, b.rand("m2.w", 16, 8)]), b.rand("m2.b", 8)]
    )
    h = b.node("Transpose", "to_first", [h], perm=[0, 3, 1, 2])
    return b.model([b.conv("c2", h, 8, 4)])


def test_transpose_moves_the_channel_axis():
    model = channels_last(norm=False)
    groups = _groups(model)
    assert all(groups[name].prunable for name in ("c0", "m1", "m2"))
    assert groups["c0"].taps[0].axis == 3 and groups["m2"].consumers == ("c2",)
    exact = onnxprune.prune(model, ratio=0.0, round_to=1)
    assert_outputs_close(model, exact.model, graphs.random_input(model, 8), atol=1e-5)
    result = _prune_exact(model)
    assert _initializer(result.model, "m1", 1).shape == (4, 8)


def test_layernorm_over_the_channels_consumes_them_and_the_mlp_stays_prunable():
    """The norm is read by m1 alone: it consumes c0's channels at its input (rebuilt from the
    kept ones when pruned, graph/channel_norm.py; tests/test_channel_norm.py)."""
    groups = _groups(channels_last(norm=True))
    assert groups["c0"].prunable and groups["c0"].consumers == ("ln",)
    assert [(t.tensor, t.axis) for t in groups["c0"].taps] == [("to_last_out", 3)]
    assert groups["m1"].prunable and groups["m2"].prunable


# --- Resize with explicit sizes -----------------------------------------------------------------


def resized(channel_size: int = 8, axes: bool = False) -> onnx.ModelProto:
    """relu(c1(x)) [2, 8, 4, 4] → Resize to 8×8 by `sizes` → c2(4) → y. With `axes` (opset 18)
    the sizes name only H and W; else they state (2, channel_size, 8, 8)."""
    b = graphs.Builder(44)
    h = b.conv("c1", "x", 3, 8)
    sizes = [8, 8] if axes else [2, channel_size, 8, 8]
    size = b.const("rs.sizes", np.array(sizes, dtype=np.int64))
    extra = {"axes": [2, 3]} if axes else {}
    h = b.node("Resize", "rs", [h, "", "", size], mode="nearest", **extra)
    return b.model([b.conv("c2", h, channel_size, 4)], shape=(2, 3, 4, 4), opset=18 if axes else 13)


@pytest.mark.parametrize("axes", [False, True], ids=["all-sizes", "axes"])
def test_resize_with_sizes_keeps_the_channels_and_rewrites_their_count(axes):
    model = resized(axes=axes)
    assert _groups(model)["c1"].prunable
    fixed = {"data": graphs.random_input(model, 2), "batch_size": 2, "verify_samples": 2}
    exact = onnxprune.prune(model, ratio=0.0, round_to=1, **fixed)
    assert_outputs_close(model, exact.model, graphs.random_input(model, 2), atol=1e-5)
    result = _prune_exact(model, **fixed)
    expected = [8, 8] if axes else [2, 4, 8, 8]
    assert _initializer(result.model, "rs", 3).tolist() == expected


def test_resize_of_the_channel_axis_blocks():
    group = _groups(resized(channel_size=16))["c1"]
    assert not group.prunable and group.blocker == "rs" and "channel axis" in group.reason


def test_resize_to_sizes_read_from_its_own_input_passes_the_channels():
    """Sizes Concat(Shape(h)[:2], ...): the channel entry is h's own count at run time, so the
    Resize outputs the kept channels and nothing needs rewriting."""
    model = graphs.computed_resize()
    group = _groups(model)["c1"]
    assert group.prunable and group.consumers == ("c2",)
    exact = onnxprune.prune(model, ratio=0.0, round_to=1)
    assert_outputs_close(model, exact.model, graphs.random_input(model, 8), atol=1e-5)
    result = _prune_exact(model)
    assert _initializer(result.model, "c2", 1).shape[1] == 4


@pytest.mark.parametrize("channels_from", ["constant", "other"])
def test_resize_sizes_with_the_channel_entry_not_read_from_its_input_block(channels_from):
    group = _groups(graphs.computed_resize(channels_from=channels_from))["c1"]
    assert not group.prunable and group.blocker == "up" and "channel entry" in group.reason


def test_torch_interpolate_to_a_size_prunes_exactly():
    """`F.interpolate(h, size=(12, 12))` as the legacy exporter writes it (LR-ASPP's upsampling)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = torch.relu(self.c1(x))
            return self.c2(nn.functional.interpolate(h, size=(12, 12), mode="bilinear"))

    model = graphs.export_torch(Up(), (1, 3, 8, 8))
    assert any(n.op_type == "Resize" and n.input[3] for n in model.graph.node)
    group = next(g for g in _groups(model).values() if "c1" in g.name)
    assert group.prunable
    assert group.name in _prune_exact(model).plans


def test_mac_cost_counts_every_split_part_of_a_producer():
    """c1's MACs scale with the channels both of its Split parts keep (not the last part's)."""
    model = c2f_block()
    graph = normalize(model)
    groups = analyze(graph)
    cost = cost_of(graph, groups, "macs")
    full = cost({})
    macs = {n.name: n.macs for n in count(export(graph)).per_node}
    widths = {"c1[0:4]": 1, "c1[4:8]": 3}  # c1 keeps 4 of 8 outputs
    # c1 halves; b1 reads 3 of 4; c2 reads 1 + 3 of the 8 split channels (and all of b1's 4)
    expected = full - macs["c1"] / 2 - macs["b1"] / 4 - macs["c2"] * 4 / 12
    assert cost(widths) == pytest.approx(expected, rel=1e-12)


# --- every method on the cut groups ------------------------------------------------------------


@pytest.mark.parametrize(
    "method, build",
    [(m, regnet_block) for m in CHANNEL_METHODS] + [("id", c2f_block), ("biascomp", c2f_block)],
    ids=[f"{m}-grouped-se" for m in CHANNEL_METHODS] + ["id-split", "biascomp-split"],
)
def test_every_method_keeps_cut_groups_exact_at_ratio_zero_and_runs_pruned(method, build):
    """Every method plans cut and tied groups (grouped Conv, SE gate, Split) validly."""
    model = build()
    options = {"method": method, "round_to": 1, "prune_residual": True}
    options["data"] = graphs.random_input(model, 32)
    if method == "biascomp":
        options["jacobian"] = "probe:2"  # the exact Jacobian costs 30 s here
    exact = onnxprune.prune(model, ratio=0.0, **options)
    assert_outputs_close(model, exact.model, graphs.random_input(model, 8, seed=5), atol=1e-5)
    pruned = onnxprune.prune(model, ratio=0.5, **options)
    assert pruned.report.macs[1] < pruned.report.macs[0]
