"""LayerNorm → RMSNorm on mean-free streams and SliceGPT-style cob (graph/layernorm.py).

On tiny pre-LN (GPT/ViT-style) and post-LN (BERT-style) transformers exported by torch's legacy
(opset 17 LayerNormalization, opset 14 primitive pattern) and dynamo exporters, and with their
norms written as tf2onnx writes Keras' LayerNormalization:

- the converted graph computes the original's function to float rounding, with no LayerNorm left;
- the pre-LN residual stream becomes one rotatable group holding every writer; post-LN streams
  are one group per norm, each written by the inserted affine of the norm before it;
- cob at full width (a nontrivial rotation of every stream) leaves the output unchanged;
- where the stream spans only k of d dimensions, cob keeping k is exact, keeping k − 1 is not;
- a stream read outside norms (post-LN without an embedding norm) keeps its LayerNorms, saying why;
- the converted norms divide by the original width after slicing (kind "rmssum"), so
  `--rms-correction` scales by the kept energy alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close, max_deviation

import onnxprune
from onnxprune.graph.analyze import analyze
from onnxprune.graph.layernorm import find_layernorms, to_rmsnorm
from onnxprune.graph.load import export, normalize

torch = pytest.importorskip("torch")
nn = torch.nn
D, HEADS, FEATURES, TOKENS = 16, 2, 8, 5


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        hd = D // HEADS
        q, k, v = (f(x).view(b, n, HEADS, hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, n, D))


class _Block(nn.Module):
    def __init__(self, post: bool, rows: bool = False) -> None:
        super().__init__()
        self.post, self.rows, self.ln1, self.ln2 = post, rows, nn.LayerNorm(D), nn.LayerNorm(D)
        self.att = _Attention()
        self.ff = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        if self.post:
            x = self.ln1(x + self.att(x))
            return self.ln2(x + self.ff(x))
        x = x + self.att(self.ln1(x))
        if self.rows:  # OPT: the FFN and its residual on the tokens as rows, viewed back
            shape, x = x.shape, x.reshape(-1, x.size(-1))
            return (x + self.ff(self.ln2(x))).view(shape)
        return x + self.ff(self.ln2(x))


class _Transformer(nn.Module):
    """Input Linear, 2 blocks, mean pooling, head. Post-LN (BERT) normalizes the embedding and
    has no final norm; pre-LN (GPT, ViT) has a final norm and none on the embedding."""

    def __init__(self, post: bool, embed_norm: bool = True, rows: bool = False) -> None:
        super().__init__()
        self.post, self.embed_norm = post, embed_norm
        self.inp, self.ln, self.head = nn.Linear(FEATURES, D), nn.LayerNorm(D), nn.Linear(D, 3)
        self.blocks = nn.Sequential(_Block(post, rows), _Block(post, rows))

    def forward(self, x):
        h = self.inp(x)
        if self.post:
            h = self.blocks(self.ln(h) if self.embed_norm else h)
        else:
            h = self.ln(self.blocks(h))
        return self.head(h.mean(1))


class _ViT(nn.Module):
    """Pre-LN ViT: 4×4 patches of an 8×8 image by a Conv, a class token, position embeddings,
    2 blocks, a final norm, the class token's features to the head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch, self.ln, self.head = nn.Conv2d(1, D, 4, 4), nn.LayerNorm(D), nn.Linear(D, 3)
        self.cls, self.pos = nn.Parameter(torch.randn(1, 1, D)), nn.Parameter(torch.randn(1, 5, D))
        self.blocks = nn.Sequential(_Block(False), _Block(False))

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.ln(self.blocks(h))[:, 0])


def _transformer(
    post: bool, *, embed_norm: bool = True, rank: int | None = None, rows: bool = False
):
    """Seeded weights with random LayerNorm affines; with `rank`, every stream writer's output
    columns lie in one random rank-dim subspace (so does the stream, once centred); with
    `rows`, the FFNs run on the tokens as rows (OPT)."""
    torch.manual_seed(0)
    model = _Transformer(post, embed_norm, rows).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.3)
        if rank is not None:
            basis = torch.randn(D, rank)
            for layer in [model.inp, *(m for b in model.blocks for m in (b.att.o, b.ff[2]))]:
                layer.weight.copy_(basis @ torch.randn(rank, layer.weight.shape[1]) / rank**0.5)
                layer.bias.copy_(basis @ torch.randn(rank) * 0.1)
    return model


