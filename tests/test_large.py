"""Models past protobuf's 2 GB limit: the same code path runs here on a small MLP with the limit
lowered (`load.EXTERNAL_LIMIT`), and gives the same results as the in-memory path;
`benchmarks/large_model.py` runs it on a real > 2 GB model."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import file_hash, reference_path, run_model
from onnx import helper, numpy_helper

import onnxprune
from onnxprune.graph import load, session
from onnxprune.graph.load import (
    add_inferred_shapes,
    model_bytes,
    save_model,
    too_large_for_protobuf,
    write_external,
)
from onnxprune.measure.cost import count
from onnxprune.measure.latency import make_session

WIDTH = 256


def _mlp(width: int = WIDTH, depth: int = 3) -> onnx.ModelProto:
    """Gemm+Relu layers of `width` (weights ~ N(0, 1/width), so activations stay near 1), one
    weight stored as float_data rather than raw bytes, then 10 class scores."""
    b = graphs.Builder(7)
    h = "x"
    for i in range(depth):
        weight = b.rng.standard_normal((width, width)) / np.sqrt(width)
        w = b.const(f"fc{i}.w", weight.astype(np.float32))
        bias = b.const(f"fc{i}.b", (0.1 * b.rng.standard_normal(width)).astype(np.float32))
        h = b.relu(f"r{i}", b.node("Gemm", f"fc{i}", [h, w, bias], transB=1))
    head = (b.rng.standard_normal((10, width)) / np.sqrt(width)).astype(np.float32)
    b.inits.append(helper.make_tensor("head.w", onnx.TensorProto.FLOAT, head.shape, head.ravel()))
    b.const("head.b", np.zeros(10, np.float32))
    out = b.node("Gemm", "head", [h, "head.w", "head.b"], transB=1)
    return b.model([out], shape=("N", width))


@pytest.fixture
def large(monkeypatch):
    """Every model over 64 KiB takes the past-2-GB path."""
    monkeypatch.setattr(load, "EXTERNAL_LIMIT", 1 << 16)


@pytest.fixture
def written(monkeypatch) -> list:
    """The paths `inference_session` writes models with external data to."""
    paths = []

    def spy(model, path):
        paths.append(path)
        return write_external(model, path)

    monkeypatch.setattr(session, "write_external", spy)
    return paths


def _save_external(model: onnx.ModelProto, path) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")


def test_model_bytes_counts_the_serialized_size():
    model = _mlp()
    assert 0.999 * model.ByteSize() <= model_bytes(model) <= model.ByteSize()


def test_session_past_the_limit_reads_external_data_at_creation(large, written):
    """The session goes through a file with external data, which is gone once the session
    exists (ORT has read it), and computes what the in-memory session computes, bit for bit."""
    model = _mlp()
    assert too_large_for_protobuf(model)
    feeds = graphs.random_input(model, n=8)
    for sess in (session.inference_session(model), make_session(model, threads=1)):
        assert not written[-1].parent.exists()
        got = sess.run(["head_out"], feeds)[0]
        np.testing.assert_array_equal(got, run_model(model, feeds)["head_out"])
    assert len(written) == 2


def test_write_external_round_trips_and_leaves_the_model_unchanged(tmp_path):
    model = _mlp()
    before = model.SerializeToString()
    path = tmp_path / "m.onnx"
    data = write_external(model, path)
    assert model.SerializeToString() == before
    assert data == tmp_path / "m.onnx.data"
    stored = onnx.load(str(path), load_external_data=False)
    external = [t for t in stored.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = {t.name for t in stored.graph.initializer} - {t.name for t in external}
    assert inline == {"head.b"}  # 40 bytes; the 1 KiB biases are at the threshold
    assert all(int(dict(_entries(t))["offset"]) % 4096 == 0 for t in external)
    loaded = onnx.load(str(path))
    for old, new in zip(model.graph.initializer, loaded.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(new), numpy_helper.to_array(old))
    onnx.checker.check_model(str(path), full_check=True)


def _entries(tensor: onnx.TensorProto) -> list[tuple[str, str]]:
    return [(e.key, e.value) for e in tensor.external_data]


def test_shapes_inferred_without_weights_equal_the_direct_ones():
    """Past the limit as below it, inference runs on the weightless copy: the same shapes as
    ONNX's inference on the whole model, the weights untouched."""
    model = _mlp()
    del model.graph.value_info[:]
    direct = onnx.shape_inference.infer_shapes(model, data_prop=True)
    weights = list(model.graph.initializer)
    add_inferred_shapes(model)
    assert model.graph.value_info == direct.graph.value_info
    assert model.graph.output == direct.graph.output
    assert list(model.graph.initializer) == weights


@pytest.mark.parametrize("name", ["resnet", "inception", "bilstm", "mobilenetv2"])
def test_graph_shapes_inferred_on_a_weightless_export_equal_those_of_the_whole_model(name):
    """`infer_shapes` runs inference on a weightless export and copies the shapes back in
    place: every tensor gets the type and shape that inference on the whole exported model
    (weights and all) gives, and the graph keeps its own arrays (nothing copied)."""
    graph = gs.import_onnx(load.load_model(reference_path(name, "onnx")))
    arrays = {n: t.values for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    whole = onnx.shape_inference.infer_shapes(load.export(graph), data_prop=True)
    direct = gs.import_onnx(whole).tensors()
    stub = load.weightless_export(graph)
    assert all(t.ByteSize() < 1024 for t in stub.graph.initializer)
    assert load.infer_shapes(graph) is graph
    for tensor_name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable):
            assert (tensor.dtype, tensor.shape) == (
                direct[tensor_name].dtype,
                direct[tensor_name].shape,
            ), tensor_name
    for tensor_name, values in arrays.items():
        assert graph.tensors()[tensor_name].values is values
    assert count(stub) == count(load.export(graph))  # what `analyze` counts on


@pytest.mark.parametrize("method", ["magnitude", "id"])
def test_pruning_past_the_limit_equals_pruning_in_memory(tmp_path, monkeypatch, written, method):
    """Analyze, calibrate, prune, verify and save past the limit: the same pruned weights and
    deviations as in memory, the output and its `.data` written, the input untouched."""
    src = tmp_path / "in" / "mlp.onnx"
    src.parent.mkdir()
    _save_external(_mlp(), src)
    hashes = {p.name: file_hash(p) for p in src.parent.iterdir()}
    rng = np.random.default_rng(3)
    data = {"x": rng.standard_normal((96, WIDTH)).astype(np.float32)}
    options = {"method": method, "ratio": 0.5, "round_to": 1, "data": data}
    expected = onnxprune.prune(src, **options)
    monkeypatch.setattr(load, "EXTERNAL_LIMIT", 1 << 16)
    result = onnxprune.prune(src, **options)
    assert len(written) >= 2  # the original and the pruned model ran from external data
    assert result.model.graph.initializer == expected.model.graph.initializer
    got, want = result.report.verification, expected.report.verification
    assert [o.rel_l2 for o in got.outputs] == [o.rel_l2 for o in want.outputs]
    assert result.report.macs == expected.report.macs
    out = tmp_path / "out" / "mlp.pruned.onnx"
    result.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, f"{out.name}.data"]
    feeds = graphs.random_input(result.model, n=8)
    np.testing.assert_array_equal(
        run_model(out, feeds)["head_out"], run_model(expected.model, feeds)["head_out"]
    )
    assert {p.name: file_hash(p) for p in src.parent.iterdir()} == hashes


def test_a_failed_external_write_leaves_nothing(tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", refuse)
    with pytest.raises(OSError, match="disk full"):
        save_model(_mlp(), tmp_path / "m.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []
