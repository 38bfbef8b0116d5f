"""The rewrite is exact where the algebra says so (DESIGN.md §3, §6).

- keeping every channel with identity M reproduces the original;
- selection (M = selection, c = 0) equals the original with the removed channels' consumer
  weights zeroed, on every reference model;
- channels that are exactly zero, or exact linear combinations of kept ones (folded with the
  ID interpolation matrix, also through Flatten→Gemm and Concat), leave outputs unchanged;
- an orthogonal rotation Q of the producers undone by M = Q at the taps is the identity;
- a constant channel removed with its mean folded into the consumer bias is exact.
"""

from __future__ import annotations

from dataclasses import replace

import graphs
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from conftest import (
    REFERENCE_IDS,
    REFERENCE_MODELS,
    assert_outputs_close,
    max_deviation,
    reference_feeds,
    reference_path,
)
from torch import nn

import onnxprune
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import export, load_model, normalize
from onnxprune.graph.rewrite import rewrite
from onnxprune.methods.magnitude import Random
from onnxprune.ops.conv import is_grouped_conv
from onnxprune.plan import Correction, Plan

# --- identity plans on the reference models ---------------------------------------------------


@pytest.mark.parametrize("name, exporter", REFERENCE_MODELS, ids=REFERENCE_IDS)
@pytest.mark.parametrize("method", ["magnitude", "id"])
def test_ratio_zero_reproduces_reference_model(name, exporter, method):
    path = reference_path(name, exporter)
    calib = reference_feeds(name, 32)
    result = onnxprune.prune(
        path,
        method=method,
        ratio=0.0,
        round_to=1,
        prune_residual=True,
        data=calib,
        batch_size=32,
        verify_samples=8,
    )
    prunable = [g for g in result.groups if g.prunable]
    assert prunable and set(result.plans) == {g.name for g in prunable}
    for group in prunable:
        assert len(result.plans[group.name].keep) == group.channels
    assert_outputs_close(
        onnx.load(str(path)), result.model, reference_feeds(name, 64, "test"), atol=1e-5
    )


def zero_removed_inputs(graph: gs.Graph, groups, plans) -> onnx.ModelProto:
    """The original graph with every consumer weight that reads a removed channel set to 0.

    Where the channels pass a TSRA or RMSNorm (which mix channels through norms), the removed
    channels are also zeroed at their producers, and behind an RMSNorm the consumers read
    √(C_new/C_old) times the input: the mean square over fewer channels is larger by C_old/C_new.
    A grouped Conv reads the channels through the filters of one conv group only. A recurrent
    node's hidden units are also read by its recurrence: R's columns of the removed ones are 0.
    """
    nodes = {node.name: node for node in graph.nodes}
    for group in groups:
        plan = plans.get(group.name)
        if plan is None:
            continue
        removed = sorted(set(range(group.channels)) - set(np.asarray(plan.keep).tolist()))
        scale = 1.0
        if any(kind == "rmsnorm" for kind, _ in group.invariants):
            scale = np.sqrt(len(plan.keep) / group.channels)
        roles = ("in", "out") if group.invariants else ("in",)
        for edit in (e for e in group.edits if e.role in roles):
            node = nodes[edit.node]
            weight = np.array(node.inputs[edit.input].values)
            index = [slice(None)] * weight.ndim
            if edit.role == "in" and is_grouped_conv(node):  # only its conv group's filters
                k, local = divmod(edit.offset, weight.shape[1])
                rows = weight.shape[0] // node.attrs["group"]
                index[0] = slice(k * rows, (k + 1) * rows)
                edit = replace(edit, offset=local)
            if edit.role == "in" and scale != 1.0:
                index[edit.axis] = slice(
                    edit.offset * edit.spatial, (edit.offset + group.channels) * edit.spatial
                )
                weight[tuple(index)] *= scale
            for j in removed:
                start = (edit.offset + j) * edit.spatial
                index[edit.axis] = slice(start, start + edit.spatial)
                weight[tuple(index)] = 0
            node.inputs[edit.input] = gs.Constant(f"{edit.node}.zeroed{edit.input}", weight)
        for edit in (e for e in group.edits if e.role == "hidden"):  # the recurrence reads h
            node = nodes[edit.node]
            recurrence = np.array(node.inputs[2].values)
            recurrence[edit.axis][:, removed] = 0
            node.inputs[2] = gs.Constant(f"{edit.node}.recurrence{edit.axis}", recurrence)
    return export(graph)


