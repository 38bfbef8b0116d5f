"""The analyzer, one tiny topology at a time: which channel groups it finds and why any is blocked.

Each test names the producers, consumers, taps and per-channel edits the design (DESIGN.md §2)
says a topology has, so a wrong walk (a missed consumer, a wrong Concat offset, coupling a
spatial map to the trunk) fails here rather than as a wrong number after rewriting.
"""

from __future__ import annotations

import json

import graphs
import onnx
import pytest
from conftest import assert_outputs_close, reference_path
from onnx import numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.graph.analyze import analyze
from onnxprune.graph.groups import ChannelGroup, Tap
from onnxprune.graph.load import load_model, normalize


def groups_of(model) -> dict[str, ChannelGroup]:
    return {g.name: g for g in analyze(normalize(model))}


def edits(group: ChannelGroup, node: str) -> list:
    return [e for e in group.edits if e.node == node]


def test_plain_conv_chain():
    groups = groups_of(graphs.conv_chain())
    assert list(groups) == ["c1", "c2", "c3"]
    c1, c2, c3 = groups.values()
    assert (c1.producers, c1.passthrough, c1.consumers) == (("c1",), ("r1",), ("c2",))
    assert c1.taps == (Tap("r1_out", 1, 0, 1),)
    assert c1.channels == 8 and c1.prunable and not c1.coupled
    assert {(e.node, e.input, e.axis, e.role) for e in c1.edits} == {
        ("c1", 1, 0, "out"),
        ("c1", 2, 0, "out"),
        ("c2", 1, 1, "in"),
    }
    assert (c2.producers, c2.consumers, c2.channels) == (("c2",), ("c3",), 6)
    assert not c3.prunable and "graph output" in c3.reason


def test_residual_add_is_one_coupled_group():
    groups = groups_of(graphs.residual_add())
    assert list(groups) == ["c1", "c3"]
    trunk = groups["c1"]
    assert set(trunk.producers) == {"c1", "c2"}
    assert trunk.coupled and trunk.prunable and not trunk.gated
    assert set(trunk.consumers) == {"c2", "c3"}
    assert "add" in trunk.passthrough
    assert {t.tensor for t in trunk.taps} == {"r1_out", "r2_out"}
    roles = {(e.node, e.role) for e in trunk.edits}
    assert {("c1", "out"), ("c2", "out"), ("c3", "in")} <= roles


def test_residual_conv_that_reads_and_writes_the_trunk_keeps_both_edits():
    trunk = groups_of(graphs.residual_add())["c1"]
    assert {(e.axis, e.role) for e in edits(trunk, "c2") if e.input == 1} == {(0, "out"), (1, "in")}


def test_concat_segments_have_their_offsets():
    groups = groups_of(graphs.concat(c1=4, c2=6))
    a, b = groups["ca"], groups["cb"]
    assert a.consumers == b.consumers == ("c3",)
    assert a.taps == (Tap("cat_out", 1, 0, 1),)
    assert b.taps == (Tap("cat_out", 1, 4, 1),)
    (edit_a,) = edits(a, "c3")
    (edit_b,) = edits(b, "c3")
    assert (edit_a.role, edit_a.axis, edit_a.offset, edit_a.tap) == ("in", 1, 0, "cat_out")
    assert (edit_b.role, edit_b.axis, edit_b.offset, edit_b.tap) == ("in", 1, 4, "cat_out")
    assert "cat" in a.passthrough and "cat" in b.passthrough


@pytest.mark.parametrize(
    "kind, target", [("flatten", None), ("reshape", (0, -1)), ("reshape", (-1, 96))]
)
def test_flatten_and_reshape_to_gemm_spread_each_channel_over_hw(kind, target):
    model = graphs.flatten_gemm(kind, target or (0, -1))
    group = groups_of(model)["c1"]
    assert group.prunable and group.consumers == ("fc",)
    assert group.taps == (Tap("flat_out", 1, 0, 16),)  # H·W = 4·4 features per channel
    (fc,) = edits(group, "fc")
    assert (fc.role, fc.axis, fc.spatial) == ("in", 1, 16)  # transB=1: W is (out, in)
    reshape = edits(group, "flat")
    if target == (-1, 96):  # an explicit feature count must shrink with the channels
        assert [(e.role, e.spatial) for e in reshape] == [("reshape", 16)]
    else:
        assert reshape == []


def test_depthwise_conv_is_passthrough_with_sliced_weights():
    groups = groups_of(graphs.depthwise())
    assert "dw" not in groups  # not a producer of its own
    group = groups["c1"]
    assert group.prunable and group.consumers == ("c2",)
    assert "dw" in group.passthrough
    assert {(e.input, e.role) for e in edits(group, "dw")} == {(1, "chan"), (2, "chan")}


