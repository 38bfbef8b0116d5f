"""SliceGPT-style cob on decoder-only language models: token embeddings and RMSNorms.

A tiny LLaMA-style model (token embedding, pre-RMSNorm blocks written as HF's
`x.to(float32) * rsqrt(mean(x²) + ε)` then `γ * x`, gated SiLU MLP, final norm, LM head) and the
same model with LayerNorms (GPT-2-style), exported by torch's legacy and dynamo exporters:

- every RMSNorm is found (the legacy exporter's `1 / √` then Mul, the dynamo's form), the
  same-type Casts around it are gone after load, and the conversion is exact;
- the residual stream is one rotatable group whose writers include the embedding (an inserted
  MatMul, taken back into the table on export);
- cob at full width rotates the stream and changes nothing, and writes the rotated table;
- where every writer spans k of d dimensions, keeping k is exact and shrinks the table to k
  columns (also behind Gemma's scale of the embeddings by √d), keeping k − 1 is not.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close, max_deviation

import onnxprune
from onnxprune.graph.analyze import analyze
from onnxprune.graph.layernorm import find_layernorms, to_rmsnorm
from onnxprune.graph.load import export, normalize
from onnxprune.ops.rmsnorm import rms_square

torch = pytest.importorskip("torch")
nn = torch.nn
D, HEADS, VOCAB, TOKENS = 16, 2, 40, 6


class _RMSNorm(nn.Module):
    """As HF's LlamaRMSNorm writes it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


