"""Swin Transformer patterns (torchvision's code, written small): shifted-window attention with
Swin's packed q/k/v (graph/packed.py), window partition and reverse Reshapes that keep the
channel axis (ops/reshape.py), the cyclic shift's Concat of two slices on a spatial axis and
patch merging's Concat of strided spatial slices on the channels (ops/concat_split.py).

Each module is exported by torch's legacy exporter with a dynamic batch, like the zoo's Swin-T:
its Reshape targets are Concats of shape pieces.
"""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest
import torch
from conftest import assert_outputs_close, max_deviation
from torch import nn
from torch.nn import functional as F

import onnxprune
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import normalize

GRID, WINDOW, SHIFT = 4, 2, 1
DIM, HEADS, HIDDEN = 12, 3, 24
HEAD_DIM = DIM // HEADS
TOKENS = WINDOW * WINDOW


def _partition(x: torch.Tensor) -> torch.Tensor:
    """(B, G, G, C) → (B·windows, window², C), as torchvision's shifted_window_attention."""
    b, c, n = x.shape[0], x.shape[-1], GRID // WINDOW
    x = x.view(b, n, WINDOW, n, WINDOW, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b * n * n, TOKENS, c)


def _reverse(x: torch.Tensor, b: int) -> torch.Tensor:
    """The inverse of `_partition`."""
    c, n = x.shape[-1], GRID // WINDOW
    x = x.view(b, n, n, WINDOW, WINDOW, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, GRID, GRID, c)


def _shift_mask() -> torch.Tensor:
    """torchvision's attention mask for shifted windows: -100 between tokens of different
    regions, (windows, tokens, tokens)."""
    regions = torch.zeros(GRID, GRID)
    bounds = (slice(0, -WINDOW), slice(-WINDOW, -SHIFT), slice(-SHIFT, None))
    count = 0
    for h in bounds:
        for w in bounds:
            regions[h, w] = count
            count += 1
    windows = _partition(regions[None, :, :, None]).squeeze(-1)
    mask = windows[:, None, :] - windows[:, :, None]
    return mask.masked_fill(mask != 0, -100.0)