def _export(model, path, exporter: str) -> onnx.ModelProto:
    x = torch.randn(2, TOKENS, FEATURES)
    if exporter == "dynamo":
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    else:
        opset = 14 if exporter == "primitive" else 17
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    proto = onnx.load(str(path))
    return _as_tf2onnx_norms(proto) if exporter == "tf2onnx" else proto


def _as_tf2onnx_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each LayerNormalization written as tf2onnx writes Keras' (GlobalAveragePool
    means over the last axis, x·s + (β − mean·s) with s = γ / √(var + ε)); every second norm
    as with `center=False` (no β: the shift is Neg(mean·s)), a different function."""
    nodes, k = [], 0
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            nodes.append(node)
            continue
        k += 1
        x, gamma, beta = node.input[:3]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        t = f"ln{k}_"
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.float32(eps), t + "eps"))
        make = onnx.helper.make_node
        nodes += [
            make("GlobalAveragePool", [x], [t + "mean"]),
            make("Sub", [x, t + "mean"], [t + "centred"]),
            make("Mul", [t + "centred", t + "centred"], [t + "square"]),
            make("GlobalAveragePool", [t + "square"], [t + "var"]),
            make("Add", [t + "var", t + "eps"], [t + "var_eps"]),
            make("Sqrt", [t + "var_eps"], [t + "dev"]),
            make("Reciprocal", [t + "dev"], [t + "inv"]),
            make("Mul", [t + "inv", gamma], [t + "scale"]),
            make("Mul", [t + "mean", t + "scale"], [t + "mean_scaled"]),
            make("Mul", [x, t + "scale"], [t + "scaled"]),
            make("Sub", [beta, t + "mean_scaled"], [t + "shift"])
            if k % 2
            else make("Neg", [t + "mean_scaled"], [t + "shift"]),
            make("Add", [t + "scaled", t + "shift"], [node.output[0]]),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _feeds(model: onnx.ModelProto, n: int, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(n, TOKENS, FEATURES)).astype(np.float32)
    return {model.graph.input[0].name: x}


EXPORTERS = ("legacy", "primitive", "dynamo", "tf2onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The pre-LN and post-LN transformers through every exporter, exported once."""
    root = tmp_path_factory.mktemp("transformers")
    cache: dict[tuple, onnx.ModelProto] = {}

    def get(post: bool, exporter: str, **options) -> onnx.ModelProto:
        key = (post, exporter, tuple(sorted(options.items())))
        if key not in cache:
            path = root / f"t{len(cache)}.onnx"
            cache[key] = _export(_transformer(post, **options), path, exporter)
        return cache[key]

    return get


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("post", [False, True], ids=["pre-ln", "post-ln"])
def test_conversion_is_exact_and_leaves_no_layernorm(exported, post, exporter):
    model = exported(post, exporter)
    graph = normalize(model)
    assert len(list(find_layernorms(graph))) == 5
    conversion = to_rmsnorm(graph)
    assert len(conversion.converted) == 5 and not conversion.kept
    converted = export(conversion.graph)
    onnx.checker.check_model(converted, full_check=True)
    assert not any(n.op_type == "LayerNormalization" for n in converted.graph.node)
    assert not any(norm.centred for norm in find_layernorms(conversion.graph))  # RMSNorms now
    assert_outputs_close(model, converted, _feeds(model, 2, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "tf2onnx"])