@pytest.mark.parametrize("name, exporter", REFERENCE_MODELS, ids=REFERENCE_IDS)
def test_selection_equals_zeroing_the_removed_channels_readers(name, exporter):
    path = reference_path(name, exporter)
    result = onnxprune.prune(path, ratio=0.5, round_to=1, prune_residual=True, verify=False)
    assert any(
        len(p.keep) < g.channels
        for g in result.groups
        if (p := result.plans.get(g.name)) is not None
    )
    graph = normalize(load_model(path))
    reference = zero_removed_inputs(graph, result.groups, result.plans)
    feeds = reference_feeds(name, 32, "test")
    assert_outputs_close(reference, result.model, feeds, atol=1e-4)
    # and the zeroing mattered: the unmodified original differs
    assert max_deviation(onnx.load(str(path)), result.model, feeds) > 1e-2


@pytest.mark.parametrize(
    "build",
    [
        graphs.conv_chain,
        graphs.residual_block,
        graphs.concat,
        graphs.depthwise,
        graphs.se_block,
        graphs.matmul_chain,
        lambda: graphs.flatten_gemm("reshape", (-1, 96)),
    ],
    ids=["chain", "residual", "concat", "depthwise", "se", "matmul", "reshape"],
)
def test_selection_equals_zeroing_on_tiny_topologies(build):
    model = build()
    result = onnxprune.prune(model, ratio=0.5, round_to=1, prune_residual=True)
    assert result.report.params[1] < result.report.params[0]
    reference = zero_removed_inputs(normalize(model), result.groups, result.plans)
    assert_outputs_close(reference, result.model, graphs.random_input(model, 8), atol=1e-5)


def test_single_conv_residual_prunes():
    model = graphs.residual_add()
    result = onnxprune.prune(model, ratio=0.5, round_to=1, prune_residual=True)
    reference = zero_removed_inputs(normalize(model), result.groups, result.plans)
    assert_outputs_close(reference, result.model, graphs.random_input(model), atol=1e-5)


# --- exactly zero channels --------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_zero_channels_are_removed_without_changing_outputs():
    torch.manual_seed(0)
    net = SmallNet()
    zero = {"conv1": [1, 4, 5, 6], "conv2": [0, 2, 3, 7]}
    with torch.no_grad():
        for layer, rows in zero.items():
            getattr(net, layer).weight[rows] = 0
            getattr(net, layer).bias[rows] = 0
    model = graphs.export_torch(net, (2, 1, 8, 8))
    result = onnxprune.prune(model, method="magnitude", ratio=0.5, round_to=1)
    for layer, rows in zero.items():
        plan = result.plans[f"/{layer}/Conv"]
        assert sorted(plan.keep.tolist()) == sorted(set(range(8)) - set(rows))
    assert result.report.params[1] < result.report.params[0] * 0.6
    feeds = {"input": np.random.default_rng(1).standard_normal((16, 1, 8, 8), np.float32)}
    assert_outputs_close(model, result.model, feeds, atol=1e-5)


# --- linearly dependent channels: ID folds them exactly ----------------------------------------