class SwinBlock(nn.Module):
    """Tokens (B, 4, 4, 12) → a shifted-window Swin block (LayerNorm, 3-head window attention
    with relative position bias and shift mask, LayerNorm, MLP) → mean → 4 class scores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.bias = nn.Parameter(torch.randn(HEADS, TOKENS, TOKENS))
        self.fc1, self.fc2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, 4)
        self.register_buffer("mask", _shift_mask())

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = torch.roll(x, shifts=(-SHIFT, -SHIFT), dims=(1, 2))
        windows = _partition(x)
        qkv = self.qkv(windows).reshape(windows.size(0), TOKENS, 3, HEADS, HEAD_DIM)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q * HEAD_DIM**-0.5).matmul(k.transpose(-2, -1)) + self.bias
        count = self.mask.shape[0]
        logits = logits.view(windows.size(0) // count, count, HEADS, TOKENS, TOKENS)
        logits = (logits + self.mask.unsqueeze(1).unsqueeze(0)).view(-1, HEADS, TOKENS, TOKENS)
        y = F.softmax(logits, dim=-1).matmul(v).transpose(1, 2).reshape(-1, TOKENS, DIM)
        y = _reverse(self.proj(y), b)
        return torch.roll(y, shifts=(SHIFT, SHIFT), dims=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(dim=(1, 2)))

    def duplicate_head(self) -> SwinBlock:
        """Head 2 := head 0: its q, k and v columns and its relative position bias."""
        with torch.no_grad():
            for third in range(3):
                lo = third * DIM
                twin, rows = slice(lo, lo + HEAD_DIM), slice(lo + 2 * HEAD_DIM, lo + DIM)
                self.qkv.weight[rows] = self.qkv.weight[twin]
                self.qkv.bias[rows] = self.qkv.bias[twin]
            self.bias[2] = self.bias[0]
        return self

    def duplicate_neurons(self) -> SwinBlock:
        """MLP hidden neurons 16 … 23 := 0 … 7."""
        with torch.no_grad():
            self.fc1.weight[16:] = self.fc1.weight[:8]
            self.fc1.bias[16:] = self.fc1.bias[:8]
        return self


def _inputs(shape: tuple[int, ...], n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


BLOCK_SHAPE = (GRID, GRID, DIM)


def _groups(model: onnx.ModelProto) -> list:
    return analyze(normalize(model))


def test_swin_block_heads_and_neurons_are_groups():
    """Swin's packed q/k/v is taken apart (three projections, the heads one group of 3 × 4
    features through the relative position bias, the window regrouping for the shift mask and
    the merge), the MLP's hidden neurons are a group, and the residual stream is refused at a
    LayerNorm, not at the window partition, the cyclic shift or the window reverse."""
    model = graphs.export_torch(SwinBlock(), (2, *BLOCK_SHAPE))
    graph = normalize(model)
    assert not [n for n in graph.nodes if n.op == "Gather" and len(n.inputs[0].shape) == 5]
    groups = analyze(graph)
    heads = next(g for g in groups if g.head_dim > 1)
    assert heads.prunable, heads.reason
    assert (heads.channels, heads.head_dim, len(heads.producers)) == (HEADS, HEAD_DIM, 3)
    mlp = next(g for g in groups if g.channels == HIDDEN)
    assert mlp.prunable, mlp.reason
    stream = [g for g in groups if g.channels == DIM and g.head_dim == 1]
    assert stream and all("no prunable producer" in (g.reason or "") for g in stream)


def test_swin_block_ratio_zero_is_exact():
    model = graphs.export_torch(SwinBlock(), (2, *BLOCK_SHAPE))
    x = _inputs(BLOCK_SHAPE)
    result = onnxprune.prune(model, method="id", ratio=0.0, data={"input": x}, verify=False)
    assert_outputs_close(model, result.model, {"input": _inputs(BLOCK_SHAPE, 5, 1)}, atol=1e-6)


def _prune_one(model: onnx.ModelProto, group, exclude: str, method: str, ratio: float):
    x = _inputs(BLOCK_SHAPE)
    return onnxprune.prune(
        model,
        method=method,
        ratio=ratio,
        data={"input": x},
        round_to=1,
        compensate="none",
        recalibrate=False,
        exclude=[exclude],
        verify=False,
    )


def test_swin_duplicated_head_is_removed_exactly():
    """A head duplicated in q, k, v and the relative position bias is removed by ID with its
    map folded into the out projection: the same function at another batch size (every head
    count in the split, mask regrouping and merge targets edited); removing a head without
    the map changes the output."""
    model = graphs.export_torch(SwinBlock().duplicate_head(), (2, *BLOCK_SHAPE))
    groups = _groups(model)
    heads = next(g for g in groups if g.head_dim > 1)
    mlp = next(g for g in groups if g.channels == HIDDEN)
    feeds = {"input": _inputs(BLOCK_SHAPE, 3, 7)}
    result = _prune_one(model, heads, mlp.name, "id", 1 / HEADS)
    assert len(result.plans[heads.name].keep) == HEADS - 1
    assert_outputs_close(model, result.model, feeds, atol=1e-5)
    plain = _prune_one(model, heads, mlp.name, "activation", 1 / HEADS)
    assert max_deviation(model, plain.model, feeds) > 1e-3


def test_swin_duplicated_neurons_are_removed_exactly():
    model = graphs.export_torch(SwinBlock().duplicate_neurons(), (2, *BLOCK_SHAPE))
    groups = _groups(model)
    heads = next(g for g in groups if g.head_dim > 1)
    mlp = next(g for g in groups if g.channels == HIDDEN)
    result = _prune_one(model, mlp, heads.name, "id", 8 / HIDDEN)
    assert len(result.plans[mlp.name].keep) == HIDDEN - 8
    assert_outputs_close(model, result.model, {"input": _inputs(BLOCK_SHAPE, 3, 7)}, atol=1e-5)


WIDE, SMALL = 8, 4
STREAM_SHAPE = (GRID, GRID, SMALL)


class ChannelsLast(nn.Module):
    """(B, 4, 4, 4) → Linear → cyclic shift → window partition → Linear per window → window
    reverse → shift back → patch merging (strided 2×2 slices joined on the channels, optionally
    a LayerNorm) → Linear 4C → 6 → mean: two channels-last groups without a norm between."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed, self.window = nn.Linear(SMALL, WIDE), nn.Linear(WIDE, WIDE)
        self.norm = nn.LayerNorm(4 * WIDE) if norm else nn.Identity()
        self.reduction = nn.Linear(4 * WIDE, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = torch.roll(self.embed(x), shifts=(-SHIFT, -SHIFT), dims=(1, 2))
        x = _reverse(self.window(_partition(x)), b)
        x = torch.roll(x, shifts=(SHIFT, SHIFT), dims=(1, 2))
        parts = (x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2])
        merged = self.norm(torch.cat(parts, -1))
        return self.reduction(merged).mean(dim=(1, 2))

    def duplicate_channels(self) -> ChannelsLast:
        """Channel 7 := channel 0 of both Linears before the merge."""
        with torch.no_grad():
            for linear in (self.embed, self.window):
                linear.weight[7] = linear.weight[0]
                linear.bias[7] = linear.bias[0]
        return self