def test_pre_ln_stream_is_one_rotatable_group_of_every_writer(exported, exporter):
    groups = analyze(to_rmsnorm(normalize(exported(False, exporter))).graph)
    stream = [g for g in groups if len(g.producers) == 5]
    assert len(stream) == 1 and stream[0].rotatable
    assert len(stream[0].invariants) == 5  # every converted norm is passed as an RMSNorm
    # 2 × (q, k, v, ff.0) read the stream through weights, and the final norm's affine
    assert len(stream[0].consumers) == 9


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_stream_reshaped_to_rows_between_residual_adds_is_converted_and_one_group(
    exported, exporter
):
    """OPT reshapes the stream to rows (reading its shape) before the FFN's norm and views the
    FFN's residual sum back: every norm is still converted, the stream is one rotatable group
    of every writer, and full-width `cob` is the same function."""
    model = exported(False, exporter, rows=True)
    conversion = to_rmsnorm(normalize(model))
    assert len(conversion.converted) == 5 and not conversion.kept, conversion.kept
    stream = [g for g in analyze(conversion.graph) if len(g.producers) == 5]
    assert len(stream) == 1 and stream[0].rotatable, [g.reason for g in stream]
    result = onnxprune.prune(model, method="cob", ratio=0.0, data=_feeds(model, 64, 0))
    assert_outputs_close(model, result.model, _feeds(model, 2, 3), atol=1e-5, rtol=1e-4)


def test_post_ln_streams_are_one_group_per_norm(exported):
    groups = analyze(to_rmsnorm(normalize(exported(True, "legacy"))).graph)
    streams = [g for g in groups if g.rotatable and g.invariants]
    # embedding → norm 1; then 4 residual sums, each of the previous norm's affine and a block
    assert [len(g.producers) for g in streams] == [1, 2, 2, 2, 2]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "tf2onnx"])
