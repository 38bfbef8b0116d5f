"""HF SegFormer's reshapes, as the legacy exporter writes them (graph/load.py):

- the attention output `a.reshape(B, -1, S, D)` on (B, H, S, D), S read from the queries'
  shape: every entry but the -1 is the input's own size, so the Reshape is bypassed;
- the Mix-FFN's tokens back to an image, `h.transpose(1, 2).view(B, C, H, W)` with B and C
  read from the tokens' shape (another tensor than the Reshape's input): B is the same symbolic
  batch (written 0, a copy), C a proven static size (written as a constant);
- the decode head's `proj(t).permute(0, 2, 1).reshape(B, -1, H, W)` with H, W read from a
  feature map: the -1, the channel count, is stated as its proven size.

Before, each of these blocked its group (the heads, the FFN neurons, the head's projection):
the legacy SegFormer export had 1 of 25 groups prunable. Here all three are prunable, ratio 0
is exact and duplicated heads, neurons and projections are removed exactly by ID."""

from __future__ import annotations

import graphs
import numpy as np
import torch
from conftest import assert_outputs_close
from torch import nn

import onnxprune

TOKENS, SIDE, DIM, HEADS, HIDDEN, PROJ = 16, 4, 8, 2, 12, 6


class SegformerStyle(nn.Module):
    """Tokens (B, 16, 8) of a 4×4 map → attention (2 heads) → Mix-FFN (Linear → depthwise conv
    on the map → GELU → Linear) → decode-head projection back to a map, joined with the FFN's
    map → 1×1 conv → pooled class scores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
        self.dw = nn.Conv2d(HIDDEN, HIDDEN, 3, padding=1, groups=HIDDEN)
        self.proj, self.head = nn.Linear(DIM, PROJ), nn.Conv2d(PROJ + HIDDEN, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        d = c // HEADS

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, -1, d).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = ((q @ k.transpose(-1, -2)) * d**-0.5).softmax(-1) @ v
        a = a.reshape(b, -1, q.shape[2], d)  # the same shape: bypassed at load
        x = x + self.o(a.transpose(1, 2).reshape(b, n, c))
        h = self.fc1(x)
        batch, _, channels = h.shape
        image = self.dw(h.transpose(1, 2).view(batch, channels, SIDE, SIDE))
        x = x + self.fc2(nn.functional.gelu(image).flatten(2).transpose(1, 2))
        p = self.proj(x).permute(0, 2, 1).reshape(b, -1, image.shape[2], image.shape[3])
        return self.head(torch.cat([p, image], dim=1)).mean(dim=(2, 3))

    def with_duplicates(self) -> SegformerStyle:
        """Head 1 := head 0, FFN neurons 6–11 := 0–5, projections 3–5 := 0–2."""
        with torch.no_grad():
            for linear in (self.q, self.k, self.v):
                linear.weight[4:] = linear.weight[:4]
                linear.bias[4:] = linear.bias[:4]
            for tensor in (self.fc1.weight, self.fc1.bias, self.dw.weight, self.dw.bias):
                tensor[6:] = tensor[:6]
            self.proj.weight[3:], self.proj.bias[3:] = self.proj.weight[:3], self.proj.bias[:3]
        return self


def _data(n: int, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, TOKENS, DIM)).astype(np.float32)
    return {"input": x}


def _groups(model) -> dict[str, object]:
    groups = onnxprune.analyze(model).groups
    return {name: next(g for g in groups if g.producers[0].startswith(f"/{name}/")) for name in
            ("q", "fc1", "proj")}  # fmt: skip


def test_heads_ffn_neurons_and_the_decode_projection_are_prunable():
    groups = _groups(graphs.export_torch(SegformerStyle(), (2, TOKENS, DIM)))
    for name, group in groups.items():
        assert group.prunable, (name, group.reason)
    assert (groups["q"].channels, groups["q"].head_dim) == (HEADS, DIM // HEADS)
    assert (groups["fc1"].channels, groups["proj"].channels) == (HIDDEN, PROJ)


def test_ratio_zero_is_exact_and_the_duplicates_go_exactly():
    model = graphs.export_torch(SegformerStyle().with_duplicates(), (2, TOKENS, DIM))
    options = {"round_to": 1, "data": _data(64, 0), "verify": False}
    unseen = _data(5, 1)  # another batch size than the export's and the fit's
    same = onnxprune.prune(model, method="id", ratio=0.0, **options)
    assert_outputs_close(model, same.model, unseen, atol=1e-5)
    halved = onnxprune.prune(model, method="id", ratio=0.5, **options)
    groups = _groups(model)
    widths = {name: len(halved.plans[g.name].keep) for name, g in groups.items()}
    assert widths == {"q": HEADS // 2, "fc1": HIDDEN // 2, "proj": PROJ // 2}
    assert halved.report.macs[1] < halved.report.macs[0]
    assert_outputs_close(model, halved.model, unseen, atol=1e-4)
