"""ORT sessions made from bytes or, for models with many weights, from a temporary file."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
from conftest import reference_feeds, reference_path

import onnxprune
from onnxprune.calib.stats import add_taps
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
