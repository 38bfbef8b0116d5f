"""Attention heads as channel groups (graph/attention.py), on a tiny exported attention layer.

The layer is the digits ViT's own `models.archs.Attention` (separate q/k/v Linears, heads by
reshape, softmax, out projection), exported by torch's legacy exporter with a dynamic batch, so
its head count sits in a Concat of shape pieces; the committed ViT exports (both exporters) run
through the reference-model tests of test_prune.py and test_rewrite.py.
"""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from conftest import assert_outputs_close, max_deviation, reference_path, run_model
from torch import nn

import onnxprune
from models.archs import Attention
from onnxprune.calib.data import Dataset
from onnxprune.calib.gather import gather
from onnxprune.config import PruneConfig
from onnxprune.errors import NothingToPruneError
from onnxprune.graph.analyze import analyze
from onnxprune.graph.groups import ChannelGroup
from onnxprune.graph.load import normalize
from onnxprune.methods.id import InterpolativeDecomposition

TOKENS, DIM, HEADS = 5, 6, 3
HEAD_DIM = DIM // HEADS


class TinyAttention(nn.Module):
    """Tokens (batch, 5, 6) → 3-head attention → mean over tokens → 4 class scores."""

    def __init__(self, softmax_over_heads: bool = False, sdpa: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = Attention(DIM, HEADS)
        self.fc = nn.Linear(DIM, 4)
        self.softmax_over_heads, self.sdpa = softmax_over_heads, sdpa

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """The per-head attention outputs (batch, tokens, heads, head dim) the out proj reads."""
        a = self.attn

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(x.shape[0], TOKENS, HEADS, HEAD_DIM).transpose(1, 2)

        q, k, v = split(a.q(x)), split(a.k(x)), split(a.v(x))
        if self.sdpa:  # torch's fused call: exported with the scale on q and k separately
            return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5
        axis = 1 if self.softmax_over_heads else -1
        return (scores.softmax(dim=axis) @ v).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.heads(x))

    def logits(self, heads: torch.Tensor) -> torch.Tensor:
        merged = heads.reshape(heads.shape[0], TOKENS, DIM)
        return self.fc(self.attn.proj(merged).mean(dim=1))


def _export(module: nn.Module) -> onnx.ModelProto:
    return graphs.export_torch(module, (2, TOKENS, DIM))


def _inputs(n: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, TOKENS, DIM)).astype(np.float32)


def _head_group(model: onnx.ModelProto):
    groups = analyze(normalize(model))
    return next(g for g in groups if g.head_dim > 1), groups


@pytest.mark.parametrize("sdpa", [False, True], ids=["explicit", "sdpa"])
def test_q_k_v_and_out_projection_form_one_group_of_heads(sdpa):
    model = _export(TinyAttention(sdpa=sdpa))
    heads, groups = _head_group(model)
    assert heads.prunable and not heads.coupled, heads.reason
    assert (heads.channels, heads.head_dim) == (HEADS, HEAD_DIM)
    assert heads.producers == ("/q/MatMul", "/k/MatMul", "/v/MatMul")
    assert heads.consumers == ("/proj/MatMul",)
    assert [t.spatial for t in heads.taps] == [HEAD_DIM]
    assert len([g for g in groups if g.head_dim > 1]) == 1


def test_softmax_over_the_head_axis_is_refused():
    heads, _ = _head_group(_export(TinyAttention(softmax_over_heads=True)))
    assert not heads.prunable and "Softmax" in heads.reason