def test_se_block_ties_trunk_and_gate_conv_as_a_gated_group():
    """The SE gate's Mul ties ct and ce into one group; a gate is not a residual stream, so the
    group is `gated`, not `coupled`, and is pruned without --prune-residual."""
    groups = groups_of(graphs.se_block())
    trunk, reduce = groups["ct"], groups["cr"]
    assert set(trunk.producers) == {"ct", "ce"} and trunk.prunable
    assert trunk.gated and not trunk.coupled
    assert set(trunk.consumers) == {"co", "cr"}
    assert "gate" in trunk.passthrough and "gap" in trunk.passthrough
    assert reduce.producers == ("cr",) and reduce.consumers == ("ce",)
    assert reduce.prunable and not reduce.coupled
    assert "ce" not in groups  # merged into the trunk group


def test_se_gated_group_pruned_by_default_equals_zeroed_trunk_channels():
    """Pruning the SE trunk without --prune-residual removes channel c from ct and from the gate
    conv ce together: selection alone (magnitude) equals the original with ct's filter c and
    bias zeroed (t_c = relu(0) = 0 reaches the squeeze and the gated product as nothing)."""
    model = graphs.se_block()
    result = onnxprune.prune(model, method="magnitude", ratio=0.5, round_to=1, verify=False)
    kept = result.plans["ct"].keep
    assert len(kept) == 4
    init = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert {v.shape[0] for k, v in init.items() if k.startswith(("ct", "ce")) and v.ndim} == {4}
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    removed = sorted(set(range(8)) - {int(i) for i in kept})
    for tensor in zeroed.graph.initializer:
        if tensor.name.startswith("ct"):
            value = numpy_helper.to_array(tensor).copy()
            value[removed] = 0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    feeds = graphs.random_input(model, 3)
    assert_outputs_close(zeroed, result.model, feeds)


def test_channels_reaching_a_graph_output_are_unprunable():
    group = groups_of(graphs.reaches_output())["c1"]
    assert not group.prunable
    assert group.reason == "channels reach graph output 'feat_out'"


@pytest.mark.parametrize(
    "op, named",
    [
        ("LpNormalization", "LpNormalization"),
        ("Softmax", "Softmax"),
        ("LRN", "LRN"),
        ("Mystery", "com.example::Mystery"),
    ],
)
def test_unknown_or_channel_mixing_op_blocks_with_op_and_node(op, named):
    group = groups_of(graphs.blocked_by(op))["c1"]
    assert not group.prunable
    assert named in group.reason
    assert group.blocker == "blocker"


def test_grouped_conv_makes_one_tied_group_per_conv_group():
    groups = groups_of(graphs.grouped_conv())
    for name in ("c1[0:4]", "c1[4:8]"):  # what conv group 0 / 1 of g reads
        assert groups[name].prunable and groups[name].consumers == ("g",)
        assert groups[name].ties == ("g:in",)
    assert [e.offset for e in groups["c1[4:8]"].edits if e.role == "in"] == [4]
    for name in ("g[0:4]", "g[4:8]"):  # what conv group 0 / 1 of g writes
        assert groups[name].prunable and groups[name].consumers == ("c2",)
        assert groups[name].ties == ("g:out",)


def test_spatial_attention_map_is_passthrough_not_coupling():
    groups = groups_of(graphs.spatial_attention())
    trunk = groups["ct"]
    assert trunk.producers == ("ct",) and not trunk.coupled and trunk.prunable
    assert "att" in trunk.passthrough
    assert set(trunk.consumers) == {"cm", "co"}
    # the 1-channel map cannot be pruned (nothing else of width 1 meets it)
    assert not groups["cm"].prunable


def test_matmul_with_constant_weight_is_producer_and_consumer():
    groups = groups_of(graphs.matmul_chain())
    group = groups["m1"]
    assert group.prunable and group.consumers == ("m2",) and group.channels == 12
    assert "m1_bias" in group.passthrough  # the bias Add is sliced per feature
    assert {(e.node, e.input, e.role) for e in group.edits} >= {
        ("m1", 1, "out"),
        ("m1_bias", 1, "chan"),
        ("m2", 1, "in"),
    }
    (m2,) = edits(group, "m2")
    assert m2.axis == 0  # MatMul weight is (in, out)


def test_api_analyze_counts_group_macs():
    analysis = onnxprune.analyze(graphs.conv_chain())
    assert [g.name for g in analysis.groups] == ["c1", "c2", "c3"]
    # c1 touches c1 (3→8) and c2 (8→6), both 3×3 'same' convs on 8×8, batch 1
    hw = 8 * 8
    assert analysis.group_macs["c1"] == hw * 9 * (3 * 8 + 8 * 6)
    assert analysis.macs == hw * 9 * (3 * 8 + 8 * 6 + 6 * 4)