def test_window_partition_shift_and_patch_merging_pass_channels():
    """Both groups pass the cyclic shift and the window partition/reverse (channel entries of
    the targets edited) and patch merging's Concat (four segments of the reduction's rows): a
    duplicated channel of each is removed exactly by ID, and ratio 0 is exact."""
    model = graphs.export_torch(ChannelsLast().duplicate_channels(), (2, *STREAM_SHAPE))
    groups = _groups(model)
    assert [g.channels for g in groups if g.prunable] == [WIDE, WIDE]
    x, feeds = _inputs(STREAM_SHAPE), {"input": _inputs(STREAM_SHAPE, 3, 2)}
    options = dict(data={"input": x}, round_to=1, compensate="none", verify=False)
    same = onnxprune.prune(model, method="id", ratio=0.0, **options)
    assert_outputs_close(model, same.model, feeds, atol=1e-6)
    result = onnxprune.prune(model, method="id", ratio=1 / WIDE, recalibrate=False, **options)
    assert [len(p.keep) for p in result.plans.values()] == [WIDE - 1] * 2
    assert_outputs_close(model, result.model, feeds, atol=1e-5)


def test_patch_merging_layernorm_is_refused_with_its_reason():
    model = graphs.export_torch(ChannelsLast(norm=True), (2, *STREAM_SHAPE))
    embed, window = (g for g in _groups(model) if g.channels == WIDE)
    assert embed.prunable, embed.reason
    assert not window.prunable and "LayerNormalization" in window.reason


class MovedChannels(nn.Module):
    """Linear → a Reshape (B, 16, 8) → (B, 8, 16) that moves the channels into the tokens, or
    a Concat on the tokens with a constant: neither keeps the channels apart."""

    def __init__(self, concat: bool) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed, self.out = nn.Linear(SMALL, WIDE), nn.Linear(16 if not concat else WIDE, 3)
        self.concat = concat
        self.register_buffer("extra", torch.randn(1, 1, WIDE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).reshape(x.shape[0], 16, WIDE)
        if self.concat:
            x = torch.cat([x, self.extra.expand(x.shape[0], 1, WIDE)], dim=1)
        else:
            x = x.reshape(x.shape[0], WIDE, 16)
        return self.out(x).mean(dim=1)


@pytest.mark.parametrize("concat", [False, True], ids=["reshape", "concat"])
def test_moving_the_channels_is_refused(concat):
    model = graphs.export_torch(MovedChannels(concat), (2, *STREAM_SHAPE))
    embed = next(g for g in _groups(model) if g.channels == WIDE)
    assert not embed.prunable
    assert ("tied elementwise" if concat else "does not flatten") in embed.reason