def _without_softmax_axis(model: onnx.ModelProto, opset: int | None = None) -> onnx.ModelProto:
    """`model` with its Softmax axis left to the default (as tf2onnx writes it), declared at
    `opset` when given."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.attribute.remove(next(a for a in softmax.attribute if a.name == "axis"))
    if opset is not None:
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = opset
    return model


@pytest.mark.parametrize("opset, axis", [(17, -1), (13, -1), (12, 1), (11, 1)])
def test_a_softmax_without_axis_is_loaded_with_its_opset_default(opset, axis):
    """From opset 13 the default is the last axis; before, axis 1 (and all after it)."""
    graph = normalize(_without_softmax_axis(graphs.blocked_by("Softmax"), opset))
    assert next(n for n in graph.nodes if n.op == "Softmax").attrs["axis"] == axis


def test_heads_pass_a_softmax_without_axis():
    stated, _ = _head_group(_export(TinyAttention()))
    heads, _ = _head_group(_without_softmax_axis(_export(TinyAttention())))
    assert heads.prunable, heads.reason
    assert (heads.producers, heads.consumers) == (stated.producers, stated.consumers)


def test_per_head_statistics_equal_brute_force():
    """Gram, mean |a| and Taylor sums of the heads at the out projection, and each producer's
    filters per head, against the torch layer computed directly: a head's D features are
    positions of one channel."""
    module = TinyAttention().eval()
    x, labels = _inputs(), np.arange(48) % 4
    model = _export(module)
    graph = normalize(model)
    groups = analyze(graph)
    group = next(g for g in groups if g.head_dim > 1)
    config = PruneConfig(method="taylor", batch_size=16)
    needs = frozenset({"weights", "gram", "grad"})
    data = Dataset({"input": x}, labels=labels)
    stats = gather(graph, groups, {group.name: 1}, needs, data, config).stats[group.name]

    heads = module.heads(torch.from_numpy(x)).detach().requires_grad_(True)
    loss = nn.functional.cross_entropy(
        module.logits(heads), torch.from_numpy(labels), reduction="sum"
    )
    loss.backward()
    a, g = heads.detach().numpy().astype(np.float64), heads.grad.numpy().astype(np.float64)
    rows = np.moveaxis(a, 2, -1).reshape(-1, HEADS)  # samples × tokens × head dim, heads
    tap = next(iter(stats.taps.values()))
    assert tap.n == 48 * TOKENS * HEAD_DIM
    np.testing.assert_allclose(tap.gram, rows.T @ rows, rtol=1e-4)
    np.testing.assert_allclose(tap.abs_sum, np.abs(rows).sum(axis=0), rtol=1e-4)
    taylor = ((a * g).sum(axis=(1, 3)) ** 2).sum(axis=0)
    np.testing.assert_allclose(stats.grads["taylor"], taylor, rtol=1e-3)
    linears = (module.attn.q, module.attn.k, module.attn.v)
    for weights, linear in zip(stats.weights, linears, strict=True):
        expected = linear.weight.detach().numpy().reshape(HEADS, -1)
        np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_head_correction_is_the_chosen_map_from_every_kept_feature():
    """ID on heads through the calibration pass: the map folded is the chosen family's ridge
    regression from the kept heads' features to every feature, computed here from the heads'
    outputs by numpy (the choice itself: tests/test_head_maps.py)."""
    module = TinyAttention().eval()
    x = _inputs()
    graph = normalize(_export(module))
    groups = analyze(graph)
    group = next(g for g in groups if g.head_dim > 1)
    config = PruneConfig(method="id", batch_size=16)
    data = Dataset({"input": x})
    stats = gather(graph, groups, {group.name: 2}, frozenset({"gram"}), data, config).stats
    plan = InterpolativeDecomposition().plan(group, stats[group.name], 2)
    (family,) = [k[4:] for k in plan.info if k.startswith("map_")]
    ridge = plan.info[f"map_{family}"]
    heads = module.heads(torch.from_numpy(x)).detach().numpy().astype(np.float64)
    z = heads.reshape(-1, DIM)  # rows: samples × tokens, columns: head-major features
    (removed,) = set(range(HEADS)) - set(plan.keep.tolist())
    S = [h * HEAD_DIM + d for h in plan.keep for d in range(HEAD_DIM)]
    R = list(range(removed * HEAD_DIM, (removed + 1) * HEAD_DIM))
    if family == "full":
        A = z[:, S].T @ z[:, S]
        ridged = A + ridge * np.trace(A) / len(S) * np.eye(len(S))
        expected = np.linalg.solve(ridged, z[:, S].T @ z[:, R])
    else:
        assert family == "heads", family
        kept = z[:, S].reshape(-1, 2, HEAD_DIM).transpose(0, 2, 1).reshape(-1, 2)
        gone = z[:, R].reshape(-1, 1)
        A = kept.T @ kept
        ridged = A + ridge * np.trace(A) / 2 * np.eye(2)
        expected = np.kron(np.linalg.solve(ridged, kept.T @ gone), np.eye(HEAD_DIM))
    (correction,) = plan.corrections.values()
    np.testing.assert_allclose(correction.M[:, R], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(correction.M[:, S], np.eye(len(S)))


def _with_duplicate_head(module: TinyAttention) -> TinyAttention:
    """Head 2 := head 0 (q, k, v columns and biases), so its output equals head 0's."""
    lo, hi = slice(0, HEAD_DIM), slice(2 * HEAD_DIM, 3 * HEAD_DIM)
    with torch.no_grad():
        for linear in (module.attn.q, module.attn.k, module.attn.v):
            linear.weight[hi] = linear.weight[lo]
            linear.bias[hi] = linear.bias[lo]
    return module


def test_a_duplicate_head_is_pruned_exactly_by_id(tmp_path):
    """Head 2 repeats head 0: ID keeps one copy and folds T = 1 into the out projection, so the
    pruned layer computes the same function; dropping the same head without the fold does not."""
    model = _export(_with_duplicate_head(TinyAttention()))
    x = _inputs()
    feeds = {"input": x[:16]}
    options = dict(ratio=1 / HEADS, round_to=1, exclude=["proj"], data={"input": x}, verify=False)
    plain = dict(compensate="none", recalibrate=False)
    result = onnxprune.prune(model, method="id", **plain, **options)
    group = next(g for g in result.groups if g.head_dim > 1)
    keep = np.asarray(result.plans[group.name].keep).tolist()
    assert len(keep) == HEADS - 1 and 1 in keep  # one of the twins went
    proj = next(n for n in result.model.graph.node if n.name == "/proj/MatMul")
    weight = next(t for t in result.model.graph.initializer if t.name == proj.input[1])
    assert tuple(weight.dims) == ((HEADS - 1) * HEAD_DIM, DIM)
    assert_outputs_close(model, result.model, feeds, atol=1e-5)
    (correction,) = result.plans[group.name].corrections.values()
    twin = 0 if 0 in keep else 2
    gone = ({0, 2} - {twin}).pop()  # the map from the kept features copies the twin's D features
    expected = np.zeros(((HEADS - 1) * HEAD_DIM, HEAD_DIM))
    expected[keep.index(twin) * HEAD_DIM : (keep.index(twin) + 1) * HEAD_DIM] = np.eye(HEAD_DIM)
    block = correction.M[:, gone * HEAD_DIM : (gone + 1) * HEAD_DIM]
    np.testing.assert_allclose(block, expected, atol=1e-6)
    removed = onnxprune.prune(model, method="activation", **plain, **options)
    assert max_deviation(model, removed.model, feeds) > 1e-2


