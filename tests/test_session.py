"""ORT sessions made from bytes or, for models with many weights, from a temporary file."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
from conftest import reference_feeds, reference_path, run_model
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.calib.stats import add_taps, tapped_session
from onnxprune.graph import session


def _outputs(model: onnx.ModelProto, feeds, edit=None) -> list[np.ndarray]:
    sess = session.inference_session(model, edit=edit)
    return sess.run([o.name for o in sess.get_outputs()], feeds)


def test_file_and_bytes_sessions_compute_the_same_bits_and_edit_leaves_the_model(monkeypatch):
    """The same model through a file with external data and through bytes: identical outputs,
    also for an `edit` that adds outputs, which changes the session's copy, not the model."""
    model = onnx.load(str(reference_path("resnet")))
    before = model.SerializeToString()
    feeds = reference_feeds("resnet", n=8)
    inner = [n.output[0] for n in model.graph.node if n.op_type == "Conv"][:2]
    edit = lambda copy: add_taps(copy, inner)  # noqa: E731
    in_memory = _outputs(model, feeds), _outputs(model, feeds, edit)
    monkeypatch.setattr(session, "FILE_BYTES", 0)
    written = []
    write = session.write_external
    monkeypatch.setattr(session, "write_external", lambda *a: written.append(a) or write(*a))
    from_file = _outputs(model, feeds), _outputs(model, feeds, edit)
    assert model.SerializeToString() == before and len(written) == 2
    assert len(from_file[1]) == len(model.graph.output) + len(inner)
    for got, want in zip(from_file, in_memory, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_pruning_through_file_sessions_gives_the_same_model_bytes(monkeypatch):
    """Statistics, recalibration segments and verification through file sessions: the pruned
    model is byte for byte the one in-memory sessions give, and so is its verification."""
    model = graphs.residual_block()
    feeds = graphs.random_input(model, n=48)

    def pruned() -> onnxprune.api.Result:
        return onnxprune.prune(model, method="id", ratio=0.5, data=feeds, round_to=1)

    written = []
    write = session.write_external
    monkeypatch.setattr(session, "write_external", lambda *a: written.append(a) or write(*a))
    in_memory = pruned()
    assert not written
    monkeypatch.setattr(session, "FILE_BYTES", 0)
    from_file = pruned()
    assert len(written) >= 3  # statistics, a recalibration segment, verification
    assert in_memory.report.macs[1] < in_memory.report.macs[0]
    assert any("recalibrated" in note for note in in_memory.report.notes)
    assert from_file.model.SerializeToString() == in_memory.model.SerializeToString()
    assert from_file.report.verification == in_memory.report.verification


def _pooled_transitions() -> onnx.ModelProto:
    """x → conv0 → Pad → AveragePool → conv1 → Pad → AveragePool → y: DenseNet's transitions as
    the exporters of old opsets write `count_include_pad` pooling."""
    rng = np.random.default_rng(0)
    nodes, weights, h, channels = [], [], "x", 3
    for k in range(2):
        nodes += [
            helper.make_node("Conv", [h, f"w{k}"], [f"c{k}"], name=f"conv{k}"),
            helper.make_node("Pad", [f"c{k}", f"p{k}", f"v{k}"], [f"pad{k}"], name=f"pad{k}"),
            helper.make_node(
                "AveragePool",
                [f"pad{k}"],
                [f"a{k}"],
                name=f"pool{k}",
                kernel_shape=[2, 2],
                strides=[2, 2],
            ),
        ]
        weights += [
            numpy_helper.from_array(rng.standard_normal((4, channels, 1, 1), np.float32), f"w{k}"),
            numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), f"p{k}"),
            numpy_helper.from_array(np.array(0, np.float32), f"v{k}"),
        ]
        h, channels = f"a{k}", 4
    graph = helper.make_graph(
        nodes,
        "transitions",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, None)],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def test_taps_on_two_padded_pools_load_and_read_the_tensors():
    """ONNX Runtime's identity elimination folded the tap copies of conv0 and conv1 into their
    producers and left a Pad reading a tensor no node wrote (the session failed to load); the
    tapped session runs without it and reads the very tensors a plain run outputs."""
    model = _pooled_transitions()
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8), dtype=np.float32)}
    tapped, aliases = tapped_session(model, ["c0", "c1"])
    got = tapped.run(aliases, feeds)
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    plain.graph.output.extend([onnx.ValueInfoProto(name="c0"), onnx.ValueInfoProto(name="c1")])
    expected = run_model(plain, feeds)
    for name, value in zip(["c0", "c1"], got, strict=True):
        np.testing.assert_array_equal(value, expected[name])
