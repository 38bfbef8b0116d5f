"""Tests for calibration/evaluation data loading and validation (onnxprune.calib.data)."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.calib.data import (
    Dataset,
    InputSpec,
    in_parts,
    input_specs,
    load_data,
    run_samples,
)
from onnxprune.errors import DataError, UsageError

try:
    from PIL import Image
except ImportError:  # Pillow is the optional `images` extra
    Image = None

needs_pillow = pytest.mark.skipif(Image is None, reason="Pillow not installed")


def _model(
    inputs: list[tuple[str, int, list]], initializers: tuple[str, ...] = ()
) -> onnx.ModelProto:
    """A tiny model whose graph inputs are `inputs` (name, elem type, shape)."""
    values = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [1], [0.0]) for n in initializers]
    values += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in initializers]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Identity", [inputs[0][0]], ["y"])
    graph = helper.make_graph([node], "g", values, [out], initializer=inits)
    return helper.make_model(graph)


@pytest.fixture
def one() -> tuple[InputSpec, ...]:
    """Single input x: float32 [batch, 1, 8, 8]."""
    return input_specs(_model([("x", TensorProto.FLOAT, ["batch", 1, 8, 8])]))


@pytest.fixture
def two() -> tuple[InputSpec, ...]:
    """Two inputs: a float32 [N, 3, 4, 4], b float32 [N, 5]."""
    return input_specs(
        _model([("a", TensorProto.FLOAT, ["N", 3, 4, 4]), ("b", TensorProto.FLOAT, ["N", 5])])
    )


def _x(n: int = 10, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


# --- input_specs ---------------------------------------------------------------------------------


def test_input_specs_skips_initializers_and_maps_dtypes() -> None:
    model = _model(
        [("x", TensorProto.FLOAT, ["batch", 1, 8, 8]), ("ids", TensorProto.INT64, [None, 7])],
        initializers=("w",),
    )
    specs = input_specs(model)
    assert [s.name for s in specs] == ["x", "ids"]
    assert specs[0].shape == ("batch", 1, 8, 8)
    assert specs[0].dtype == np.float32
    assert specs[1].shape == (None, 7)
    assert specs[1].dtype == np.int64


# --- sources -------------------------------------------------------------------------------------


def test_npz_keyed_by_input_name(tmp_path, one) -> None:
    x = _x()
    np.savez(tmp_path / "calib.npz", x=x)
    ds = load_data(tmp_path / "calib.npz", one)
    assert len(ds) == 10
    np.testing.assert_array_equal(ds.arrays["x"], x)
    assert ds.labels is None
    assert not ds.synthetic
    assert "10 samples" in ds.source and "calib.npz" in ds.source


def test_npz_single_other_key_and_labels(tmp_path, one) -> None:
    x = _x()
    np.savez(tmp_path / "calib.npz", images=x, labels=np.arange(10) % 3)
    ds = load_data(str(tmp_path / "calib.npz"), one)
    np.testing.assert_array_equal(ds.arrays["x"], x)
    np.testing.assert_array_equal(ds.labels, np.arange(10) % 3)
    assert ds.labels.dtype == np.int64


def test_npz_two_inputs(tmp_path, two) -> None:
    a = np.zeros((4, 3, 4, 4), np.float32)
    b = np.ones((4, 5), np.float32)
    np.savez(tmp_path / "d.npz", a=a, b=b)
    ds = load_data(tmp_path / "d.npz", two)
    assert set(ds.arrays) == {"a", "b"} and len(ds) == 4


def test_npy_single_input(tmp_path, one) -> None:
    x = _x(6)
    np.save(tmp_path / "x.npy", x)
    ds = load_data(tmp_path / "x.npy", one)
    np.testing.assert_array_equal(ds.arrays["x"], x)


def test_dict_source_and_explicit_labels(tmp_path, one) -> None:
    x = _x(5)
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2, 1, 0]))
    ds = load_data({"x": x}, one, labels=tmp_path / "labels.npy", role="evaluation")
    np.testing.assert_array_equal(ds.arrays["x"], x)
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 1, 0])


def test_one_hot_labels_are_reduced_by_argmax(one) -> None:
    onehot = np.eye(4)[[3, 0, 2]]
    ds = load_data({"x": _x(3)}, one, labels=onehot)
    np.testing.assert_array_equal(ds.labels, [3, 0, 2])


def test_labels_text_file(tmp_path, one) -> None:
    (tmp_path / "labels.txt").write_text("1\n0\n2\n")
    ds = load_data({"x": _x(3)}, one, labels=str(tmp_path / "labels.txt"))
    np.testing.assert_array_equal(ds.labels, [1, 0, 2])


def test_float64_is_cast_to_float32(one) -> None:
    x = _x(4).astype(np.float64)
    ds = load_data({"x": x}, one)
    assert ds.arrays["x"].dtype == np.float32
    np.testing.assert_allclose(ds.arrays["x"], x, rtol=1e-6)


def test_random_is_synthetic_seeded_and_zero_for_ints() -> None:
    specs = input_specs(
        _model(
            [("x", TensorProto.FLOAT, ["batch", 1, 8, 8]), ("i", TensorProto.INT64, ["batch", 3])]
        )
    )
    a = load_data("random", specs, random_samples=7, seed=3)
    b = load_data(None, specs, random_samples=7, seed=3)
    c = load_data("random", specs, random_samples=7, seed=4)
    assert a.synthetic and b.synthetic
    assert len(a) == 7 and a.arrays["x"].shape == (7, 1, 8, 8)
    assert a.arrays["x"].dtype == np.float32
    np.testing.assert_array_equal(a.arrays["x"], b.arrays["x"])
    assert not np.array_equal(a.arrays["x"], c.arrays["x"])
    assert a.arrays["i"].dtype == np.int64 and not a.arrays["i"].any()
    assert a.source == "random (seed 3, 7 samples, synthetic)"


def test_random_symbolic_non_batch_dim_errors() -> None:
    specs = input_specs(_model([("tok", TensorProto.FLOAT, ["batch", "seq", 16])]))
    with pytest.raises(DataError, match=r"'tok'.*seq.*explicit data"):
        load_data("random", specs)


# --- images --------------------------------------------------------------------------------------


def _png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@needs_pillow
def test_image_folder_grayscale_nchw(tmp_path, one) -> None:
    rng = np.random.default_rng(0)
    pix = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)]
    for i, p in enumerate(pix):
        _png(tmp_path / "imgs" / f"{i}.png", p)
    ds = load_data(tmp_path / "imgs", one)
    assert ds.arrays["x"].shape == (3, 1, 8, 8) and ds.arrays["x"].dtype == np.float32
    np.testing.assert_allclose(ds.arrays["x"][:, 0], np.stack(pix) / 255.0, rtol=1e-6)
    assert ds.labels is None
    assert "3 images" in ds.source


@needs_pillow
def test_image_folder_rgb_nhwc_mean_std_and_resize(tmp_path) -> None:
    specs = input_specs(_model([("img", TensorProto.FLOAT, ["batch", 4, 4, 3])]))
    rng = np.random.default_rng(1)
    pix = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(2)]
    _png(tmp_path / "a.png", pix[0])
    _png(tmp_path / "b.png", pix[1])
    Image.fromarray(pix[0]).resize((9, 7)).save(tmp_path / "c.jpg")  # resized back to 4x4
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    ds = load_data(tmp_path, specs, layout="NHWC", mean=mean, std=std)
    assert ds.arrays["img"].shape == (3, 4, 4, 3)
    want = (np.stack(pix) / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(ds.arrays["img"][:2], want, rtol=1e-5, atol=1e-5)


@needs_pillow
def test_image_folder_rgb_nchw_image_size_for_dynamic_model(tmp_path) -> None:
    specs = input_specs(_model([("img", TensorProto.FLOAT, ["batch", 3, "h", "w"])]))
    _png(tmp_path / "a.png", np.full((10, 12, 3), 255, np.uint8))
    ds = load_data(tmp_path, specs, image_size=(5, 6))
    assert ds.arrays["img"].shape == (1, 3, 5, 6)
    np.testing.assert_allclose(ds.arrays["img"], 1.0)
    with pytest.raises(DataError, match="image size"):
        load_data(tmp_path, specs)


@needs_pillow
def test_image_folder_class_subfolders_give_labels(tmp_path, one) -> None:
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _png(tmp_path / cls / f"{i}.png", np.zeros((8, 8), np.uint8))
    ds = load_data(tmp_path, one)
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1])
    sub = load_data(tmp_path, one, samples=2, seed=5)
    assert len(sub) == 2 and "2 of 5 images" in sub.source


@needs_pillow
def test_image_folder_errors(tmp_path, one, two) -> None:
    with pytest.raises(DataError, match="no images"):
        load_data(tmp_path, one)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        load_data(tmp_path, one)
    with pytest.raises(DataError, match="single-input"):
        load_data(tmp_path, two)
    with pytest.raises(UsageError):
        load_data(tmp_path, one, layout="CHWN")


@needs_pillow
def test_missing_pillow_hint(tmp_path, one, monkeypatch) -> None:
    _png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError) as info:
        load_data(tmp_path, one)
    assert info.value.hint == "pip install onnxprune[images]"


# --- errors --------------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_wrong_shape_names_input_and_both_shapes(one) -> None:
    with pytest.raises(DataError) as info:
        load_data({"x": np.zeros((10, 1, 28, 28), np.float32)}, one)
    assert _one_line(info) == (
        "calibration data: input 'x' has shape (10, 1, 28, 28) but the model expects "
        "(batch, 1, 8, 8)"
    )
    with pytest.raises(DataError, match=r"\(10, 8, 8\).*\(batch, 1, 8, 8\)"):
        load_data({"x": np.zeros((10, 8, 8), np.float32)}, one)


def test_batch_axis_is_free(one) -> None:
    specs = input_specs(_model([("x", TensorProto.FLOAT, [1, 1, 8, 8])]))
    assert len(load_data({"x": _x(3)}, specs)) == 3
    assert len(load_data({"x": _x(3)}, one)) == 3


def test_wrong_dtype(one) -> None:
    with pytest.raises(DataError) as info:
        load_data({"x": np.zeros((2, 1, 8, 8), np.int64)}, one)
    assert "'x'" in _one_line(info) and "int64" in str(info.value) and "float32" in str(info.value)


def test_missing_input(tmp_path, two) -> None:
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"d\.npz has no array for model input\(s\) 'b'"):
        load_data(tmp_path / "d.npz", two)


def test_extra_key(tmp_path, two) -> None:
    np.savez(
        tmp_path / "d.npz",
        a=np.zeros((2, 3, 4, 4), np.float32),
        b=np.zeros((2, 5), np.float32),
        c=np.zeros(2),
    )
    with pytest.raises(DataError, match=r"unexpected key\(s\) 'c'"):
        load_data(tmp_path / "d.npz", two)


def test_single_input_two_unknown_keys(one) -> None:
    with pytest.raises(DataError, match=r"no array for model input\(s\) 'x'.*unexpected"):
        load_data({"p": _x(2), "q": _x(2)}, one)


def test_nan_and_inf_are_counted(one) -> None:
    x = _x(4)
    x[0, 0, 0, :3] = np.nan
    with pytest.raises(DataError, match=r"input 'x' has 3 non-finite values \(3 NaN, 0 Inf\)"):
        load_data({"x": x}, one)
    x = _x(4)
    x[1, 0, 1, 1] = np.inf
    x[2, 0, 1, 1] = -np.inf
    with pytest.raises(DataError, match=r"input 'x' has 2 non-finite values \(0 NaN, 2 Inf\)"):
        load_data({"x": x}, one)


def test_float64_overflow_becomes_inf_error(one) -> None:
    x = _x(2).astype(np.float64)
    x[0, 0, 0, 0] = 1e300
    with pytest.raises(DataError, match="1 Inf"):
        load_data({"x": x}, one)


def test_labels_length_mismatch(one) -> None:
    with pytest.raises(DataError, match="9 labels but the data has 10 samples"):
        load_data({"x": _x(10)}, one, labels=np.zeros(9, np.int64))


def test_non_integer_labels(one) -> None:
    with pytest.raises(DataError, match="integer"):
        load_data({"x": _x(2)}, one, labels=np.array([0.5, 1.0]))


def test_empty(one) -> None:
    with pytest.raises(DataError, match="no samples"):
        load_data({"x": np.zeros((0, 1, 8, 8), np.float32)}, one)


def test_different_sample_counts(two) -> None:
    with pytest.raises(DataError, match=r"different sample counts \(a: 2, b: 3\)"):
        load_data({"a": np.zeros((2, 3, 4, 4), np.float32), "b": np.zeros((3, 5), np.float32)}, two)


def test_missing_file(tmp_path, one) -> None:
    path = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="nope.npz"):
        load_data(path, one)
    with pytest.raises(DataError, match="missing.npy"):
        load_data({"x": _x(2)}, one, labels=tmp_path / "missing.npy")


def test_corrupt_npz(tmp_path, one) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip archive")
    with pytest.raises(DataError, match="bad.npz") as info:
        load_data(bad, one)
    _one_line(info)
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad\.npz: not an \.npz"):
        load_data(bad, one)


def test_corrupt_npy_and_swapped_extensions(tmp_path, one) -> None:
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad\.npy: not an \.npy"):
        load_data(tmp_path / "bad.npy", one)
    (tmp_path / "trunc.npy").write_bytes(b"\x93NUMPY\x01\x00")
    with pytest.raises(DataError, match="trunc.npy"):
        load_data(tmp_path / "trunc.npy", one)
    np.savez(tmp_path / "z.npz", x=_x(2))
    (tmp_path / "z.npz").rename(tmp_path / "z.npy")
    with pytest.raises(DataError, match="is an .npz archive"):
        load_data(tmp_path / "z.npy", one)
    np.save(tmp_path / "a.npy", _x(2))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    with pytest.raises(DataError, match="is a single .npy array"):
        load_data(tmp_path / "a.npz", one)


def test_unsupported_extension(tmp_path, one) -> None:
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="d.csv"):
        load_data(tmp_path / "d.csv", one)


def test_npy_for_two_input_model(tmp_path, two) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(DataError, match="2 inputs"):
        load_data(tmp_path / "a.npy", two)


def test_samples_below_one_is_usage_error(one) -> None:
    with pytest.raises(UsageError):
        load_data({"x": _x(2)}, one, samples=0)


# --- Dataset -------------------------------------------------------------------------------------


def test_samples_subset_is_deterministic_without_duplicates(one) -> None:
    x = np.arange(50, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 8, 8), np.float32)
    labels = np.arange(50)
    a = load_data({"x": x}, one, labels=labels, samples=20, seed=7)
    b = load_data({"x": x}, one, labels=labels, samples=20, seed=7)
    c = load_data({"x": x}, one, labels=labels, samples=20, seed=8)
    ids = a.arrays["x"][:, 0, 0, 0].astype(int)
    assert len(a) == 20 and len(set(ids)) == 20
    np.testing.assert_array_equal(ids, a.labels)  # labels stay aligned with samples
    np.testing.assert_array_equal(a.arrays["x"], b.arrays["x"])
    assert not np.array_equal(a.arrays["x"], c.arrays["x"])
    assert "20 of 50 samples" in a.source
    full = load_data({"x": x}, one, samples=500)
    assert len(full) == 50


def test_subset_and_head(one) -> None:
    ds = load_data({"x": _x(30)}, one)
    s1, s2 = ds.subset(10, seed=1), ds.subset(10, seed=1)
    np.testing.assert_array_equal(s1.arrays["x"], s2.arrays["x"])
    assert len({row.tobytes() for row in s1.arrays["x"]}) == 10
    assert ds.subset(100) is ds
    np.testing.assert_array_equal(ds.head(4).arrays["x"], ds.arrays["x"][:4])
    with pytest.raises(UsageError):
        ds.subset(0)


def test_batches_cover_every_sample_once(two) -> None:
    a = np.arange(7, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 4, 4), np.float32)
    b = np.zeros((7, 5), np.float32)
    ds = load_data({"a": a, "b": b}, two, labels=np.arange(7))
    batches = list(ds.batches(3))
    assert [len(bt.labels) for bt in batches] == [3, 3, 1]
    seen = np.concatenate([bt.feeds["a"][:, 0, 0, 0] for bt in batches])
    np.testing.assert_array_equal(seen, np.arange(7))
    assert all(set(bt.feeds) == {"a", "b"} for bt in batches)
    with pytest.raises(UsageError):
        list(ds.batches(0))


def test_dataset_rejects_inconsistent_lengths() -> None:
    with pytest.raises(DataError):
        Dataset({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))})


def test_random_data_for_symbolic_dims_asks_for_an_input_shape():
    import graphs

    import onnxprune

    with pytest.raises(DataError, match="give explicit data or --input-shape"):
        onnxprune.prune(graphs.strided_stem(), ratio=0.5)


# --- runs: run_samples, in_parts ------------------------------------------------------------------


def test_run_samples_keeps_the_largest_stated_tensor_of_a_run_under_the_budget(monkeypatch):
    import onnxprune.calib.data as data_module

    model = _model([("x", TensorProto.FLOAT, ["N", 4, 8, 8])])
    assert run_samples(model) is None  # no intermediate or output shape stated
    model.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 64]))
    model.graph.value_info.append(
        helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 16, 8, 8])
    )  # 4 KiB per sample, the largest
    monkeypatch.setattr(data_module, "RUN_TENSOR_BYTES", 10 * 4096 + 5)
    assert run_samples(model) == 10
    monkeypatch.setattr(data_module, "RUN_TENSOR_BYTES", 100)
    assert run_samples(model) == 1  # never fewer than one sample
    fixed = _model([("x", TensorProto.FLOAT, [2, 4, 8, 8])])
    fixed.graph.value_info.extend(model.graph.value_info)
    assert run_samples(fixed) == 2  # a fixed batch is what the model takes


def test_in_parts_covers_every_sample_once_in_order():
    feeds = {"a": np.arange(10.0), "b": np.arange(20.0).reshape(10, 2)}
    parts = list(in_parts([feeds, {"a": feeds["a"][:3], "b": feeds["b"][:3]}], 4))
    assert [len(p["a"]) for p in parts] == [4, 4, 2, 3]
    np.testing.assert_array_equal(np.concatenate([p["b"] for p in parts[:3]]), feeds["b"])
    assert [len(p["a"]) for p in in_parts([feeds], None)] == [10]