class LinearDependent(nn.Module):
    """conv2's 6 outputs span 3 dims (a duplicate and two linear combinations), read by conv3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        with torch.no_grad():
            for p in (self.conv2.weight, self.conv2.bias):
                p[3] = p[0]
                p[4] = 2 * p[1] - p[2]
                p[5] = 0.5 * p[0] + p[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(torch.flatten(torch.relu(self.conv3(x)), 1))


class DuplicateBeforeFlatten(nn.Module):
    """Channels 3, 4, 5 are 1×, 2× and 0.5× channels 0, 1, 2 (ReLU and MaxPool commute with
    positive scaling), then Flatten → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        with torch.no_grad():
            for p in (self.conv.weight, self.conv.bias):
                p[3], p[4], p[5] = p[0], 2 * p[1], 0.5 * p[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(torch.flatten(x, 1))


class DuplicateInConcat(nn.Module):
    """Two 4-channel branches of rank 2 each, concatenated and read by one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.branch_a = nn.Conv2d(1, 4, 3, padding=1)
        self.branch_b = nn.Conv2d(1, 4, 1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)
        with torch.no_grad():
            for p in (self.branch_a.weight, self.branch_a.bias):
                p[2], p[3] = p[0], 3 * p[1]
            for p in (self.branch_b.weight, self.branch_b.bias):
                p[1], p[3] = p[0], 0.5 * p[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.relu(self.branch_a(x)), torch.relu(self.branch_b(x))], dim=1)
        x = torch.relu(self.head(x)).mean(dim=(2, 3))
        return self.fc(x)


def _calib(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((n, 1, 8, 8), np.float32)}


@pytest.mark.parametrize(
    "module, recipe",
    [
        (LinearDependent, {"/conv2/Conv": 0.5}),
        (DuplicateBeforeFlatten, {"/conv/Conv": 0.5}),
        (DuplicateInConcat, {"/branch_a/Conv": 0.5, "/branch_b/Conv": 0.5}),
    ],
    ids=["linear-combinations", "flatten-gemm", "concat"],
)
def test_id_removes_dependent_channels_exactly_and_magnitude_does_not(module, recipe):
    torch.manual_seed(0)
    model = graphs.export_torch(module(), (2, 1, 8, 8))
    names = {g.name for g in onnxprune.analyze(model).groups}
    assert set(recipe) <= names
    options = {"ratio": 0.0, "round_to": 1, "recipe": recipe, "batch_size": 64}
    by_id = onnxprune.prune(model, method="id", data=_calib(), **options)
    by_magnitude = onnxprune.prune(model, method="magnitude", data=_calib(), **options)
    for group in recipe:
        assert len(by_id.plans[group].keep) == len(by_magnitude.plans[group].keep)
    assert by_id.report.params[1] < by_id.report.params[0]
    test = _calib(32, seed=1)  # not the calibration samples
    assert_outputs_close(model, by_id.model, test, atol=1e-5)
    assert max_deviation(model, by_magnitude.model, test) > 1e-2


@pytest.mark.parametrize(
    "module, recipe",
    [
        (DuplicateBeforeFlatten, {"/conv/Conv": 0.5}),
        (DuplicateInConcat, {"/branch_a/Conv": 0.5, "/branch_b/Conv": 0.5}),
    ],
    ids=["flatten-gemm", "concat"],
)
def test_cob_removes_dependent_channels_it_cannot_rotate_exactly(module, recipe):
    """A ReLU on the way blocks the rotation; cob then plans as id does, so channels that are
    copies or multiples of kept ones are removed with no change to the function."""
    torch.manual_seed(0)
    model = graphs.export_torch(module(), (2, 1, 8, 8))
    options = {"ratio": 0.0, "round_to": 1, "recipe": recipe, "batch_size": 64}
    result = onnxprune.prune(model, method="cob", data=_calib(), **options)
    for group in recipe:
        plan = result.plans[group]
        assert plan.rotation is None and plan.info["rotated"] == 0.0
        assert len(plan.keep) < next(g for g in result.groups if g.name == group).channels
    assert_outputs_close(model, result.model, _calib(32, seed=1), atol=1e-5)


# --- rotations ------------------------------------------------------------------------------------


def _orthogonal(m: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, m)))
    return q * np.sign(np.diag(r))


def _rotation_plans(groups, *, correct: bool) -> dict[str, Plan]:
    plans = {}
    for seed, group in enumerate(g for g in groups if g.prunable):
        q = _orthogonal(group.channels, seed)
        (tap,) = group.taps
        corrections = {tap.tensor: Correction(q)} if correct else {}
        plans[group.name] = Plan(
            keep=np.arange(group.channels), corrections=corrections, rotation=q
        )
    return plans


def test_orthogonal_rotation_undone_at_the_taps_is_identity():
    model = graphs.linear_conv_chain()
    graph = normalize(model)
    groups = analyze(graph)
    plans = _rotation_plans(groups, correct=True)
    assert set(plans) == {"c1", "c2"}
    rotated = export(rewrite(graph, groups, plans))
    feeds = graphs.random_input(model, 8)
    assert_outputs_close(model, rotated, feeds, atol=1e-5, rtol=1e-5)  # outputs reach ~60
    # the producers really were rotated
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {n.name: n.input[1] for n in rotated.graph.node}
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in rotated.graph.initializer}
    assert not np.allclose(weights[after["c1"]], before["c1.w"], atol=1e-3)
    # without M = Q at the taps the rotation is not undone
    unrotated = export(rewrite(graph, groups, _rotation_plans(groups, correct=False)))
    assert max_deviation(model, unrotated, feeds) > 1e-2


def test_rewrite_leaves_its_input_graph_unchanged():
    model = graphs.conv_chain()
    graph = normalize(model)
    before = export(graph).SerializeToString()
    groups = analyze(graph)
    rewrite(graph, groups, {"c1": Plan(keep=np.array([0, 2, 5]))})
    assert export(graph).SerializeToString() == before


def test_rewrite_shares_the_weights_it_does_not_change():
    """The pruned graph holds the input graph's own arrays where no edit touched them (no copy
    of a model's weights per rewrite), and new arrays where an edit did."""
    graph = normalize(graphs.conv_chain())
    arrays = {n: t.values for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    pruned = rewrite(graph, analyze(graph), {"c1": Plan(keep=np.array([0, 2, 5]))})
    node = {n.name: n for n in pruned.nodes}
    assert node["c3"].inputs[1].values is arrays[node["c3"].inputs[1].name]
    assert not any(node["c1"].inputs[1].values is a for a in arrays.values())


def test_hand_made_selection_plan_slices_rows_and_columns():
    model = graphs.conv_chain()
    graph = normalize(model)
    keep = np.array([0, 2, 5])
    pruned = export(rewrite(graph, analyze(graph), {"c1": Plan(keep=keep)}))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    new = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    node = {n.name: n for n in pruned.graph.node}
    np.testing.assert_array_equal(new[node["c1"].input[1]], inits["c1.w"][keep])
    np.testing.assert_array_equal(new[node["c1"].input[2]], inits["c1.b"][keep])
    np.testing.assert_array_equal(new[node["c2"].input[1]], inits["c2.w"][:, keep])
    np.testing.assert_array_equal(new[node["c3"].input[1]], inits["c3.w"])


# --- bias compensation ----------------------------------------------------------------------------


def _constant_channel_model(pad: bool = False) -> onnx.ModelProto:
    """c1's channel 5 has a zero filter and bias 0.7: after ReLU it is 0.7 everywhere."""
    b = graphs.Builder(30)
    weight = (0.5 * b.rng.standard_normal((8, 3, 3, 3))).astype(np.float32)
    bias = (0.5 * b.rng.standard_normal(8)).astype(np.float32)
    weight[5], bias[5] = 0.0, 0.7
    h = b.relu("r1", b.conv("c1", "x", 3, 8, weight=weight, b=bias))
    return b.model([b.conv("c2", h, 8, 4, pad=pad)])


@pytest.mark.parametrize("pad", [False, True], ids=["valid", "zero-padded"])
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_bias_compensation_removes_a_constant_channel_exactly(method, pad):
    """Exact also behind zero padding with `exact_borders`: there a kernel tap on the border
    reads 0, not the constant, so the shift differs per output position (an Add after the
    consumer); the default per-unit bias is exact only for the unpadded consumer."""
    model = _constant_channel_model(pad)
    calib = graphs.random_input(model, 32)
    ratio = 1 / 8
    seed = 0
    if method == "random":  # a seed whose random scores put channel 5 last (the one removed)
        group = next(g for g in onnxprune.analyze(model).groups if g.name == "c1")
        seed = next(s for s in range(200) if np.argmin(Random().scores(group, None, seed=s)) == 5)
    common = {"method": method, "ratio": ratio, "round_to": 1, "data": calib, "seed": seed}
    compensated = onnxprune.prune(model, compensate="bias", exact_borders=pad, **common)
    plain = onnxprune.prune(model, **common)
    assert compensated.plans["c1"].keep.tolist() == [0, 1, 2, 3, 4, 6, 7]
    test = graphs.random_input(model, 8, seed=3)
    assert_outputs_close(model, compensated.model, test, atol=1e-5)
    assert max_deviation(model, plain.model, test) > 0.1
    if pad:
        default = onnxprune.prune(model, compensate="bias", **common)
        assert max_deviation(model, default.model, test) > 1e-3


def test_recalibration_reads_and_scales_the_border_shift():
    """The padded shift lives in an Add after the consumer: recalibration must measure that
    Add's output and scale its map with the consumer, so an exact prune stays exact."""
    model = _constant_channel_model(pad=True)
    result = onnxprune.prune(
        model,
        method="magnitude",
        ratio=1 / 8,
        round_to=1,
        compensate="bias",
        recalibrate=True,
        exact_borders=True,
        data=graphs.random_input(model, 64),
    )
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu", "Conv", "Add"]
    assert_outputs_close(model, result.model, graphs.random_input(model, 8, seed=3), atol=1e-5)