@pytest.mark.parametrize("method", ["magnitude", "activation", "taylor", "ippro", "id"])
def test_every_method_prunes_heads_to_a_running_model(method):
    model = _export(TinyAttention())
    x = _inputs()
    result = onnxprune.prune(
        model, method=method, ratio=0.5, round_to=1, data={"input": x}, labels=np.arange(48) % 4
    )
    group = next(g for g in result.groups if g.head_dim > 1)
    assert len(result.plans[group.name].keep) == 2
    out = run_model(result.model, {"input": x[:4]})["logits"]
    assert out.shape == (4, 4) and np.isfinite(out).all()


def test_mac_target_counts_the_attention_matmuls_that_shrink_with_the_heads():
    """The width cost model's MACs for the chosen widths are the pruned ViT's counted MACs:
    q·kᵀ and attention·v shrink with the heads (a fifth of the model's MACs)."""
    result = onnxprune.prune(
        reference_path("vit"), method="magnitude", target_macs=0.5, round_to=1, verify=False
    )
    before, after = result.report.macs
    assert result.report.target.reached == pytest.approx(after / before, abs=1e-3)
    assert 0.45 <= after / before <= 0.51  # targets land nearest, at most 0.01 above


class BertStyleAttention(nn.Module):
    """transformers' BertSelfAttention pattern: `view(*input_shape, -1, D)` with the shape of the
    layer's input (shape pieces beside a -1 head count, which shape inference leaves symbolic)
    and a merge that states H·D (`all_head_size`) or -1; the padding mask reaches the scores
    through `expand(batch, 1, tokens, tokens)` (an Expand with a computed target, whose head
    axis shape inference cannot see is 1); then mean over tokens → 4 scores."""

    def __init__(self, merge_constant: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.out, self.fc = nn.Linear(DIM, DIM), nn.Linear(DIM, 4)
        self.merge_constant = merge_constant

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        shape = x.size()[:-1]
        bias = (1.0 - mask[:, None, None, :].expand(shape[0], 1, shape[1], shape[1])) * -1e4

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(*shape, -1, HEAD_DIM).permute(0, 2, 1, 3)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / HEAD_DIM**0.5 + bias
        context = torch.matmul(scores.softmax(dim=-1), v).permute(0, 2, 1, 3).contiguous()
        merged = context.view(*shape, DIM if self.merge_constant else -1)
        return self.fc(self.out(merged).mean(dim=1))


def _export_bert_style(module: nn.Module) -> onnx.ModelProto:
    """Legacy export with batch and tokens dynamic, as transformers models are exported."""
    import io
    import warnings

    buffer = io.BytesIO()
    axes = {"input": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.randn(2, TOKENS, DIM), torch.ones(2, TOKENS)),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["input", "mask"],
            output_names=["logits"],
            dynamic_axes={**axes, "logits": {0: "batch"}},
        )
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("merge_constant", [False, True], ids=["merge-1", "merge-HD"])
def test_bert_style_heads_are_pruned_exactly_with_the_head_counts_edited(merge_constant):
    """The BERT export's symbolic head count and its merge target are understood: a duplicated
    head is removed by ID with T = 1 folded into the out projection, so the pruned layer is the
    same function at any token count (the merge's H·D, where stated, becomes H'·D)."""
    module = _with_duplicate_head_of(BertStyleAttention(merge_constant))
    model = _export_bert_style(module)
    heads, _ = _head_group(model)
    assert heads.prunable, heads.reason
    assert (heads.channels, heads.head_dim) == (HEADS, HEAD_DIM)
    assert heads.consumers == ("/out/MatMul",)
    x = _inputs()
    options = dict(ratio=1 / HEADS, round_to=1, exclude=["out"], verify=False)
    data = {"input": x, "mask": _padding_masks(48, TOKENS)}
    result = onnxprune.prune(
        model, method="id", compensate="none", recalibrate=False, data=data, **options
    )
    group = next(g for g in result.groups if g.head_dim > 1)
    assert len(result.plans[group.name].keep) == HEADS - 1
    longer = np.random.default_rng(3).standard_normal((4, TOKENS + 2, DIM)).astype(np.float32)
    feeds = {"input": longer, "mask": _padding_masks(4, TOKENS + 2)}
    assert_outputs_close(model, result.model, feeds, atol=1e-5)
    stated = [_stated_entries(n) for n in normalize(result.model).nodes if n.op == "Reshape"]
    merged = (HEADS - 1) * HEAD_DIM if merge_constant else -1
    assert stated == [[-1, HEAD_DIM]] * 3 + [[merged]]


def _stated_entries(reshape: gs.Node) -> list[int]:
    """The constant entries of a Reshape's target other than 0 (a copy of the input's dim):
    the whole target when it is a constant, its constant pieces when a Concat builds it."""
    target = reshape.inputs[1]
    pieces = target.inputs[0].inputs if target.inputs and target.inputs[0].op == "Concat" else ()
    constants = [target] if isinstance(target, gs.Constant) else pieces
    values = [int(v) for t in constants if isinstance(t, gs.Constant) for v in t.values.reshape(-1)]
    return [v for v in values if v]


