"""models/weights.py: BatchNorm-folded ONNX weights loaded back into torch modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from models import archs, weights
from models.build import export_legacy

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


class Tiny(nn.Module):
    """Conv-BN-ReLU, a biased 1x1 conv without BatchNorm, a strided conv-BN, GAP, Linear."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *archs.conv_bn(2, width), nn.ReLU(), nn.Conv2d(width, 3, 1),
            *archs.conv_bn(3, 5, stride=2),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


def _trained_like(seed: int) -> Tiny:
    """A Tiny with random weights and random BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    model = Tiny()
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        with torch.no_grad():
            norm.running_mean.normal_(0, 2)
            norm.running_var.uniform_(0.5, 3)
            norm.weight.uniform_(0.5, 2)
            norm.bias.normal_(0, 1)
    return model.eval()


@pytest.fixture(scope="module")
def folded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tiny, onnx.ModelProto, np.ndarray]:
    """A Tiny, its legacy export (BatchNorm folded into the convs) and calibration inputs."""
    model = _trained_like(0)
    x = np.random.default_rng(0).normal(1.0, 2.0, (48, 2, 8, 8)).astype(np.float32)
    path = tmp_path_factory.mktemp("weights") / "tiny.onnx"
    export_legacy(model, torch.from_numpy(x[:2]), path)
    exported = onnx.load(str(path))
    assert not [n for n in exported.graph.node if n.op_type == "BatchNormalization"]
    return model, exported, x


def test_loaded_module_computes_the_onnx_function(folded) -> None:
    original, exported, x = folded
    module = weights.from_onnx(Tiny(), exported, x[:32])
    test = np.random.default_rng(1).normal(0.0, 3.0, (16, 2, 8, 8)).astype(np.float32)
    assert weights.verify(module, exported, test) >= 0.0
    with torch.no_grad():
        want = original(torch.from_numpy(test))
        got = module(torch.from_numpy(test))
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("unit_outputs", [False, True])
def test_batchnorm_is_the_identity_at_the_conv_output_statistics(folded, unit_outputs) -> None:
    _, exported, x = folded
    module = weights.from_onnx(Tiny(), exported, x, unit_outputs=unit_outputs)
    conv, norm = module.body[0], module.body[1]
    first = next(n for n in exported.graph.node if n.op_type == "Conv")
    inits = {t.name: onnx.numpy_helper.to_array(t).copy() for t in exported.graph.initializer}
    weight, bias = (torch.from_numpy(inits[name]) for name in first.input[1:3])
    with torch.no_grad():
        z = conv(torch.from_numpy(x)).double()  # brute force: the conv's output on every sample
        mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
        scale = float(z.abs().max())
        assert torch.allclose(norm.running_mean.double(), mean, rtol=0, atol=1e-6 * scale)
        assert torch.allclose(norm.running_var.double(), var, rtol=1e-5, atol=0)
        if unit_outputs:
            assert torch.allclose(var, torch.ones_like(var), rtol=1e-5, atol=0)
        else:
            assert torch.equal(conv.weight, weight)
            assert torch.allclose(norm.weight.double(), (var + norm.eps).sqrt(), rtol=1e-6)
        anything = 50 * torch.randn(7, 2, 6, 6)  # far outside the calibration statistics
        out = norm(conv(anything))
        want = torch.nn.functional.conv2d(anything, weight, bias, padding=1)
        assert torch.allclose(out, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_other_architectures_are_refused(folded) -> None:
    _, exported, x = folded
    with pytest.raises(ValueError, match="ONNX weight"):
        weights.from_onnx(Tiny(width=6), exported, x)


def test_batchnorm_not_after_a_conv_is_refused(folded) -> None:
    _, exported, x = folded
    module = Tiny()
    module.body[2] = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="BatchNorm not fed directly by a conv"):
        weights.from_onnx(module, exported, x)


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_bundled_models_load(name: str) -> None:
    with np.load(MODELS_DIR / "digits32_calib.npz") as data:
        x = data["input"][:64]
    module = weights.load(name, x[:48], check=x[48:])
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(bool((m.weight > 0).all()) for m in norms)