@pytest.mark.parametrize("post", [False, True], ids=["pre-ln", "post-ln"])
def test_full_width_cob_rotates_every_stream_and_changes_nothing(exported, post, exporter):
    model = exported(post, exporter)
    result = onnxprune.prune(model, method="cob", ratio=0.0, data=_feeds(model, 64, 0))
    rotated = [p for p in result.plans.values() if p.rotation is not None]
    assert len(rotated) >= (5 if post else 2)
    assert all(not np.allclose(np.abs(p.rotation), np.eye(len(p.keep)), atol=1e-2) for p in rotated)
    assert_outputs_close(model, result.model, _feeds(model, 2, 3), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exporter", ["legacy", "tf2onnx"])
def test_slicing_a_stream_of_rank_k_to_k_is_exact_and_to_k_minus_1_is_not(exported, exporter):
    model = exported(False, exporter, rank=10)
    calib, test = _feeds(model, 256, 0), _feeds(model, 8, 4)
    options = {"method": "cob", "round_to": 1, "exclude": [r"ff\.0", "gamma"], "data": calib}
    sliced = onnxprune.prune(model, ratio=6 / D, **options)
    stream = next(g for g in sliced.groups if len(g.producers) == 5)
    assert len(sliced.plans[stream.name].keep) == 10
    assert_outputs_close(model, sliced.model, test, atol=1e-4, rtol=1e-4)
    short = onnxprune.prune(model, ratio=7 / D, **options)
    assert max_deviation(model, short.model, test) > 1e-2


def test_a_stream_read_outside_norms_keeps_its_layernorms_and_says_why(exported):
    model = exported(True, "legacy", embed_norm=False)
    conversion = to_rmsnorm(normalize(model))
    assert conversion.converted == ()
    first, why = conversion.kept[0]
    assert "also read by MatMul" in why and "q/MatMul" in why
    assert all("stays" in why for _, why in conversion.kept[1:])
    result = onnxprune.prune(model, method="cob", ratio=0.25, data=_feeds(model, 64, 0))
    kept = len(conversion.kept)
    assert kept == 4  # 2 blocks × 2; no embedding or final norm
    assert any(f"{kept} LayerNorm(s) stay" in note for note in result.report.notes)
    assert [n.op_type for n in result.model.graph.node].count("LayerNormalization") == kept


@pytest.mark.parametrize("opset", [14, 17])
def test_a_norm_that_is_the_graph_output_keeps_its_name_and_affine(tmp_path, opset):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(FEATURES, D), nn.LayerNorm(D)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_(0.0, 0.3)
    x = torch.randn(2, TOKENS, FEATURES)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["y"])  # fmt: skip
    proto = onnx.load(str(tmp_path / "m.onnx"))
    conversion = to_rmsnorm(normalize(proto))
    assert len(conversion.converted) == 1
    converted = export(conversion.graph)
    assert [o.name for o in converted.graph.output] == ["y"]
    assert_outputs_close(proto, converted, _feeds(proto, 2, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_vit_stream_is_centred_by_one_inserted_matmul_and_sliced(tmp_path, exporter):
    torch.manual_seed(2)
    vit = _ViT().eval()
    x = torch.randn(2, 1, 8, 8)
    path = str(tmp_path / "vit.onnx")
    if exporter == "dynamo":
        torch.onnx.export(vit, (x,), path, dynamo=True, verbose=False)
    else:
        torch.onnx.export(vit, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    model = onnx.load(path)
    rng = np.random.default_rng(0)
    feeds = {model.graph.input[0].name: rng.normal(size=(64, 1, 8, 8)).astype(np.float32)}
    test = {k: v[:2] for k, v in feeds.items()}
    conversion = to_rmsnorm(normalize(model))
    assert len(conversion.converted) == 5
    centring = [n for n in conversion.graph.nodes if n.name.endswith("__centre")]
    assert len(centring) == 1  # after the class-token Concat
    assert_outputs_close(model, export(conversion.graph), test, atol=1e-5, rtol=1e-5)
    stream = [g for g in analyze(conversion.graph) if len(g.producers) == 5]
    assert len(stream) == 1 and stream[0].rotatable
    assert stream[0].producers[0] == centring[0].name
    full = onnxprune.prune(model, method="cob", ratio=0.0, data=feeds)
    assert_outputs_close(model, full.model, test, atol=1e-5, rtol=1e-4)
    sliced = onnxprune.prune(model, method="cob", ratio=0.25, round_to=1, data=feeds)
    assert len(sliced.plans[stream[0].name].keep) == 12


def test_converted_norms_keep_their_divisor_so_the_rms_correction_is_energy_only(exported):
    model = exported(False, "legacy")
    stream = next(g for g in analyze(to_rmsnorm(normalize(model)).graph) if len(g.producers) == 5)
    assert {kind for kind, _ in stream.invariants} == {"rmssum"}
    options = {"method": "cob", "ratio": 0.25, "round_to": 1, "data": _feeds(model, 64, 0)}
    plan = onnxprune.prune(model, rms_correction=True, **options).plans[stream.name]
    # √(E_kept / E_all) < 1; a mean-divisor norm would also get √(16 / 12) > 1.15
    assert 0.9 < plan.info["rms_scale"] < 1.0


@pytest.mark.parametrize("bias", ["none", "empty", "given"])
def test_a_gemm_reader_takes_the_beta_shift_into_its_bias_input(bias):
    """β folded into a Gemm reader: C ← beta·C + shift, beta ← 1, and C is input 2 whether the
    Gemm had one, none, or an empty optional one in its place."""
    import onnx_graphsurgeon as gs

    from onnxprune.graph.layernorm import _add_gemm_bias

    rng = np.random.default_rng(0)
    c, shift = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4)
    extra = {"none": [], "empty": [gs.Variable.empty()], "given": [gs.Constant("c", c)]}[bias]
    inputs = [gs.Variable("a", np.float32, (2, 3)), gs.Constant("w", np.ones((3, 4), np.float32))]
    out = gs.Variable("y", np.float32)
    node = gs.Node("Gemm", "g", attrs={"beta": 0.5}, inputs=inputs + extra, outputs=[out])
    _add_gemm_bias(node, shift, np.dtype(np.float32))
    assert len(node.inputs) == 3 and node.attrs["beta"] == 1.0
    expected = shift + (0.5 * c if bias == "given" else 0.0)
    np.testing.assert_allclose(node.inputs[2].values, expected, atol=1e-6 * np.abs(expected).max())