def _with_duplicate_head_of(module: BertStyleAttention) -> BertStyleAttention:
    """Head 2 := head 0 in q, k and v, so its output equals head 0's."""
    lo, hi = slice(0, HEAD_DIM), slice(2 * HEAD_DIM, 3 * HEAD_DIM)
    with torch.no_grad():
        for linear in (module.q, module.k, module.v):
            linear.weight[hi] = linear.weight[lo]
            linear.bias[hi] = linear.bias[lo]
    return module


def _padding_masks(n: int, tokens: int) -> np.ndarray:
    """1 for the first 2 … `tokens` tokens of each row, 0 after (padding)."""
    lengths = 2 + np.arange(n) % (tokens - 1)
    return (np.arange(tokens) < lengths[:, None]).astype(np.float32)


class PackedAttention(nn.Module):
    """nn.MultiheadAttention (one packed q/k/v in-projection, heads folded into the batch axis)
    with a random in-projection bias, then mean over tokens → 4 scores."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first)
        self.fc = nn.Linear(DIM, 4)
        self.batch_first = batch_first
        with torch.no_grad():
            self.attn.in_proj_bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.batch_first else x.transpose(0, 1)
        y, _ = self.attn(x, x, x, need_weights=False)
        y = y if self.batch_first else y.transpose(0, 1)
        return self.fc(y.mean(dim=1))

    def duplicate_head(self) -> PackedAttention:
        """Head 2 := head 0 in each of the q, k and v thirds of the packed weight and bias."""
        _duplicate_packed_head(self.attn.in_proj_weight, self.attn.in_proj_bias)
        return self


def _duplicate_packed_head(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Head 2 := head 0 in each of the q, k and v thirds of a packed projection's rows."""
    with torch.no_grad():
        for third in range(3):
            lo = third * DIM
            rows, twin = slice(lo + 2 * HEAD_DIM, lo + 3 * HEAD_DIM), slice(lo, lo + HEAD_DIM)
            weight[rows] = weight[twin]
            bias[rows] = bias[twin]


def _export_packed(module: nn.Module, exporter: str) -> onnx.ModelProto:
    """The legacy export (opset 17) or the dynamo export (opset 18), batch dynamic."""
    if exporter == "legacy":
        return _export(module)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            (torch.randn(2, TOKENS, DIM),),
            dynamo=True,
            opset_version=18,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    return program.model_proto


PACKED = [
    pytest.param(batch_first, exporter, id=f"{exporter}-{'batch' if batch_first else 'seq'}-first")
    for exporter in ("legacy", "dynamo")
    for batch_first in (True, False)
]


@pytest.mark.parametrize(("batch_first", "exporter"), PACKED)
def test_packed_projection_heads_are_pruned_exactly(batch_first, exporter):
    """nn.MultiheadAttention's packed in-projection is taken apart into q, k and v projections
    (ratio 0 is the same function), their heads form one group with the out projection as
    consumer, and a duplicated head (the same D columns in each third) is removed by ID with
    T = 1 folded into the out projection: the same function at any batch size, with every head
    count the graph states (B·H included) edited."""
    model = _export_packed(PackedAttention(batch_first).duplicate_head(), exporter)
    heads, groups = _head_group(model)
    assert heads.prunable, heads.reason
    assert (heads.channels, heads.head_dim) == (HEADS, HEAD_DIM)
    assert len(heads.producers) == 3 and len(heads.consumers) == 1
    assert len([g for g in groups if g.head_dim > 1]) == 1
    _assert_duplicated_head_removed_exactly(model, heads)


def _assert_duplicated_head_removed_exactly(model: onnx.ModelProto, heads: ChannelGroup) -> None:
    """Ratio 0 is the same function; ID removing one head (the duplicated one) with no
    intercept or recalibration is the same function too, at a batch size the fit never saw;
    removing one by activation energy is not."""
    feeds = {"input": _inputs(7, seed=5)}  # a batch size the fit never saw
    options = dict(round_to=1, data={"input": _inputs()}, verify=False)
    same = onnxprune.prune(model, method="id", ratio=0.0, **options)
    assert_outputs_close(model, same.model, feeds, atol=1e-6)
    plain = dict(compensate="none", recalibrate=False, exclude=[heads.consumers[0]])
    result = onnxprune.prune(model, method="id", ratio=1 / HEADS, **plain, **options)
    assert len(result.plans[heads.name].keep) == HEADS - 1
    assert_outputs_close(model, result.model, feeds, atol=1e-5)
    removed = onnxprune.prune(model, method="activation", ratio=1 / HEADS, **plain, **options)
    assert max_deviation(model, removed.model, feeds) > 1e-2


@pytest.mark.parametrize(("batch_first", "exporter"), PACKED[:2] + PACKED[3:])
def test_packed_heads_predicted_macs_are_the_counted_macs(batch_first, exporter):
    """The width cost model's MACs for the chosen head count are the pruned model's counted
    MACs: the three projections, both attention MatMuls and the out projection shrink."""
    model = _export_packed(PackedAttention(batch_first), exporter)
    result = onnxprune.prune(model, method="magnitude", target_macs=0.75, round_to=1, verify=False)
    before, after = result.report.macs
    assert after < before
    assert result.report.target.reached == pytest.approx(after / before, abs=1e-3)


