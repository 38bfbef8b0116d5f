"""Channel shuffle (ShuffleNet): channels followed through the permutation, pruned validly.

A shuffle with g = 2 segments of 4 sends channel i·4 + j to position j·2 + i. In
`graphs.shuffle_units`, c0's outputs 0–3 pass Split u1 as `a`, c1 (reading c0's 4–7) writes
segment 1 of shuffle u1; Split u2 cuts u1's output at 4, so each producer is cut in two: c0[0:2]
lands at positions 0, 2 of u1's output, stays in `a`, and after shuffle u2 at 0, 4; c1[0:2] at
1, 3, then 2, 6; c0[2:4] at 4, 6, i.e. channels 0, 2 of u2's second half (the depthwise conv's
input); c2 writes segment 1 of u2, at 1, 3, 5, 7.
"""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close, run_model

import onnxprune
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import export, normalize
from onnxprune.graph.rewrite import rewrite
from onnxprune.plan import Plan


def _groups(model: onnx.ModelProto) -> dict:
    return {g.name: g for g in analyze(normalize(model))}


@pytest.mark.parametrize("chunk, batch", [("split", 0), ("slice", 0), ("split", -1)])
def test_groups_are_followed_through_two_nested_shuffles(chunk, batch):
    """Paddle writes the shuffle's batch entry as -1: with every other dim static it can only be
    the input's batch, copied at load as 0."""
    groups = _groups(graphs.shuffle_units(chunk=chunk, batch=batch))
    where = {name: [(t.tensor, t.offset, t.stride) for t in g.taps] for name, g in groups.items()}
    assert where == {
        "c0[0:2]": [("u2.from_groups_out", 0, 4)],
        "c0[2:4]": [("dw_out", 0, 2)],  # the depthwise conv passes them at its input's place
        "c0[4:8]": [("u1.split_out1", 0, 1)],
        "c1[0:2]": [("u2.from_groups_out", 2, 4)],
        "c1[2:4]": [("dw_out", 1, 2)],
        "c2": [("u2.from_groups_out", 1, 2)],
        "c3": [],
    }
    assert all(g.prunable for name, g in groups.items() if name != "c3")


@pytest.mark.parametrize("method", ["id", "magnitude"])
def test_ratio_zero_keeps_the_shuffles_and_the_function(method):
    model = graphs.shuffle_units()
    feeds = graphs.random_input(model, 32)
    exact = onnxprune.prune(model, method=method, ratio=0.0, round_to=1, data=feeds)
    ops = [n.op_type for n in exact.model.graph.node]
    assert ops.count("Transpose") == 2 and "Gather" not in ops
    assert_outputs_close(model, exact.model, graphs.random_input(model, 8, seed=5), atol=1e-6)


@pytest.mark.parametrize("batch", [0, -1])
def test_a_duplicated_channel_behind_two_shuffles_is_reconstructed_exactly(batch):
    """c0's channel 1 equals its channel 0 and reaches c3 every 4 channels behind both shuffles:
    plain ID removes one of the pair and c3 reads the other twice."""
    model = graphs.shuffle_units(batch=batch)
    feeds = graphs.random_input(model, 64)
    pruned = onnxprune.prune(
        model, method="id", ratio=0.5, round_to=1, data=feeds, compensate="none",
        recalibrate=False, exclude=(r"^c[123]", r"^c0\[[24]"),
    )  # fmt: skip
    kept = {row.name: row.kept for row in pruned.report.groups}
    assert kept["c0[0:2]"] == 1 and kept["c0[2:4]"] == 2
    assert pruned.report.macs[1] < pruned.report.macs[0]
    assert_outputs_close(model, pruned.model, graphs.random_input(model, 8, seed=5), atol=1e-5)


@pytest.mark.parametrize("chunk", ["split", "slice"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_shuffles_equal_the_original_with_the_removed_channels_zeroed(seed, chunk):
    """Brute force: random kept channels in every group (the segments of a shuffle lose
    different numbers of channels); the pruned model computes what the original computes when
    the removed channels are 0 at their producers (ReLU, the bias-free depthwise conv, Split or
    Slice, Concat and the shuffles keep a 0 channel 0)."""
    model = graphs.shuffle_units(chunk=chunk)
    graph = normalize(model)
    groups = [g for g in analyze(graph) if g.prunable]
    rng = np.random.default_rng(seed)
    plans = {
        g.name: Plan(keep=np.sort(rng.choice(g.channels, rng.integers(1, g.channels + 1), False)))
        for g in groups
    }
    pruned = export(rewrite(graph, tuple(groups), plans))
    onnx.checker.check_model(pruned, full_check=True)
    zeroed = _zero_at_producers(model, groups, plans)
    feeds = graphs.random_input(model, 8, seed=5)
    assert_outputs_close(zeroed, pruned, feeds, atol=1e-6)
    removed = sum(g.channels - len(plans[g.name].keep) for g in groups)
    assert removed == 0 or "Gather" in [n.op_type for n in pruned.graph.node]


def _zero_at_producers(model: onnx.ModelProto, groups, plans) -> onnx.ModelProto:
    """`model` with the weight rows and bias of every removed channel of its producer set to 0
    (a group `p[lo:hi]` owns rows lo..hi-1 of p)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    for group in groups:
        node, _, rows = group.name.partition("[")
        lo = int(rows.split(":")[0]) if rows else 0
        removed = np.setdiff1d(np.arange(group.channels), plans[group.name].keep) + lo
        for name in (f"{node}.w", f"{node}.b"):
            value = onnx.numpy_helper.to_array(inits[name]).copy()
            value[removed] = 0
            inits[name].CopyFrom(onnx.numpy_helper.from_array(value, name))
    return model


def test_a_shuffle_pruned_to_unequal_segments_runs_as_a_gather():
    """c1 keeps 1 of 2 and 2 of 2 channels where c0 keeps all: the segments of shuffle u1 hold
    4 and 3 channels, which no Reshape to (N, 2, C/2, H, W) can hold; the Gather of the 7
    survivors can."""
    model = graphs.shuffle_units()
    graph = normalize(model)
    groups = tuple(g for g in analyze(graph) if g.prunable)
    pruned = export(rewrite(graph, groups, {"c1[0:2]": Plan(keep=np.array([1]))}))
    gathers = {n.name: n for n in pruned.graph.node if n.op_type == "Gather"}
    indices = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert len(gathers) == 2  # u1's shuffle, and u2's (c1[0:2] passes both)
    # u1 read positions 0 4 1 5 2 6 3 7; position 4 (c1's channel 0) is gone, 5–7 move down
    survivors = indices[gathers["u1.from_groups__gather"].input[1]]
    assert survivors.tolist() == [0, 1, 4, 2, 5, 3, 6]
    out = run_model(pruned, graphs.random_input(model, 2))
    assert next(iter(out.values())).shape == (2, 4, 8, 8)


@pytest.mark.parametrize(
    ("perm", "reason"),
    [((0, 1, 2, 4, 3), "does not swap the two parts"), ((0, 2, 1, 3, 4), None)],
)
def test_a_reshape_that_splits_the_channels_without_a_swap_is_refused(perm, reason):
    """Transposing H and W after splitting the channels is no channel shuffle: refused."""
    group = _groups(graphs.shuffle_units(perm))["c1[0:2]" if reason is None else "c1"]
    if reason is None:
        assert group.prunable
    else:
        assert not group.prunable and reason in group.reason
        assert group.blocker == "u1.to_groups"


def test_shuffled_channels_reaching_an_op_without_a_shuffled_rule_are_refused():
    """An Add reading the shuffled channels: its rule knows contiguous channels only."""
    b = graphs.Builder(48)
    h = b.relu("r0", b.conv("c0", "x", 3, 8))
    shuffled = graphs._shuffle(b, "u1", h, (0, 2, 1, 3, 4))
    h = b.node("Add", "add", [shuffled, b.rand("shift", 1, 8, 1, 1)])
    groups = _groups(b.model([b.conv("c1", h, 8, 4)]))
    for group in (groups["c0[0:4]"], groups["c0[4:8]"]):  # cut at the shuffle's segments
        assert not group.prunable and group.blocker == "add"
        assert "channel shuffle reach Add 'add'" in group.reason
