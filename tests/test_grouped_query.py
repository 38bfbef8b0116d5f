"""Grouped-query attention (LLaMA, Qwen2, Mistral, Phi-3): a key/value head and its n_rep query
heads are one prunable channel.

transformers' `repeat_kv` (Unsqueeze → Expand → Reshape) is loaded as a repeating Gather
(graph/repeat_kv.py); the Gather's channel rule carries each key/value head on to its n_rep
query heads; Phi-3's packed q|k|v Linear (parts of unequal widths) is taken apart at load
(graph/packed.py). A duplicated key/value group (its key, value and query heads copies of another's)
is removed exactly by ID, with both exporters and at token counts the fit never saw.
"""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from conftest import assert_outputs_close, max_deviation
from torch import nn

import onnxprune
from onnxprune.graph.analyze import analyze
from onnxprune.graph.headdims import Refused, head_sites
from onnxprune.graph.load import normalize
from onnxprune.graph.rewrite import rewrite
from onnxprune.plan import Plan

TOKENS, DIM, HEADS, KV_HEADS, HEAD_DIM = 5, 16, 4, 2, 4
N_REP = HEADS // KV_HEADS


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: (B, Hkv, S, D) → (B, Hkv·n_rep, S, D)."""
    batch, heads, tokens, dim = x.shape
    expanded = x[:, :, None, :, :].expand(batch, heads, n_rep, tokens, dim)
    return expanded.reshape(batch, heads * n_rep, tokens, dim)


class GroupedQueryAttention(nn.Module):
    """LLaMA's attention (with rotary positions unless `rotary` is False): 4 query heads share
    2 key/value heads; then the out projection, the mean over tokens and 3 scores."""

    def __init__(self, rotary: bool = True, packed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.rotary, self.packed = rotary, packed
        widths = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)
        if packed:  # Phi-3's qkv_proj, sliced in three
            self.qkv = nn.Linear(DIM, sum(widths), bias=False)
        else:
            self.q, self.k, self.v = (nn.Linear(DIM, w, bias=False) for w in widths)
        self.parts = np.cumsum([0, *widths]).tolist()
        self.o = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.fc = nn.Linear(DIM, 3)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, HEAD_DIM)
        q, k, v = (p.view(shape).transpose(1, 2) for p in self._project(x))
        positions = torch.arange(x.shape[1], dtype=torch.float32)
        angles = torch.cat([positions[:, None] * self.inv_freq[None]] * 2, dim=-1)
        cos, sin = angles.cos()[None, None], angles.sin()[None, None]
        if self.rotary:
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = _repeat_kv(k, N_REP), _repeat_kv(v, N_REP)
        scores = (q @ k.transpose(2, 3)) * HEAD_DIM**-0.5
        heads = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(*x.shape[:-1], -1)
        return self.fc(self.o(heads).mean(dim=1))

    def _project(self, x: torch.Tensor) -> list[torch.Tensor]:
        """q, k, v: three Linears (LLaMA), or one packed Linear sliced in three (Phi-3)."""
        if not self.packed:
            return [self.q(x), self.k(x), self.v(x)]
        qkv = self.qkv(x)
        return [qkv[..., lo:hi] for lo, hi in zip(self.parts[:-1], self.parts[1:], strict=True)]

    def _weights(self) -> list[torch.Tensor]:
        if not self.packed:
            return [self.q.weight, self.k.weight, self.v.weight]
        w = self.qkv.weight
        return [w[lo:hi] for lo, hi in zip(self.parts[:-1], self.parts[1:], strict=True)]

    def duplicate_group(self) -> GroupedQueryAttention:
        """Key/value head 1 := head 0, and its query heads 2, 3 := query heads 0, 1."""
        q, k, v = self._weights()
        width = N_REP * HEAD_DIM
        with torch.no_grad():
            q[width:] = q[:width]
            for p in (k, v):
                p[HEAD_DIM:] = p[:HEAD_DIM]
        return self


def _export(module: nn.Module, exporter: str, path) -> onnx.ModelProto:
    return graphs.export_tokens(module, (2, TOKENS, DIM), exporter, path)


def _inputs(n: int, tokens: int = TOKENS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, tokens, DIM)).astype(np.float32)


@pytest.fixture(
    scope="module",
    params=[("legacy", False), ("dynamo", False), ("legacy", True), ("dynamo", True)],
    ids=["legacy", "dynamo", "packed-legacy", "packed-dynamo"],
)
def exported(request, tmp_path_factory):
    """(plain, duplicated) exports; `packed`: Phi-3's one q|k|v Linear of unequal parts."""
    exporter, packed = request.param
    path = tmp_path_factory.mktemp("gqa") / f"{exporter}.onnx"
    plain = _export(GroupedQueryAttention(packed=packed), exporter, path)
    duplicated = _export(GroupedQueryAttention(packed=packed).duplicate_group(), exporter, path)
    return plain, duplicated


def _heads(model: onnx.ModelProto):
    return next(g for g in analyze(normalize(model)) if g.head_dim > 1)