class _Block(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.n1, self.n2 = norm(D), norm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down = nn.Linear(2 * D, D, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        h, hd = self.n1(x), D // HEADS
        q, k, v = (f(h).view(b, n, HEADS, hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, n, D))
        h = self.n2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class _Decoder(nn.Module):
    def __init__(self, norm: type[nn.Module], scale: float = 1.0) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, D), nn.Linear(D, VOCAB, bias=False)
        self.blocks = nn.Sequential(_Block(norm), _Block(norm))
        self.norm, self.scale = norm(D), scale

    def forward(self, ids):
        x = self.embed(ids)
        if self.scale != 1.0:  # Gemma: the embeddings times √d
            x = x * self.scale
        return self.head(self.norm(self.blocks(x)))


def _decoder(norm: str, rank: int | None = None) -> nn.Module:
    """Seeded weights and norm scales; with `rank`, the embedding table and every stream
    writer's output columns lie in one random rank-dim subspace (so does the stream)."""
    torch.manual_seed(0)
    scale = D**0.5 if norm == "rms-scaled" else 1.0
    model = _Decoder(nn.LayerNorm if norm == "layer" else _RMSNorm, scale).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _RMSNorm | nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
        if rank is not None:
            basis = torch.randn(D, rank)
            model.embed.weight.copy_(torch.randn(VOCAB, rank) @ basis.T)
            for layer in (m for b in model.blocks for m in (b.o, b.down)):
                layer.weight.copy_(basis @ torch.randn(rank, layer.weight.shape[1]) / rank**0.5)
    return model


def _export(model: nn.Module, path, exporter: str) -> onnx.ModelProto:
    ids = torch.randint(0, VOCAB, (2, TOKENS))
    if exporter == "dynamo":
        batch = {0: torch.export.Dim("batch", min=2)}
        torch.onnx.export(model, (ids,), str(path), dynamo=True, verbose=False,
                          dynamic_shapes=(batch,))  # fmt: skip
    else:
        torch.onnx.export(model, (ids,), str(path), dynamo=False, opset_version=17,
                          input_names=["ids"], dynamic_axes={"ids": {0: "batch"}})  # fmt: skip
    return onnx.load(str(path))


def _feeds(model: onnx.ModelProto, n: int, seed: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(n, TOKENS))
    return {model.graph.input[0].name: ids.astype(np.int64)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The decoders through both exporters, exported once."""
    root = tmp_path_factory.mktemp("decoders")
    cache: dict[tuple, onnx.ModelProto] = {}

    def get(norm: str, exporter: str, rank: int | None = None) -> onnx.ModelProto:
        key = (norm, exporter, rank)
        if key not in cache:
            cache[key] = _export(_decoder(norm, rank), root / f"d{len(cache)}.onnx", exporter)
        return cache[key]

    return get


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_rmsnorms_are_found_without_their_casts_and_converted_exactly(exported, exporter):
    model = exported("rms", exporter)
    graph = normalize(model)
    assert not any(node.op == "Cast" for node in graph.nodes)  # float32 → float32: no-ops
    norms = list(find_layernorms(graph))
    assert len(norms) == 5 and not any(norm.centred for norm in norms)
    squares = [n for n in graph.nodes if n.op == "Pow"]
    assert all(rms_square(n, n.inputs[0].name, 2) is not None for n in squares)  # what cob passes
    conversion = to_rmsnorm(graph)
    assert len(conversion.converted) == 5 and not conversion.kept
    converted = export(conversion.graph)
    onnx.checker.check_model(converted, full_check=True)
    assert_outputs_close(model, converted, _feeds(model, 2, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_the_stream_is_one_rotatable_group_with_the_embedding_as_a_writer(exported, norm):
    groups = analyze(to_rmsnorm(normalize(exported(norm, "legacy"))).graph)
    stream = [g for g in groups if len(g.producers) == 5]
    assert len(stream) == 1 and stream[0].rotatable
    assert sum(p.endswith("__centre") for p in stream[0].producers) == 1  # the embedding's
    assert len(stream[0].invariants) == 5


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_full_width_cob_rotates_the_stream_and_the_table_and_changes_nothing(
    exported, norm, exporter
):
    model = exported(norm, exporter)
    result = onnxprune.prune(model, method="cob", ratio=0.0, data=_feeds(model, 64, 0))
    stream = next(g for g in result.groups if len(g.producers) == 5)
    rotation = result.plans[stream.name].rotation
    assert rotation is not None and not np.allclose(np.abs(rotation), np.eye(D), atol=1e-2)
    said = {"rms": "5 RMSNorm(s) with γ folded", "layer": "5 LayerNorm(s) turned into RMSNorms"}
    assert any(said[norm] in note for note in result.report.notes)
    nodes = result.model.graph.node
    assert not any(n.name.endswith("__centre") for n in nodes)  # taken back into the table
    tables = [i for i in result.model.graph.initializer if list(i.dims) == [VOCAB, D]]
    assert any(i.name.endswith("__table") for i in tables)
    assert_outputs_close(model, result.model, _feeds(model, 4, 3), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("norm", ["rms", "rms-scaled"])
def test_slicing_a_stream_of_rank_k_to_k_is_exact_and_to_k_minus_1_is_not(exported, exporter, norm):
    """`rms-scaled`: Gemma's embeddings times √d enter the stream through the same table."""
    model = exported(norm, exporter, rank=10)
    calib, test = _feeds(model, 128, 0), _feeds(model, 8, 4)
    groups = analyze(to_rmsnorm(normalize(model)).graph)
    others = [f"^{re.escape(g.name)}$" for g in groups if len(g.producers) != 5]
    # every group but the stream (the heads, the MLPs) keeps its width
    options = {"method": "cob", "round_to": 1, "data": calib, "exclude": others}
    sliced = onnxprune.prune(model, ratio=6 / D, **options)
    stream = next(g for g in sliced.groups if len(g.producers) == 5)
    assert len(sliced.plans[stream.name].keep) == 10
    table = next(i for i in sliced.model.graph.initializer if i.name.endswith("__table"))
    assert list(table.dims) == [VOCAB, 10]
    assert_outputs_close(model, sliced.model, test, atol=1e-4, rtol=1e-4)
    short = onnxprune.prune(model, ratio=7 / D, **options)
    assert max_deviation(model, short.model, test) > 1e-2
