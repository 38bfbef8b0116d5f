"""Weights mapped from their external data files (graph/external.py): the same pruned models,
deviations and saved files as with the weights read into memory, the input never changed."""

from __future__ import annotations

import mmap
import os

import graphs
import numpy as np
import onnx
import pytest
from conftest import file_hash, run_model
from onnx import numpy_helper
from test_large import WIDTH, _mlp, _save_external

import onnxprune
from onnxprune.errors import ModelLoadError
from onnxprune.graph.external import drop_pages, is_mapped, mapped_array, materialized
from onnxprune.graph.load import export, load_model, model_bytes, normalize, write_external
from onnxprune.measure import latency


@pytest.fixture
def source(tmp_path):
    """The MLP of test_large saved with its weights in `mlp.onnx.data`."""
    path = tmp_path / "in" / "mlp.onnx"
    path.parent.mkdir()
    _save_external(_mlp(), path)
    return path


def test_mapped_weights_are_read_through_the_map(source):
    """The proto holds no weight bytes; the graph's weights are maps of the file with the
    values ONNX reads; the size counted is the one of the loaded model."""
    mapped = load_model(source, mapped=True)
    loaded = onnx.load(str(source))
    external = {t.name for t in mapped.graph.initializer if is_mapped(t)}
    assert {"fc0.w", "fc1.w", "fc2.w"} <= external  # head.w: float_data, which stays inline
    assert model_bytes(mapped) == model_bytes(loaded)
    graph = normalize(mapped)
    for tensor in loaded.graph.initializer:
        values = graph.tensors()[tensor.name].values
        assert isinstance(values, np.memmap) == (tensor.name in external)
        np.testing.assert_array_equal(values, numpy_helper.to_array(tensor))
    assert materialized(mapped).graph.initializer == loaded.graph.initializer


def test_write_external_copies_mapped_tensors_from_their_file(source, tmp_path):
    out = tmp_path / "copy.onnx"
    write_external(load_model(source, mapped=True), out)
    for old, new in zip(
        onnx.load(str(source)).graph.initializer, onnx.load(str(out)).graph.initializer, strict=True
    ):
        np.testing.assert_array_equal(numpy_helper.to_array(new), numpy_helper.to_array(old))


def _resident_bytes(array: np.ndarray) -> int:
    """Resident bytes of the mapping that holds `array`'s first byte (/proc/self/smaps)."""
    address, found = array.ctypes.data, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= address < hi
            elif found and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's smaps")
def test_dropped_pages_leave_rss_and_read_back_the_same_values(source):
    """After a full read a mapped weight's pages are resident; `drop_pages` on its rows gives
    them back to the kernel, and the values read again are the file's."""
    tensor = next(t for t in load_model(source, mapped=True).graph.initializer if is_mapped(t))
    values = mapped_array(tensor)
    expected = np.array(values)  # reads every page
    assert _resident_bytes(values) >= values.nbytes // 2
    drop_pages(values[: len(values) // 2])
    assert _resident_bytes(values) <= values.nbytes // 2 + 2 * mmap.PAGESIZE
    drop_pages(values)
    assert _resident_bytes(values) < 2 * mmap.PAGESIZE
    np.testing.assert_array_equal(values, expected)
    plain = expected.copy()
    drop_pages(plain)  # not a map: nothing to drop, nothing changed
    np.testing.assert_array_equal(plain, expected)


@pytest.mark.parametrize("method", ["magnitude", "id"])
def test_pruning_mapped_weights_equals_pruning_loaded_ones(source, tmp_path, method):
    """From the path (weights mapped) and from the proto ONNX loads (weights in memory): the
    same pruned weights, deviations, counts and saved model, the input files unchanged."""
    hashes = {p.name: file_hash(p) for p in source.parent.iterdir()}
    data = {"x": np.random.default_rng(3).standard_normal((96, WIDTH)).astype(np.float32)}
    options = {"method": method, "ratio": 0.5, "round_to": 1, "data": data}
    expected = onnxprune.prune(onnx.load(str(source)), **options)
    result = onnxprune.prune(source, **options)
    assert result.model.graph.initializer == expected.model.graph.initializer
    got, want = result.report.verification, expected.report.verification
    assert [o.rel_l2 for o in got.outputs] == [o.rel_l2 for o in want.outputs]
    assert (result.report.macs, result.report.file_size) == (
        expected.report.macs,
        expected.report.file_size,
    )
    out = tmp_path / "out" / "mlp.pruned.onnx"
    result.save(out)
    feeds = graphs.random_input(result.model, n=8)
    np.testing.assert_array_equal(
        run_model(out, feeds)["head_out"], run_model(expected.model, feeds)["head_out"]
    )
    assert {p.name: file_hash(p) for p in source.parent.iterdir()} == hashes


def test_a_data_file_too_short_is_a_load_error(source):
    data = source.with_name("mlp.onnx.data")
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="does not fit 'mlp.onnx.data'") as excinfo:
        load_model(source, mapped=True)
    assert "\n" not in str(excinfo.value)


def test_export_keeps_read_but_unchanged_weights_mapped(source):
    """A weight read (its map) but not replaced is exported as its external reference, one
    replaced by new values as bytes; the loaded proto is left as it was."""
    model = load_model(source, mapped=True)
    before = model.SerializeToString()
    graph = normalize(model)
    for tensor in graph.tensors().values():
        if tensor.name in ("fc0.w", "fc1.w"):
            assert isinstance(tensor.values, np.memmap)
    graph.tensors()["fc1.w"].values = np.array(graph.tensors()["fc1.w"].values)
    exported = {t.name: t for t in export(graph).graph.initializer}
    assert is_mapped(exported["fc0.w"]) and is_mapped(exported["fc2.w"])
    assert not is_mapped(exported["fc1.w"]) and exported["fc1.w"].raw_data
    assert model.SerializeToString() == before


def test_bench_maps_the_weights_and_computes_what_the_loaded_model_does(source):
    """`bench` opens a file with external data mapped: its session gives the loaded model's
    outputs, bit for bit."""
    mapped = latency._load(source)
    assert any(is_mapped(t) for t in mapped.graph.initializer)
    loaded = onnx.load(str(source))
    feeds = graphs.random_input(loaded, n=4)
    got = latency.make_session(mapped, threads=1).run(["head_out"], feeds)[0]
    np.testing.assert_array_equal(got, run_model(loaded, feeds)["head_out"])