def test_cli_analyze_prints_a_table(capsys):
    assert main(["analyze", str(reference_path("resnet"))]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["group", "channels", "MACs"]
    assert "prunable (coupled: --prune-residual)" in out
    assert "unprunable: channels reach graph output 'logits'" in out
    groups = analyze(normalize(onnxprune.graph.load.load_model(reference_path("resnet"))))
    prunable = sum(g.prunable for g in groups)
    assert lines[-1].startswith(f"{prunable} of {len(groups)} groups prunable")
    for group in groups:
        assert any(line.startswith(group.name) for line in lines)


def test_cli_analyze_json_lists_every_group(capsys):
    path = reference_path("resnet", "dynamo.onnx")
    assert main(["analyze", str(path), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = analyze(normalize(onnxprune.graph.load.load_model(path)))
    assert [g["name"] for g in data["groups"]] == [g.name for g in expected]
    for row, group in zip(data["groups"], expected, strict=True):
        assert row["channels"] == group.channels
        assert row["prunable"] == group.prunable
        assert row["producers"] == list(group.producers)
        assert row["reason"] == group.reason
    assert data["macs"] > 0 and data["params"] > 0


# --- rotation-invariant ops (TSRA, RMSNorm) -------------------------------------------------------


def test_tsra_vgg_groups_pass_rmsnorm_and_tsra_and_are_rotatable(capsys):
    groups = groups_of(load_model(reference_path("tsra_vgg")))
    conv = groups["features.17"]  # conv → RMSNorm → TSRA → AvgPool → Flatten → Gemm
    assert conv.prunable and conv.rotatable and conv.subspaces == (48,)
    assert conv.invariants == (("rmsnorm", "features.18"), ("tsra", "features.19"))
    assert conv.consumers == ("classifier.1",) and conv.taps[0].spatial == 16
    (split,) = [e for e in conv.edits if e.role == "split"]
    assert (split.node, split.split, split.offset) == ("features.19", 48, 0)
    assert main(["analyze", str(reference_path("tsra_vgg")), "--json", "-"]) == 0
    rows = {g["name"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    assert rows["classifier.1"]["rotatable"] and rows["classifier.1"]["subspaces"] == [64]


def test_relu_vgg_groups_are_prunable_but_not_rotatable(capsys):
    assert main(["analyze", str(reference_path("relu_vgg"))]) == 0
    text = capsys.readouterr().out
    assert text.count("not rotatable: Relu") == 7 and "; rotatable" not in text


def test_conv_mixer_walk_grows_linearly_with_depth(monkeypatch):
    """ConvMixer's long chain of depthwise blocks with residual adds: each block adds the same
    handler look-ups (a walk revisiting earlier blocks would grow with depth squared) and one
    group (its pointwise conv, the next block's depthwise conv and residual add passed through)."""
    import onnxprune.graph.analyze as analyzer

    original, calls = analyzer.handler_for, 0

    def counted(node):
        nonlocal calls
        calls += 1
        return original(node)

    monkeypatch.setattr(analyzer, "handler_for", counted)
    work, found = {}, {}
    for depth in (2, 4, 8, 16):
        calls = 0
        found[depth] = groups_of(graphs.conv_mixer(depth))
        work[depth] = calls
    per_block = (work[4] - work[2]) // 2
    assert per_block > 0
    assert all(work[d] == work[2] + per_block * (d - 2) for d in (4, 8, 16)), work
    for depth, groups in found.items():
        assert list(groups) == ["stem", *(f"pw{i}" for i in range(depth)), "head"]
        assert groups["pw0"].consumers == ("pw1",)
        assert {"dw1", "add1"} <= set(groups["pw0"].passthrough)


def test_a_written_out_tanh_gelu_in_a_gated_ffn_stays_gated():
    """Gemma's GeGLU, `gelu(gate(x), approximate="tanh") * up(x)`: the legacy exporter writes the
    GELU as arithmetic, where the gate's channels meet themselves (x + 0.044715·x³). Only the
    gate·up product joins two producers, so the group is gated (pruned by default), and a
    magnitude prune of it keeps the function of the kept neurons exactly."""
    import torch
    from torch import nn

    class GeGLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.gate, self.up, self.down = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gelu = nn.functional.gelu(self.gate(x), approximate="tanh")
            return self.down(gelu * self.up(x))

    model = graphs.export_torch(GeGLU(), (2, 6))
    assert "Tanh" in {n.op_type for n in model.graph.node}  # written out, not one Gelu op
    ffn = next(g for g in analyze(normalize(model)) if g.channels == 8)
    assert ffn.prunable and ffn.gated and not ffn.coupled, ffn.reason
    result = onnxprune.prune(model, method="magnitude", ratio=0.5, round_to=1, verify=False)
    kept = result.plans[ffn.name].keep
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    removed = sorted(set(range(8)) - {int(i) for i in kept})
    for tensor in zeroed.graph.initializer:  # the up projection's removed rows give 0 · gelu
        if tensor.name.startswith("up."):
            value = numpy_helper.to_array(tensor).copy()
            value[removed] = 0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    feeds = graphs.random_input(model, 3)
    assert_outputs_close(zeroed, result.model, feeds, rtol=1e-5)
