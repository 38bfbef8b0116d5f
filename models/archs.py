"""Small torch architectures covering the graph patterns a channel pruner must handle."""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Bias-free conv followed by BatchNorm, with 'same' padding for odd kernels."""
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv-BN-ReLU unit, the basic block of the plain CNNs."""
    return nn.Sequential(*conv_bn(cin, cout, k, stride), nn.ReLU())


class MLP(nn.Module):
    """64 -> 128 -> 64 -> 10 fully connected network on flattened 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VGG(nn.Module):
    """VGG-style stacks 32-32-M-64-64-M-96-96-M with a Flatten(96x4x4) classifier."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for width in (32, 64, 96):
            layers += [conv_bn_relu(cin, width), conv_bn_relu(width, width), nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(96 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block; a strided 1x1 conv+BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(cin, cout, stride=stride), nn.ReLU(), *conv_bn(cout, cout)
        )
        reshape = stride != 1 or cin != cout
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if reshape else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem 32, two 32-wide blocks, a stride-2 block to 64, one more 64 block, GAP, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(1, 32)
        self.blocks = nn.Sequential(
            BasicBlock(32, 32), BasicBlock(32, 32), BasicBlock(32, 64, 2), BasicBlock(64, 64)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, depthwise 3x3, linear 1x1 projection, optional Add."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            *conv_bn(cin, hidden, 1), nn.ReLU6(),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(),
            *conv_bn(hidden, cout, 1),
        )  # fmt: skip
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """Tiny MobileNetV2: stem 16, four inverted residual blocks, 1x1 to 64, GAP, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 16), nn.ReLU6(),
            InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1),
            InvertedResidual(24, 32, 2), InvertedResidual(32, 32, 1),
            *conv_bn(32, 64, 1), nn.ReLU6(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


class InceptionBlock(nn.Module):
    """Three parallel branches (1x1; 1x1->3x3; maxpool->1x1) concatenated on channels."""

    def __init__(self, cin: int, b1: int, b2_mid: int, b2: int, b3: int) -> None:
        super().__init__()
        self.branch1 = conv_bn_relu(cin, b1, 1)
        self.branch2 = nn.Sequential(conv_bn_relu(cin, b2_mid, 1), conv_bn_relu(b2_mid, b2))
        self.branch3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_relu(cin, b3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x)], dim=1)


class Inception(nn.Module):
    """Stem 32 + maxpool, inception block (64 out), maxpool, inception block (96 out), GAP.

    The stem pool gives the 8x8 output enough receptive field for GAP to see whole digits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(1, 32), nn.MaxPool2d(2))
        self.block1 = InceptionBlock(32, 16, 16, 32, 16)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = InceptionBlock(64, 32, 32, 48, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(96, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.pool1(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SqueezeExcite(nn.Module):
    """Channel gate: GAP -> 1x1 reduce by 4 -> ReLU -> 1x1 expand -> Sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SENet(nn.Module):
    """Conv-BN-ReLU stages 32/64-64/96, each followed by squeeze-excitation; GAP, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 32), SqueezeExcite(32), nn.MaxPool2d(2),
            conv_bn_relu(32, 64), conv_bn_relu(64, 64), SqueezeExcite(64), nn.MaxPool2d(2),
            conv_bn_relu(64, 96), SqueezeExcite(96),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(96, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


class Attention(nn.Module):
    """Multi-head self-attention written out the way most ViT code does it: separate Linear
    q/k/v, reshape to (batch, tokens, heads, head dim), softmax(q kᵀ / √d) v, out projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer on 32x32 digits: 4x4 patches (64 tokens of width 64), learned position
    embeddings, 4 pre-LN blocks of 4 heads, final LayerNorm, mean over tokens, Linear."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 4, stride=4)
        self.position = nn.Parameter(torch.zeros(1, 64, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.position
        return self.fc(self.norm(self.blocks(tokens)).mean(dim=1))


class BiLSTM(nn.Module):
    """Rows as a sequence: 32 steps of 32 pixels → 2-layer bidirectional LSTM (hidden 64) →
    Linear on the last layer's final states of both directions, cat(h_n[-2], h_n[-1])."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, hidden, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x.squeeze(1).transpose(0, 1))  # (32 rows, batch, 32 pixels)
        return self.fc(torch.cat([h[-2], h[-1]], dim=1))
