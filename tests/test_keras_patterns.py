"""Two patterns tf2onnx writes for Keras models, each pruned exactly like the spelling the torch
exporters use for the same function:

- the squeeze-excite input, GlobalAveragePooling2D → Reshape((1, 1, C)), as ReduceMean →
  Squeeze → Reshape(-1, C, 1, 1): a Reshape that only inserts axes of size 1 keeps the channels
  (ops/reshape.py), its count entry shrinking with the group;
- Flatten → Dense in Keras' channels-last order, Transpose(0, 2, 3, 1) → Reshape → MatMul:
  normalized at load into a channel-major flatten with the dense rows reordered
  (graph/channels_last.py).

And a Shape read, as tf2onnx writes the batch size of an RNN's zero state (Shape → Cast →
Slice), blocks the channels exactly when it reads their count (a negative Gather index too, and
through a Gather that permutes the shape to NHWC).

Keras on token sequences (`graphs.tensordot_mlp`, `graphs.keras_encoder`): a Dense is a
Tensordot (rows → MatMul → Reshape back to a target built from the input's shape behind Casts)
and prunes like the MatMul spelling; an Einsum projection reshaped to (N, 5, C, 1) passes its
channels on; LayerNormalization written in arithmetic converts to an RMSNorm for cob with its
affine folded into readers and its writers centred through those Reshapes."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import assert_outputs_close, run_model

import onnxprune
from onnxprune.graph.analyze import analyze
from onnxprune.graph.layernorm import to_rmsnorm
from onnxprune.graph.load import export, normalize
from onnxprune.ops.flow import State, Step
from onnxprune.ops.registry import handler_for

PLAIN = dict(round_to=1, verify=False)


def _groups(model: onnx.ModelProto) -> dict:
    return {g.name: g for g in analyze(normalize(model))}


def _pruned_alike(a: onnx.ModelProto, b: onnx.ModelProto, method: str, **options) -> None:
    """`a` and `b` compute the same function: pruned alike, they keep the same channels and
    their outputs agree on held-out inputs."""
    feeds = graphs.random_input(a, 32, seed=1)
    held = graphs.random_input(a, 8, seed=2)
    pa = onnxprune.prune(a, method=method, data=feeds, **PLAIN, **options)
    pb = onnxprune.prune(b, method=method, data=feeds, **PLAIN, **options)
    assert pa.plans.keys() == pb.plans.keys()
    for name, plan in pa.plans.items():
        assert sorted(plan.keep) == sorted(pb.plans[name].keep), name
    assert_outputs_close(pa.model, pb.model, held, atol=1e-5)


def test_tf2onnx_se_input_is_part_of_the_gated_group():
    groups = _groups(graphs.se_block("tf2onnx"))
    trunk = groups["ct"]
    assert trunk.prunable, trunk.reason
    assert set(trunk.producers) == {"ct", "ce"} and set(trunk.consumers) == {"co", "cr"}
    assert {"squeeze", "unsqueeze"} <= set(trunk.passthrough)
    assert any(e.node == "unsqueeze" for e in trunk.edits)  # its count of 8 shrinks


@pytest.mark.parametrize("method", ["magnitude", "id"])
def test_tf2onnx_se_input_prunes_like_global_average_pool(method):
    _pruned_alike(graphs.se_block("gap"), graphs.se_block("tf2onnx"), method, ratio=0.5)


def test_tf2onnx_se_input_at_ratio_zero_is_exact():
    model = graphs.se_block("tf2onnx")
    feeds = graphs.random_input(model, 16)
    result = onnxprune.prune(model, method="id", ratio=0.0, data=feeds, allow_noop=True)
    assert_outputs_close(model, result.model, feeds, atol=1e-6)


def test_a_reshape_splitting_the_channels_is_still_refused():
    trunk = _groups(graphs.se_block("split"))["ct"]
    assert not trunk.prunable
    assert "split" in trunk.reason


@pytest.mark.parametrize("kind", ["flatten", "reshape"])
def test_channels_last_flatten_is_loaded_as_the_same_function_channel_major(kind):
    model = graphs.flatten_gemm(kind, channels_last=True)
    graph = normalize(model)
    assert "Transpose" not in {n.op for n in graph.nodes}
    feeds = graphs.random_input(model, 8)
    assert_outputs_close(model, export(graph), feeds, atol=1e-6)
    group = {g.name: g for g in analyze(graph)}["c1"]
    assert group.prunable and group.consumers == ("fc",), group.reason


@pytest.mark.parametrize("method", ["magnitude", "id"])
def test_channels_last_flatten_prunes_like_the_channel_major_one(method):
    major = graphs.flatten_gemm("reshape", (0, -1))
    last = graphs.flatten_gemm("reshape", (0, -1), channels_last=True)
    assert_outputs_close(major, last, graphs.random_input(major, 8), atol=1e-5)
    _pruned_alike(major, last, method, ratio=0.5)


def test_channels_last_flatten_read_by_another_op_too_is_left_as_it_is():
    """The flattened features also reach a graph output: a permutation of the dense weight
    cannot reorder them there, so the Transpose stays and the channels are refused."""
    model = graphs.flatten_gemm("flatten", channels_last=True)
    model.graph.output.append(onnx.helper.make_tensor_value_info("flat_out", 1, None))
    graph = normalize(model)
    assert "Transpose" in {n.op for n in graph.nodes}
    assert not {g.name: g for g in analyze(graph)}["c1"].prunable
    feeds = graphs.random_input(model, 4)
    np.testing.assert_array_equal(run_model(model, feeds)["flat_out"].shape, (4, 96))


def _shape_step(index: int, through_cast: bool) -> Step:
    """The Shape handler's step for channel axis 1 of h (N, 6, 8, 8) when its shape is read by
    Gather(`index`), through a Cast with `through_cast`: the graph as imported, before the load
    folds static reads into constants."""
    b = graphs.Builder(2)
    h = b.relu("r1", b.conv("c1", "x", 3, 6))
    dims = b.node("Shape", "shape", [h])
    if through_cast:
        dims = b.node("Cast", "dims", [dims], to=onnx.TensorProto.INT32)
    count = b.node("Gather", "count", [dims, b.const("index", np.array(index, np.int64))])
    count = b.node("Cast", "count_f", [count], to=onnx.TensorProto.FLOAT)
    graph = gs.import_onnx(b.model([b.conv("c2", b.node("Div", "scaled", [h, count]), 6, 4)]))
    shape = next(n for n in graph.nodes if n.op == "Shape")
    return handler_for(shape).step(shape, 0, State(h, 1, 0), 6)


@pytest.mark.parametrize("through_cast", [False, True])
@pytest.mark.parametrize("index, reads_channels", [(0, False), (1, True), (-3, True), (-1, False)])
def test_a_shape_read_blocks_exactly_when_it_reads_the_channel_count(
    index, reads_channels, through_cast
):
    """Gather index -3 of a rank-4 shape is the channel count as much as index 1 is."""
    step = _shape_step(index, through_cast)
    assert (step.kind == "block") == reads_channels, step


def test_tensordot_dense_is_one_group_with_its_count_entry_edited():
    """Keras' Dense on a sequence: the Reshape back to (N, 5, 16) states the unit count as an
    int32 Concat piece behind a Cast; the channels pass it and that entry shrinks."""
    group = _groups(graphs.tensordot_mlp("tf2onnx"))["d1"]
    assert group.prunable, group.reason
    assert set(group.consumers) == {"d2"}
    assert any(e.node == "d1_target" and e.role == "count" for e in group.edits)


@pytest.mark.parametrize("exclude", [[], ["m2_up"]], ids=["both", "first-only"])
def test_a_reshape_target_shared_by_two_groups_shrinks_with_each(exclude):
    """Two groups whose rows-to-tokens Reshapes read one computed target (dynamo's GPT-2):
    each Reshape gets its own copy at load, so each count entry follows its own group (the
    shared one shrank twice, 16 → 8 → 0, and the pruned model did not run)."""
    model = graphs.shared_target_mlps()
    feeds = {"x": np.random.default_rng(0).standard_normal((7, 5, 12)).astype(np.float32)}
    same = onnxprune.prune(model, method="magnitude", ratio=0.0, data=feeds, verify=False)
    assert_outputs_close(model, same.model, feeds, atol=1e-5, rtol=1e-5)
    result = onnxprune.prune(model, method="magnitude", ratio=0.5, round_to=1, exclude=exclude,
                             data=feeds, verify=False)  # fmt: skip
    widths = {
        g.name: len(result.plans[g.name].keep) for g in result.groups if g.name in result.plans
    }
    assert widths == ({"m1_up": 8} if exclude else {"m1_up": 8, "m2_up": 8})
    (out,) = run_model(result.model, feeds).values()
    assert out.shape == (7, 5, 12)


@pytest.mark.parametrize("method", ["magnitude", "id"])
def test_tensordot_dense_prunes_like_the_matmul_spelling(method):
    _pruned_alike(graphs.tensordot_mlp("matmul"), graphs.tensordot_mlp("tf2onnx"), method,
                  ratio=0.5)  # fmt: skip


def test_tensordot_dense_at_ratio_zero_is_exact():
    model = graphs.tensordot_mlp("tf2onnx")
    feeds = graphs.random_input(model, 16)
    result = onnxprune.prune(model, method="id", ratio=0.0, data=feeds, allow_noop=True)
    assert_outputs_close(model, result.model, feeds, atol=1e-6)


def _permuted_shape_step(read: str) -> Step:
    """The Shape handler's step for channel axis 1 of h (N, 6, 8, 8) when tf2onnx permutes its
    shape to NHWC (Gather [0, 2, 3, 1]) and then reads `read`: the batch entry (Slice 0:1), the
    channel entry (Slice 3:4), or the whole permuted vector (a Concat into another target)."""
    b = graphs.Builder(2)
    h = b.relu("r1", b.conv("c1", "x", 3, 6))
    dims = b.node("Shape", "shape", [h])
    nhwc = b.node("Gather", "nhwc", [dims, b.const("perm", np.array([0, 2, 3, 1], np.int64))])
    nhwc = b.node("Cast", "nhwc32", [nhwc], to=onnx.TensorProto.INT32)
    if read == "whole":
        picked = b.node("Concat", "picked", [nhwc], axis=0)
    else:
        lo = 0 if read == "batch" else 3
        bounds = [b.const(f"{k}", np.array([v], np.int64)) for k, v in
                  (("lo", lo), ("hi", lo + 1), ("ax", 0))]  # fmt: skip
        picked = b.node("Slice", "picked", [nhwc, *bounds])
    scale = b.node("Cast", "scale", [b.node("ReduceSum", "total", [picked])], to=1)
    graph = gs.import_onnx(b.model([b.conv("c2", b.node("Div", "scaled", [h, scale]), 6, 4)]))
    shape = next(n for n in graph.nodes if n.op == "Shape")
    return handler_for(shape).step(shape, 0, State(h, 1, 0), 6)


@pytest.mark.parametrize("read, reads_channels", [("batch", False), ("channels", True),
                                                   ("whole", True)])  # fmt: skip
def test_a_permuted_shape_blocks_exactly_when_the_channel_entry_is_read(read, reads_channels):
    step = _permuted_shape_step(read)
    assert (step.kind == "block") == reads_channels, step


def test_einsum_projection_reshaped_to_a_trailing_unit_axis_is_one_group():
    """tf2onnx writes a Keras Einsum projection as rows → Gemm → Reshape to (N, 5, 16, 1) →
    Squeeze: the channels pass the Reshape onto axis 2 and the 16 in its target shrinks."""
    group = _groups(graphs.keras_encoder())["q"]
    assert group.prunable, group.reason
    assert set(group.consumers) == {"d1"}
    assert any(e.node == "q_target" and e.role == "count" for e in group.edits)
    model = graphs.keras_encoder()
    feeds, held = graphs.random_input(model, 64, seed=1), graphs.random_input(model, 8, seed=2)
    exact = onnxprune.prune(model, method="id", ratio=0.0, data=feeds, allow_noop=True)
    assert_outputs_close(model, exact.model, held, atol=1e-5)


def test_keras_layernorms_convert_with_the_affine_folded_through_the_rows():
    """Both tf2onnx LayerNorms become RMSNorms on a mean-free stream with nothing inserted:
    γ and β fold into the Gemm read through Unsqueeze → Reshape and into the head read through
    a Reshape, the Dense writers' columns are centred through their Reshapes back."""
    model = graphs.keras_encoder()
    conversion = to_rmsnorm(normalize(model))
    assert len(conversion.converted) == 2 and not conversion.kept
    converted = export(conversion.graph)
    added = {n.name for n in converted.graph.node} - {n.name for n in model.graph.node}
    assert not [name for name in added if "__gamma" in name or "__centre" in name]
    feeds = graphs.random_input(model, 8, seed=3)
    assert_outputs_close(model, converted, feeds, atol=1e-5, rtol=1e-5)


def test_full_width_cob_rotates_the_keras_stream_and_changes_nothing():
    model = graphs.keras_encoder()
    result = onnxprune.prune(model, method="cob", ratio=0.0, round_to=1,
                             data=graphs.random_input(model, 64, seed=1))  # fmt: skip
    stream = next(g for g in result.groups if g.invariants)
    rotation = result.plans[stream.name].rotation
    assert stream.rotatable and rotation is not None
    assert not np.allclose(np.abs(rotation), np.eye(16), atol=1e-2)
    assert_outputs_close(model, result.model, graphs.random_input(model, 8, seed=2), atol=1e-5,
                         rtol=1e-4)  # fmt: skip