def test_repeat_kv_loads_as_a_repeating_gather(exported):
    """No Expand is left of repeat_kv: the key and the value each reach the attention through
    a Gather of their head axis with indices [0, 0, 1, 1]."""
    graph = normalize(exported[0])
    gathers = [n for n in graph.nodes if n.op == "Gather" and n.name.endswith("__repeat")]
    assert len(gathers) == 2
    for gather in gathers:
        np.testing.assert_array_equal(gather.inputs[1].values, np.repeat(np.arange(KV_HEADS), 2))
    assert not any(n.op == "Expand" for n in graph.nodes)


def test_a_key_value_head_and_its_query_heads_are_one_channel(exported):
    heads = _heads(exported[0])
    assert heads.prunable, heads.reason
    assert heads.channels == KV_HEADS and heads.head_dim == N_REP * HEAD_DIM
    assert len(heads.producers) == 3 and len(heads.consumers) == 1
    widths = {e.node: e.spatial for e in heads.edits if e.role == "out"}
    assert sorted(widths.values()) == [HEAD_DIM, HEAD_DIM, N_REP * HEAD_DIM]


def test_the_rewrite_keeps_the_chosen_groups_in_every_projection_and_the_gathers(exported):
    """Keeping group 1 only: q keeps its columns 8…15, k and v their columns 4…7, the out
    projection its rows 8…15, and both Gathers read head 0 twice."""
    graph = normalize(exported[0])
    heads = next(g for g in analyze(graph) if g.head_dim > 1)
    before = {n.name: n.inputs[1].values for n in graph.nodes if n.name in heads.producers}
    pruned = rewrite(graph, (heads,), {heads.name: Plan(keep=np.array([1]))})
    nodes = {n.name: n for n in pruned.nodes}
    for name, weight in before.items():
        width = weight.shape[1] // KV_HEADS
        np.testing.assert_array_equal(nodes[name].inputs[1].values, weight[:, width:])
    out = next(n for n in pruned.nodes if n.name == heads.consumers[0]).inputs[1].values
    original = next(n for n in graph.nodes if n.name == heads.consumers[0]).inputs[1].values
    np.testing.assert_array_equal(out, original[N_REP * HEAD_DIM :])
    gathers = [n for n in pruned.nodes if n.op == "Gather" and n.name.endswith("__repeat")]
    assert [g.inputs[1].values.tolist() for g in gathers] == [[0, 0], [0, 0]]


def test_a_duplicated_group_is_removed_exactly(exported):
    """Ratio 0 is the same function; ID removing one of the two groups (the duplicate) folds
    its out-projection rows into the kept group's: the same function at a batch and token
    count the fit never saw; removing a group of the plain model by energy is not."""
    plain, duplicated = exported
    feeds = {"input": _inputs(3, TOKENS + 2, seed=5)}
    options = dict(round_to=1, data={"input": _inputs(48)}, verify=False)
    same = onnxprune.prune(duplicated, method="id", ratio=0.0, **options)
    assert_outputs_close(duplicated, same.model, feeds, rtol=1e-5)
    strict = dict(compensate="none", recalibrate=False, exclude=[_heads(plain).consumers[0]])
    result = onnxprune.prune(duplicated, method="id", ratio=0.5, **strict, **options)
    heads = next(g for g in result.groups if g.head_dim > 1)
    assert len(result.plans[heads.name].keep) == 1
    assert result.report.macs[1] < result.report.macs[0]
    assert_outputs_close(duplicated, result.model, feeds, rtol=1e-5)
    removed = onnxprune.prune(plain, method="activation", ratio=0.5, **strict, **options)
    assert max_deviation(plain, removed.model, feeds) > 1e-2


def test_grouped_query_heads_are_not_narrowed_within(tmp_path):
    """Query/key dims would need one rotation per key/value head shared by its n_rep query
    heads: `--heads dims` refuses the group, saying why (here without rotary positions, which
    would refuse it first)."""
    model = _export(GroupedQueryAttention(rotary=False), "legacy", tmp_path / "plain.onnx")
    graph = normalize(model)
    heads = next(g for g in analyze(graph) if g.head_dim > 1)
    with pytest.raises(Refused, match="grouped-query heads"):
        head_sites(graph, heads)


def test_a_gather_selecting_channels_is_still_refused():
    """A Gather of the channel axis that is not a repetition in order blocks the group."""
    x = gs.Variable("input", np.float32, (2, 4))
    w = gs.Constant("w", np.ones((4, 4), np.float32))
    h, g, y = (
        gs.Variable(n, np.float32, s) for n, s in (("h", (2, 4)), ("g", (2, 4)), ("y", (2, 3)))
    )
    nodes = [
        gs.Node("MatMul", "p", inputs=[x, w], outputs=[h]),
        gs.Node(
            "Gather",
            "sel",
            {"axis": 1},
            inputs=[h, gs.Constant("i", np.array([1, 0, 3, 2]))],
            outputs=[g],
        ),  # fmt: skip
        gs.Node(
            "MatMul", "c", inputs=[g, gs.Constant("w2", np.ones((4, 3), np.float32))], outputs=[y]
        ),
    ]
    graph = gs.Graph(nodes, [x], [y], opset=17)
    group = next(g for g in analyze(normalize(gs.export_onnx(graph))) if "p" in g.producers)
    assert not group.prunable and "selects along the channel axis" in group.reason
