"""The rotation-invariant reference models (``tsra_vgg``, ``relu_vgg``) and the onnxprune
TSRA / RMSNorm model-local functions written by ``models/tsra.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import models.tsra` when pytest runs from elsewhere

ENTRIES: dict[str, dict] = json.loads((MODELS_DIR / "manifest.json").read_text())["models"]
NAMES = ["tsra_vgg", "relu_vgg"]
RNG = np.random.default_rng(0)


def writer():
    """models.tsra (needs torch, an optional dependency)."""
    pytest.importorskip("torch")
    from models import tsra

    return tsra


def run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def orthogonal(n: int) -> np.ndarray:
    q, r = np.linalg.qr(RNG.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def block_diag(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a) + len(b),) * 2)
    out[: len(a), : len(a)], out[len(a) :, len(a) :] = a, b
    return out


def rotate(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Apply q to the channel axis (1) of (N, C) or (N, C, H, W)."""
    return np.einsum("ij,nj...->ni...", q, x.astype(np.float64)).astype(np.float32)


def single_op_model(op: str, channels: int, spatial: tuple[int, ...], **attrs) -> onnx.ModelProto:
    """A graph holding one onnxprune::<op> call on a (N, channels, *spatial) input."""
    tsra = writer()
    node = (tsra.tsra_node if op == "TSRA" else tsra.rmsnorm_node)("x", "y", **attrs)
    shape = ["n", channels, *spatial]
    model = tsra.make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        name=f"single_{op}",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


# ------------------------------------------------------------------ committed model files


def test_manifest_has_both_entries() -> None:
    for name in NAMES:
        entry = ENTRIES[name]
        assert entry["onnx"] == f"{name}.onnx" and entry["onnx_dynamo"] is None
        assert entry["input_shape"] == ["batch", 1, 32, 32]
        assert (MODELS_DIR / entry["calib"]).is_file() and (MODELS_DIR / entry["test"]).is_file()


@pytest.mark.parametrize("name", NAMES)
def test_model_file_is_valid(name: str) -> None:
    path = MODELS_DIR / ENTRIES[name]["onnx"]
    assert path.stat().st_size < 2 * 1024 * 1024
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert not [t.name for t in model.graph.initializer if t.data_location], "external data"
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param, "batch dimension must be symbolic"


def test_tsra_file_layout() -> None:
    model = onnx.load(str(MODELS_DIR / ENTRIES["tsra_vgg"]["onnx"]))
    assert model.ir_version == 8
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets == {"": 18, "onnxprune": 1}
    assert {(f.domain, f.name) for f in model.functions} == {
        ("onnxprune", "TSRA"),
        ("onnxprune", "RMSNorm"),
    }
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert set(ops) <= {
        ("", "Conv"), ("", "Gemm"), ("", "AveragePool"), ("", "Flatten"),
        ("onnxprune", "TSRA"), ("onnxprune", "RMSNorm"),
    }  # fmt: skip
    assert ops.count(("onnxprune", "TSRA")) == 7 and ops.count(("onnxprune", "RMSNorm")) == 6
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "TSRA":
            assert attrs["axis"] == 1 and attrs["split"] > 0
        if node.op_type == "RMSNorm":
            assert attrs["axis"] == 1 and 0 < attrs["epsilon"] < 1e-5


def test_relu_control_is_a_plain_legacy_export() -> None:
    model = onnx.load(str(MODELS_DIR / ENTRIES["relu_vgg"]["onnx"]))
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    assert not model.functions
    assert {n.op_type for n in model.graph.node} >= {"Conv", "Relu", "MaxPool", "Gemm"}


@pytest.mark.parametrize("name", NAMES)
def test_model_reproduces_manifest_accuracy(name: str) -> None:
    entry = ENTRIES[name]
    with np.load(MODELS_DIR / entry["test"]) as data:
        x, labels = data["input"], data["labels"]
    logits = run(MODELS_DIR / entry["onnx"], x)
    assert logits.shape == (len(x), 10)
    acc = 100.0 * float((logits.argmax(1) == labels).mean())
    assert acc == pytest.approx(entry["test_accuracy_pct"], abs=0.2)


# ------------------------------------------------------------------ function semantics


@pytest.mark.parametrize("spatial", [(), (3, 4)], ids=["features", "conv"])
def test_tsra_is_equivariant_to_subspace_rotations(spatial: tuple[int, ...]) -> None:
    model = single_op_model("TSRA", 6, spatial, split=3, axis=1)
    x = RNG.normal(size=(32, 6, *spatial)).astype(np.float32)
    y = run(model, x)
    q_block = block_diag(orthogonal(3), orthogonal(3))
    np.testing.assert_allclose(
        run(model, rotate(q_block, x)), rotate(q_block, y), atol=1e-5, rtol=1e-5
    )
    q_mix = orthogonal(6)
    assert np.abs(q_mix[:3, 3:]).max() > 0.1  # really mixes U and V
    assert np.abs(run(model, rotate(q_mix, x)) - rotate(q_mix, y)).max() > 1e-2


@pytest.mark.parametrize("spatial", [(), (3, 4)], ids=["features", "conv"])
def test_rmsnorm_is_equivariant_to_any_rotation(spatial: tuple[int, ...]) -> None:
    model = single_op_model("RMSNorm", 6, spatial, axis=1)
    x = RNG.normal(size=(32, 6, *spatial)).astype(np.float32)
    q = orthogonal(6)
    np.testing.assert_allclose(
        run(model, rotate(q, x)), rotate(q, run(model, x)), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(("channels", "split"), [(6, 3), (7, 3), (5, 1), (8, 6)])
def test_onnx_functions_match_torch(channels: int, split: int) -> None:
    """Also for unequal subspaces, as left behind by pruning (the split is an attribute)."""
    tsra = writer()
    import torch

    x = RNG.normal(size=(16, channels, 2, 3)).astype(np.float32)
    with torch.no_grad():
        want_tsra = tsra.tsra(torch.from_numpy(x), split).numpy()
        want_rms = tsra.RMSNorm()(torch.from_numpy(x)).numpy()
    got_tsra = run(single_op_model("TSRA", channels, (2, 3), split=split), x)
    got_rms = run(single_op_model("RMSNorm", channels, (2, 3)), x)
    np.testing.assert_allclose(got_tsra, want_tsra, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(got_rms, want_rms, atol=1e-5, rtol=1e-5)


def test_writer_round_trip_on_a_small_network() -> None:
    tsra = writer()
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), tsra.RMSNorm(), tsra.TSRA(6), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 5), tsra.TSRA(5), nn.Dropout(0.5), nn.Linear(5, 3),
    ).eval()  # fmt: skip
    model = tsra.to_onnx(net, input_shape=(2, 4, 4), num_outputs=3, graph_name="small")
    onnx.checker.check_model(model, full_check=True)
    x = RNG.normal(size=(9, 2, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(model, x), want, atol=1e-5, rtol=1e-5)
    splits = [helper.get_attribute_value(a) for n in model.graph.node for a in n.attribute
              if n.op_type == "TSRA" and a.name == "split"]  # fmt: skip
    assert splits == [3, 2]
