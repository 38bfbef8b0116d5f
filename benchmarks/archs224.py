"""224×224 ImageNet-shaped models for the speed and calibration benchmarks (random weights).

`resnet18()` is a ResNet-18-like net (BasicBlocks 64-128-256-512, 7×7/2 stem + 3×3/2 max pool,
1×1 strided downsamples, GAP, FC 1000) and `mobilenetv2()` a MobileNetV2-like net (the paper's
inverted residual settings, width 1.0, ReLU6, 1280-channel head, 1000 classes). Weights come from
a fixed seed, and the BatchNorm running statistics and affine parameters are randomised too, so
folding BN into the convs is not an identity. `export(name)` writes the ONNX file once into
`benchmarks/results/cache/` (git-ignored) and returns its path:

    python benchmarks/archs224.py            # export both, print their paths
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

CACHE = Path(__file__).resolve().parent / "results" / "cache"
SEED = 0


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN pairs with an identity or 1×1 strided projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.down is None else self.down(x)
        return self.relu(out + shortcut)


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, act: bool = True):
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1×1 expand (t > 1), 3×3 depthwise, 1×1 linear project; identity add when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, 1)]
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, 1, act=False),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


# (expansion t, channels c, repeats n, first stride s) of Sandler et al. 2018, Table 2
MBV2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in MBV2_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


ARCHS = {"resnet18": ResNet18, "mobilenetv2": MobileNetV2}


def build(name: str, seed: int = SEED) -> nn.Module:
    """The model `name` with seeded random weights and randomised BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = ARCHS[name]()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * math.prod(m.kernel_size)
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, math.sqrt(1.0 / m.in_features), generator=g)
                m.bias.normal_(0.0, 0.01, generator=g)
    return model.eval()


def export(name: str, *, seed: int = SEED, cache: Path = CACHE) -> Path:
    """Export `name` once (legacy exporter, opset 17, dynamic batch) and return the file path."""
    path = cache / f"{name}_224_seed{seed}.onnx"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    model = build(name, seed)
    tmp = path.with_suffix(".onnx.tmp")
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 224, 224),),
        str(tmp),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    for name in ARCHS:
        print(export(name, seed=args.seed))


if __name__ == "__main__":
    main()