class ChunkedEinsumAttention(nn.Module):
    """torchvision MaxViT's attention: one q/k/v Linear cut by `torch.chunk(…, 3, dim=-1)`, the
    heads split per part, `torch.einsum` for q·kᵀ and attention·v; then mean over tokens → 4
    scores. With `summed`, the scores contract the unsplit channels (no heads)."""

    def __init__(self, summed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.qkv, self.proj, self.fc = (
            nn.Linear(DIM, 3 * DIM),
            nn.Linear(DIM, DIM),
            nn.Linear(DIM, 4),
        )
        self.summed = summed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = torch.chunk(self.qkv(x), 3, dim=-1)
        if self.summed:
            a = torch.einsum("bid,bjd->bij", q, k).softmax(dim=-1)
            return self.fc(self.proj(torch.einsum("bij,bjd->bid", a, v)).mean(dim=1))
        q, k, v = (
            t.reshape(x.shape[0], TOKENS, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v)
        )
        a = torch.einsum("bhid,bhjd->bhij", q * HEAD_DIM**-0.5, k).softmax(dim=-1)
        y = torch.einsum("bhij,bhjd->bhid", a, v).transpose(1, 2).reshape(x.shape[0], TOKENS, DIM)
        return self.fc(self.proj(y).mean(dim=1))

    def duplicate_head(self) -> ChunkedEinsumAttention:
        """Head 2 := head 0 in each of the q, k and v thirds of the Linear's weight and bias."""
        _duplicate_packed_head(self.qkv.weight, self.qkv.bias)
        return self


def test_chunked_projection_with_einsum_heads_is_pruned_exactly():
    """The chunk's three Slices are taken apart into q, k and v projections and both Einsums
    pass the heads (their batch label): one group of heads, ratio 0 the same function, and a
    duplicated head removed by ID with T = 1 folded into the out projection is the same
    function at a batch size the fit never saw."""
    model = _export(ChunkedEinsumAttention().duplicate_head())
    assert sum(n.op_type in ("Slice", "Einsum") for n in model.graph.node) == 5
    heads, groups = _head_group(model)
    assert heads.prunable, heads.reason
    assert (heads.channels, heads.head_dim) == (HEADS, HEAD_DIM)
    assert len(heads.producers) == 3 and len(heads.consumers) == 1
    _assert_duplicated_head_removed_exactly(model, heads)


class Conv1DAttention(nn.Module):
    """HF GPT-2's attention: a Conv1D (addmm on the tokens as rows, weight (in, 3E)) packs
    q|k|v, reshaped back to (B, S, 3E) and `split(E, dim=2)`; the key's shape splits both the
    key and the value into heads (`view(*k.shape[:-1], -1, D)`); then mean over tokens → 4."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.weight = nn.Parameter(torch.randn(DIM, 3 * DIM) * DIM**-0.5)
        self.bias = nn.Parameter(torch.randn(3 * DIM) * 0.1)
        self.proj, self.fc = nn.Linear(DIM, DIM), nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.addmm(self.bias, x.view(-1, DIM), self.weight)
        q, k, v = rows.view(*x.shape[:-1], 3 * DIM).split(DIM, dim=2)
        shape = (*k.shape[:-1], -1, HEAD_DIM)
        q = q.view(*q.shape[:-1], -1, HEAD_DIM).transpose(1, 2)
        k, v = (t.view(shape).transpose(1, 2) for t in (k, v))
        a = (q @ k.transpose(-1, -2) * HEAD_DIM**-0.5).softmax(dim=-1) @ v
        return self.fc(self.proj(a.transpose(1, 2).reshape(*x.shape[:-1], DIM)).mean(dim=1))

    def duplicate_head(self) -> Conv1DAttention:
        """Head 2 := head 0 in each of the q, k and v thirds of the Conv1D's columns and bias."""
        _duplicate_packed_head(self.weight.T, self.bias)
        return self


def test_conv1d_packed_projection_split_in_three_is_taken_apart_and_pruned_exactly():
    """GPT-2's Gemm on rows → Reshape → Split is taken apart into three projections, each with
    its own rows-to-tokens Reshape; the value's heads are split with the key's shape (dims
    inference proves equal): one group of heads, ratio 0 the same function, a duplicated head
    removed exactly."""
    model = _export(Conv1DAttention().duplicate_head())
    assert [n.op_type for n in model.graph.node].count("Split") == 1
    graph = normalize(model)
    widths = [t.values.shape for n in graph.nodes for t in n.inputs if isinstance(t, gs.Constant)]
    assert not any(n.op == "Split" for n in graph.nodes) and (DIM, 3 * DIM) not in widths
    heads, groups = _head_group(model)
    assert heads.prunable, heads.reason
    assert (heads.channels, heads.head_dim) == (HEADS, HEAD_DIM)
    assert len(heads.producers) == 3 and len(heads.consumers) == 1
    _assert_duplicated_head_removed_exactly(model, heads)


def test_einsum_summing_over_the_channels_blocks_them():
    """q·kᵀ contracting the unsplit channels (label d, not in the output) cannot pass them."""
    groups = analyze(normalize(_export(ChunkedEinsumAttention(summed=True))))
    q = next(g for g in groups if "Einsum" in g.blocker and g.producers[0].endswith("_q"))
    assert not q.prunable and "sums over the channels" in q.reason


class InterleavedPacking(nn.Module):
    """A packed projection read as (…, E, 3) (q, k, v interleaved per feature): its parts are
    not thirds of the weight, so it is not taken apart, and nothing is prunable."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.packed, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.packed(x).unflatten(-1, (DIM, 3)).unsqueeze(0).transpose(0, -1).squeeze(-1)
        q, k, v = (parts[t].unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for t in range(3))
        heads = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.out(heads.transpose(1, 2).flatten(2).mean(dim=1))


def test_interleaved_packing_is_not_taken_apart():
    model = _export(InterleavedPacking())
    graph = normalize(model)
    weights = [n.inputs[1] for n in graph.nodes if n.op == "MatMul"]
    widths = [w.values.shape[-1] for w in weights if isinstance(w, gs.Constant)]
    assert 3 * DIM in widths and not any(g.prunable for g in analyze(graph))
    with pytest.raises(NothingToPruneError):
        onnxprune.prune(model, method="magnitude", ratio=0.5, round_to=1, verify=False)


class PositionalAttention(nn.Module):
    """Token ids → embeddings + `position_embeddings[position_ids[:, :S]]` (BERT's) → heads by
    `view(*shape, -1, D)` with the shape of the ids → softmax attention → out projection → mean
    over tokens → 4 scores. The dynamo export reads the heads' target from `Shape(ids)`, and ONNX
    shape inference gives the hidden states new symbols after the positional add."""

    def __init__(self, token_types: bool = False) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed, self.positions = nn.Embedding(11, DIM), nn.Embedding(16, DIM)
        self.register_buffer("position_ids", torch.arange(16)[None])
        self.types = nn.Embedding(2, DIM) if token_types else None
        self.register_buffer("type_ids", torch.zeros(1, 16, dtype=torch.long))
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.out, self.fc = nn.Linear(DIM, DIM), nn.Linear(DIM, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.positions(self.position_ids[:, : ids.shape[1]])
        if self.types is not None:  # BERT's buffered token types: `ids[:, :S].expand(B, S)`
            x = x + self.types(self.type_ids[:, : ids.shape[1]].expand(*ids.shape))

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(*ids.shape, -1, HEAD_DIM).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        context = ((q @ k.transpose(-1, -2)) / HEAD_DIM**0.5).softmax(dim=-1) @ v
        merged = context.transpose(1, 2).reshape(*ids.shape, DIM)
        return self.fc(self.out(merged).mean(dim=1))


def _export_dynamo_ids(module: nn.Module) -> onnx.ModelProto:
    """Dynamo export (opset 18) with batch and tokens dynamic."""
    import logging
    import warnings

    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens", max=16)}
    logging.disable(logging.INFO)  # torch.export's debug records of every guard: minutes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(),
                (torch.randint(0, 11, (2, TOKENS)),),
                dynamo=True,
                opset_version=18,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=(dims,),
                verbose=False,
            )
    finally:
        logging.disable(logging.NOTSET)
    return program.model_proto


@pytest.mark.parametrize("token_types", [False, True], ids=["positions", "token-types"])
def test_heads_split_by_the_input_shape_are_proven_and_pruned_exactly(token_types):
    """The split's batch and tokens come from `Shape(ids)`; the hidden states' dims are proven
    equal to them through the positional add (the positions are a Slice from 0 to the tokens of
    a longer table: at most that many, so the broadcast keeps the ids' size whenever it runs)
    and BERT's token-type add (an Expand of such a Slice to the ids' shape: broadcasting makes
    it that shape). A duplicated head is then removed by ID exactly, at a token count the fit
    never saw."""
    module = PositionalAttention(token_types)
    with torch.no_grad():
        lo, hi = slice(0, HEAD_DIM), slice(2 * HEAD_DIM, 3 * HEAD_DIM)
        for linear in (module.q, module.k, module.v):
            linear.weight[hi], linear.bias[hi] = linear.weight[lo], linear.bias[lo]
    model = _export_dynamo_ids(module)
    graph = normalize(model)
    split = next(n for n in graph.nodes if n.op == "Reshape" and len(n.outputs[0].shape) == 4)
    assert split.inputs[0].shape[:2] != split.outputs[0].shape[:2]  # inference lost it
    heads, _ = _head_group(model)
    assert heads.prunable, heads.reason
    assert (heads.channels, heads.head_dim) == (HEADS, HEAD_DIM)
    ids = np.random.default_rng(0).integers(0, 11, (48, TOKENS))
    options = dict(round_to=1, exclude=[heads.consumers[0]], data={"input": ids}, verify=False)
    result = onnxprune.prune(
        model, method="id", compensate="none", recalibrate=False, ratio=1 / HEADS, **options
    )
    assert len(result.plans[heads.name].keep) == HEADS - 1
    longer = np.random.default_rng(1).integers(0, 11, (4, TOKENS + 4))
    assert_outputs_close(model, result.model, {"input": longer}, atol=1e-5)


KEY_DIM, VALUE_DIM = 2, 4  # LeViT: q and k narrower than v


class LinearNorm(nn.Sequential):
    """LeViT's Linear + BatchNorm1d over the tokens: `bn(y.flatten(0, 1)).reshape_as(y)`."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__(nn.Linear(features, out, bias=False), nn.BatchNorm1d(out))
        with torch.no_grad():
            self[1].running_mean.uniform_(-0.5, 0.5)
            self[1].running_var.uniform_(0.5, 2.0)
            self[1].weight.uniform_(0.5, 1.5)
            self[1].bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self[0](x)
        return self[1](y.flatten(0, 1)).reshape_as(y)


class LevitAttention(nn.Module):
    """timm LeViT's attention on (batch, 5, 6) tokens, 3 heads with q, k of 2 and v of 4
    features: one LinearNorm writes each head's q, k, v side by side, `view(B, N, H, -1)` (a
    target computed from the input's shape) splits the heads and `split([2, 2, 4], dim=3)` the
    parts; a learned bias per head and token pair (a Gather of a table) joins the scores; the
    heads merge to H·4 features, Hardswish, out LinearNorm; mean over tokens → 4 scores. With
    `downsample` (LeViT's AttentionDownsample) q has a projection of its own, split by
    `view(B, -1, H, 2)`, and one LinearNorm writes k and v."""

    def __init__(self, downsample: bool = False) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.downsample = downsample
        part = KEY_DIM + VALUE_DIM if downsample else 2 * KEY_DIM + VALUE_DIM
        self.qkv = LinearNorm(DIM, HEADS * part)
        self.q = LinearNorm(DIM, HEADS * KEY_DIM) if downsample else None
        self.biases = nn.Parameter(torch.randn(HEADS, TOKENS))
        offsets = (torch.arange(TOKENS)[:, None] - torch.arange(TOKENS)[None]).abs()
        self.register_buffer("offsets", offsets)
        self.proj, self.fc = LinearNorm(HEADS * VALUE_DIM, DIM), nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.downsample:
            k, v = self.qkv(x).view(b, n, HEADS, -1).split([KEY_DIM, VALUE_DIM], dim=3)
            q = self.q(x).view(b, -1, HEADS, KEY_DIM)
        else:
            parts = self.qkv(x).view(b, n, HEADS, -1).split([KEY_DIM, KEY_DIM, VALUE_DIM], dim=3)
            q, k, v = parts
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        scores = q @ k * KEY_DIM**-0.5 + self.biases[:, self.offsets]
        y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, HEADS * VALUE_DIM)
        return self.fc(self.proj(nn.functional.hardswish(y)).mean(dim=1))

    def duplicate_head(self) -> LevitAttention:
        """Head 2 := head 0: its rows of every projection and BatchNorm, and its biases."""
        with torch.no_grad():
            for norm in (self.qkv, self.q) if self.downsample else (self.qkv,):
                part = norm[0].out_features // HEADS
                lo, hi = slice(0, part), slice(2 * part, 3 * part)
                for tensor in (norm[0].weight, *norm[1].parameters(), *norm[1].buffers()):
                    if tensor.dim() and tensor.shape[0] == norm[0].out_features:
                        tensor[hi] = tensor[lo]
            self.biases[2] = self.biases[0]
        return self


@pytest.mark.parametrize("downsample", [False, True], ids=["attention", "downsample"])
def test_levit_heads_split_by_a_computed_target_are_pruned_exactly(downsample):
    """The head split's per-head width is -1 in a target read from the input's shape (shape
    inference leaves it symbolic; the load states it, H·D / H, proven from the static sizes).
    One group of heads (q and k of 2 features, v of 4, through the BatchNorm over tokens and
    the Split of each head's features); ratio 0 the same function, a duplicated head removed
    by ID the same function at an unseen batch size."""
    model = _export(LevitAttention(downsample).duplicate_head())
    graph = normalize(model)
    split = next(n for n in graph.nodes if n.op == "Split")
    width = KEY_DIM + VALUE_DIM if downsample else 2 * KEY_DIM + VALUE_DIM
    assert split.inputs[0].shape[-1] == width  # the target's -1, proven static, stated at load
    heads, groups = _head_group(model)
    assert heads.prunable, heads.reason
    assert (heads.channels, heads.head_dim) == (HEADS, width)
    assert len(heads.producers) == 1 + downsample and len(heads.consumers) == 1
    _assert_duplicated_head_removed_exactly(model, heads)


class UnbindAttention(nn.Module):
    """timm's attention (MobileViT, ViT): one q/k/v Linear, `reshape(B, N, 3, H, D)
    .permute(2, 0, 3, 1, 4).unbind(0)` (exported as a Split of axis 0 into three parts of one,
    each Squeezed), softmax attention, out projection; mean over tokens → 4 scores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.qkv, self.proj, self.fc = (
            nn.Linear(DIM, 3 * DIM),
            nn.Linear(DIM, DIM),
            nn.Linear(DIM, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        parts = self.qkv(x).reshape(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = parts.unbind(0)
        y = ((q * HEAD_DIM**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.fc(self.proj(y.transpose(1, 2).reshape(b, n, DIM)).mean(dim=1))


def test_unbound_packed_projection_heads_are_pruned_exactly():
    """The Split + Squeezes of `unbind(0)` read the three parts like Gathers: the projection is
    taken apart, one group of heads, ratio 0 the same function, a duplicated head removed by ID
    the same function at an unseen batch size."""
    module = UnbindAttention()
    _duplicate_packed_head(module.qkv.weight, module.qkv.bias)
    model = _export(module)
    assert any(n.op_type == "Split" for n in model.graph.node)
    heads, groups = _head_group(model)
    assert heads.prunable, heads.reason
    assert (heads.channels, heads.head_dim) == (HEADS, HEAD_DIM)
    assert len(heads.producers) == 3 and len(heads.consumers) == 1
    _assert_duplicated_head_removed_exactly(model, heads)


class BiasPlusMaskAttention(TinyAttention):
    """HF's relative position bias (BEiT, Swin): a per-head (1, heads, tokens, tokens) bias is
    added to the attention mask first, and the sum to the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, HEADS, TOKENS, TOKENS))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(x.shape[0], TOKENS, HEADS, HEAD_DIM).transpose(1, 2)

        q, k, v = split(a.q(x)), split(a.k(x)), split(a.v(x))
        mask = (x[:, None, None, :, 0] > 3.0).float() * -1e4  # (batch, 1, 1, keys)
        scores = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5 + (self.bias + mask)
        return (scores.softmax(dim=-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_head_bias_added_to_the_mask_first_is_sliced_with_the_heads(exporter, tmp_path):
    """scores + (bias + mask) is read as (scores + bias) + mask at load, so the bias's head
    axis is sliced with the heads: prunable, and a duplicated head (its bias too) is removed
    exactly at an unseen batch size."""
    module = _with_duplicate_head(BiasPlusMaskAttention())
    with torch.no_grad():
        module.bias[:, 2] = module.bias[:, 0]
    if exporter == "dynamo":  # the tokens stay fixed: the bias is tokens × tokens
        path, dims = tmp_path / "m.onnx", ({0: torch.export.Dim("batch", min=2)},)
        torch.onnx.export(module.eval(), (torch.randn(2, TOKENS, DIM),), str(path), dynamo=True,
                          verbose=False, input_names=["input"], dynamic_shapes=dims)  # fmt: skip
        model = onnx.load(path)
    else:
        model = _export(module)
    heads, _ = _head_group(model)
    assert heads.prunable, heads.reason
    _assert_duplicated_head_removed_exactly(model, heads)


class RelativeBiasAttention(nn.Module):
    """T5's attention: a (buckets, heads) table Gathered by relative-position buckets, permuted
    to (1, heads, queries, keys), computed once and added to the scores of both layers; no
    scaling; then mean over tokens → 4 scores."""

    BUCKETS = 7

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.table = nn.Embedding(self.BUCKETS, HEADS)
        self.layers = nn.ModuleList(
            nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(4)) for _ in range(2)
        )
        self.fc = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.arange(x.shape[1])
        relative = (tokens[None, :] - tokens[:, None]).clamp(-3, 3) + 3
        bias = self.table(relative).permute(2, 0, 1).unsqueeze(0)
        shape = (*x.shape[:2], HEADS, HEAD_DIM)
        for q, k, v, o in self.layers:
            qh, kh, vh = (p(x).view(shape).transpose(1, 2) for p in (q, k, v))
            heads = (qh @ kh.transpose(-1, -2) + bias).softmax(dim=-1) @ vh
            x = x + o(heads.transpose(1, 2).reshape(*x.shape[:2], DIM))
        return self.fc(x.mean(dim=1))

    def duplicate_head(self) -> RelativeBiasAttention:
        """Head 2 := head 0 in every layer's q, k, v and in the bias table."""
        lo, hi = slice(0, HEAD_DIM), slice(2 * HEAD_DIM, 3 * HEAD_DIM)
        with torch.no_grad():
            for q, k, v, _ in self.layers:
                for linear in (q, k, v):
                    linear.weight[hi], linear.bias[hi] = linear.weight[lo], linear.bias[lo]
            self.table.weight[:, 2] = self.table.weight[:, 0]
        return self


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_shared_relative_position_bias_is_sliced_with_each_layers_heads(exporter, tmp_path):
    """T5's bias table is a per-head parameter reached by data movement: each layer gets its own
    copy of it at load and slices its columns with its heads, so every layer's heads are
    prunable; a duplicated head (its bias column too) is removed exactly at a token count the
    fit never saw."""
    module = RelativeBiasAttention().duplicate_head()
    model = graphs.export_tokens(module, (2, TOKENS, DIM), exporter, tmp_path / "t5.onnx")
    graph = normalize(model)
    tables = [n for n in graph.nodes if n.op == "Gather" and list(n.inputs[0].shape) == [7, HEADS]]
    assert len(tables) == 2  # one copy per layer
    groups = analyze(normalize(model))
    heads = [g for g in groups if g.head_dim > 1]
    assert len(heads) == 2 and all(g.prunable for g in heads), [g.reason for g in heads]
    outs = [g.consumers[0] for g in heads]
    data = {"input": _inputs(48)}
    options = dict(round_to=1, exclude=outs, data=data, verify=False)
    same = onnxprune.prune(model, method="id", ratio=0.0, **options)
    result = onnxprune.prune(
        model, method="id", compensate="none", recalibrate=False, ratio=1 / HEADS, **options
    )
    assert all(len(result.plans[g.name].keep) == HEADS - 1 for g in heads)
    longer = np.random.default_rng(2).standard_normal((4, TOKENS + 2, DIM)).astype(np.float32)
    for pruned in (same.model, result.model):
        assert_outputs_close(model, pruned, {"input": longer}, atol=1e-5)
    widths = {t.dims[1] for t in result.model.graph.initializer if t.dims[:1] == [7]}
    assert widths == {HEADS - 1}
