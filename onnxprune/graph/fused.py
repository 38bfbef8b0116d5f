"""Fused transformer ops written out as the standard ops the analyzer follows.

ONNX Runtime's transformer optimizer (`onnxruntime.transformers.optimizer.optimize_model`)
replaces BERT-style subgraphs by `com.microsoft` ops, and opset 23 has its own `Attention`.
`expand_fused` replaces each such node by the pattern the torch exporters write, computing the
same function up to float rounding, so the analyzer finds heads, FFN neurons and streams in it:

* `Attention` (com.microsoft): one packed Wq|Wk|Wv MatMul split into three MatMul + bias Adds,
  Reshape (0, 0, H, D) → Transpose, q kᵀ · scale, the mask as an additive (B, 1, 1, L) term,
  Softmax, · v, Transpose → Reshape (0, 0, H·Dv);
* `MultiHeadAttention` (com.microsoft, q/k/v of rank 3) and opset-23 `Attention` (q/k/v of rank 3
  with equal head counts, or rank 4 heads-first): the same core on the given q, k, v;
* `SkipLayerNormalization`: input + bias + skip → LayerNormalization;
* `BiasGelu`, `Gelu`: x (+ bias) → 0.5·x·(1 + erf(x/√2)); `FastGelu`: the tanh form;
* `EmbedLayerNormalization`: Gather of word, position and segment embeddings, summed →
  LayerNormalization; its mask index (tokens per row) as ReduceSum of the mask.

`refusal` names what a node uses that the expansion does not write (past state, rotary
embeddings, causal masks, attention bias, packed q/k/v layouts, …): such a node stays as it is,
and its handler (ops/fused.py) blocks every group that reaches it with that reason.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

MS = "com.microsoft"
MIN_OPSET = 17  # LayerNormalization
_MASK_AXES = {2: [1, 2], 3: [1]}  # raw mask rank → axes that make it (B, 1, 1|S, L)


def expand_fused(graph: gs.Graph, opset: int) -> bool:
    """Replace every fused node `refusal` accepts by standard ops, in place; True if any was.
    The nodes' output tensors keep their names."""
    names = frozenset(t.name for t in graph.outputs)
    todo = [n for n in graph.nodes if is_fused(n) and not refusal(n, opset, outputs=names)]
    for node in reversed(todo):  # consumers first: a mask's kind is read from its producer
        inputs, outputs = list(node.inputs), list(node.outputs)
        node.outputs.clear()
        node.inputs.clear()
        _RULES[_key(node)](_Builder(graph, node.name), node, inputs, outputs)
    if todo:
        graph.cleanup().toposort()
    return bool(todo)


def is_fused(node: gs.Node) -> bool:
    """True for an op `expand_fused` knows."""
    return _key(node) in _RULES


def refusal(node: gs.Node, opset: int, *, outputs: frozenset[str] = frozenset()) -> str | None:
    """Why `node` (a fused op) is not expanded, or None when it is. `outputs`: the graph's
    output names (an output of the node that is one counts as read)."""
    if opset < MIN_OPSET:
        reason = f"is written out with opset-{MIN_OPSET} ops (the model has opset {opset})"
    else:
        check = _CHECKS.get(_key(node))
        reason = check(node, outputs) if check else None
    return f"{node.domain or 'ai.onnx'}::{node.op} '{node.name}' {reason}" if reason else None


def merge_constant_adds(graph: gs.Graph) -> None:
    """Add(Add(x, c1), c2) → Add(x, c1 + c2) where both constants have one shape and only the
    outer Add reads the inner sum (in place; equal up to float rounding). A correction's shift
    Add after a MatMul then merges into the bias Add after it, so the pruned model keeps the
    MatMul → Add(bias) pattern ONNX Runtime's optimizer fuses into Attention and
    SkipLayerNormalization."""
    outputs = {t.name for t in graph.outputs}
    for outer in [n for n in graph.nodes if n.op == "Add"]:
        inner = _constant_add(outer)
        if inner is None:
            continue
        tensor, c2 = inner
        add = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        merged = _constant_add(add) if add is not None and add.op == "Add" else None
        if merged is None or len(tensor.outputs) != 1 or tensor.name in outputs:
            continue
        x, c1 = merged
        if c1.values.shape != c2.values.shape:
            continue
        total = c1.values.astype(np.float64) + c2.values.astype(np.float64)
        outer.inputs.clear()
        outer.inputs.extend(
            [x, gs.Constant(f"{outer.name}__merged", np.asarray(total, dtype=c2.values.dtype))]
        )
    graph.cleanup()


def _constant_add(node: gs.Node) -> tuple[gs.Tensor, gs.Constant] | None:
    """(x, c) for an Add of a tensor x and a constant c, else None."""
    if len(node.inputs) != 2:
        return None
    kinds = [isinstance(t, gs.Constant) for t in node.inputs]
    if kinds != [False, True] and kinds != [True, False]:
        return None
    constant = node.inputs[kinds.index(True)]
    return node.inputs[kinds.index(False)], constant


# ------------------------------------------------------------------ what each op accepts


def _check_attention(node: gs.Node, outputs: frozenset[str]) -> str | None:
    """com.microsoft Attention: constant packed weight and bias, no past, no attention bias,
    not causal, no rotary embedding, a mask of a known kind."""
    if node.attrs.get("unidirectional", 0):
        return "is unidirectional (causal), which is not expanded"
    if node.attrs.get("do_rotary", 0):
        return "applies rotary embeddings, which are not expanded"
    if _used(node, 1, outputs) or _given(node, 4, 5, 6):
        return "uses past/present state or an attention bias, which are not expanded"
    if not all(isinstance(t, gs.Constant) for t in node.inputs[1:3]) or len(node.inputs) < 3:
        return "has a computed (or no) packed weight or bias"
    return _check_mask(node, 3)


def _check_mha(node: gs.Node, outputs: frozenset[str]) -> str | None:
    """com.microsoft MultiHeadAttention: separate q, k, v of rank 3 with static widths, a
    constant bias if any, no past, no attention bias, not causal."""
    if node.attrs.get("unidirectional", 0):
        return "is unidirectional (causal), which is not expanded"
    if _extra_read(node, outputs) or _given(node, 5, 6, 7, 8, 9):
        return "uses past/present state or an attention bias, which are not expanded"
    reason = _check_qkv(node, ranks=(3,))
    if reason:
        return reason
    if _given(node, 3) and not isinstance(node.inputs[3], gs.Constant):
        return "has a computed bias"
    return _check_mask(node, 4)


def _check_attention23(node: gs.Node, outputs: frozenset[str]) -> str | None:
    """Opset-23 Attention (and 24, 25): q, k, v of rank 3 (equal head counts) or 4, no past, not
    causal, no softcap, no padding lengths or window, only the first output read."""
    if node.attrs.get("is_causal", 0) or node.attrs.get("softcap", 0.0):
        return "is causal or soft-capped, which is not expanded"
    if _extra_read(node, outputs) or _given(node, 4, 5):
        return "uses past/present state or its qk output, which are not expanded"
    if _given(node, 6):
        return "gives nonpad_kv_seqlen (opset 24), which is not expanded"
    if any(node.attrs.get(f"{side}_window_size", -1) != -1 for side in ("left", "right")):
        return "attends in a sliding window (opset 25), which is not expanded"
    if "softmax_precision" in node.attrs:
        return "sets softmax_precision, which is not expanded"
    reason = _check_qkv(node, ranks=(3, 4))
    if reason:
        return reason
    heads = node.attrs.get("q_num_heads"), node.attrs.get("kv_num_heads")
    if len(node.inputs[0].shape) == 3 and (heads[0] is None or heads[0] != heads[1]):
        return "has 3-D inputs without equal q_num_heads and kv_num_heads (grouped queries)"
    mask = node.inputs[3] if _given(node, 3) else None
    if mask is not None and (mask.dtype is None or mask.shape is None):
        return "has a mask of unknown type or rank"
    return None


def _check_skip_ln(node: gs.Node, outputs: frozenset[str]) -> str | None:
    """SkipLayerNormalization: its mean and inverse deviation outputs are not written."""
    if _used(node, 1, outputs) or _used(node, 2, outputs):
        return "has its mean or inverse standard deviation read, which are not expanded"
    return None


def _check_embed_ln(node: gs.Node, outputs: frozenset[str]) -> str | None:
    """EmbedLayerNormalization: a mask index is written only from a given mask."""
    from_mask = _given(node, 7) and node.attrs.get("mask_index_type", 1) == 1
    if _used(node, 1, outputs) and not from_mask:
        return "has a mask index read without a mask, which is not expanded"
    return None


def _check_qkv(node: gs.Node, ranks: tuple[int, ...]) -> str | None:
    """q, k and v given, of one of `ranks`, with static last axes."""
    if not _given(node, 0, 1, 2) or len(node.inputs) < 3:
        return "has packed q/k/v (no separate key and value), which are not expanded"
    shapes = [t.shape for t in node.inputs[:3]]
    if any(s is None or len(s) not in ranks or not isinstance(s[-1], int) for s in shapes):
        return f"has q/k/v of unknown rank or width (rank {' or '.join(map(str, ranks))} needed)"
    if len({len(s) for s in shapes}) != 1:
        return "has q/k/v of different ranks"
    return None


def _check_mask(node: gs.Node, index: int) -> str | None:
    """A mask the expansion writes: token counts per row (from EmbedLayerNormalization) or a
    raw 0/1 mask of rank 2 or 3."""
    if not _given(node, index):
        return None
    if _mask_rank(node.inputs[index]) not in (1, *_MASK_AXES):
        return "has a mask index of a kind that is not expanded (only per-row token counts "
        "from EmbedLayerNormalization and raw masks of rank 2 or 3 are)"
    return None


def _mask_rank(mask: gs.Tensor) -> int | None:
    """1 for EmbedLayerNormalization's mask index (tokens per row; a 1-D mask from elsewhere
    may also be 2·batch long: not taken), else the rank when known."""
    producer = mask.inputs[0] if mask.inputs else None
    if producer is not None and producer.op == "EmbedLayerNormalization":
        return 1 if producer.outputs.index(mask) == 1 else None
    rank = len(mask.shape) if mask.shape is not None else None
    return None if rank == 1 else rank


# ------------------------------------------------------------------ the expansions


def _attention(b: _Builder, node: gs.Node, inputs: list, outputs: list) -> None:
    """Packed x·[Wq|Wk|Wv] + b split into three projections, then the attention core."""
    x, weight, bias = inputs[:3]
    heads = node.attrs["num_heads"]
    width = weight.shape[1] // 3
    sizes = list(node.attrs.get("qkv_hidden_sizes", [width] * 3))
    bounds = np.cumsum([0, *sizes])
    qkv = []
    for name, lo, hi in zip("qkv", bounds[:-1], bounds[1:], strict=True):
        w = b.const(weight.values[:, lo:hi], f"W{name}")
        product = b.op("MatMul", x, w, tag=f"{name}_proj")
        qkv.append(b.op("Add", product, b.const(bias.values[lo:hi], f"b{name}")))
    mask = _mask_term(b, node, inputs, 3, x)
    _core(b, node, qkv, heads, sizes, mask, outputs[0], packed=True)


def _mha(b: _Builder, node: gs.Node, inputs: list, outputs: list) -> None:
    """q, k, v (+ their share of the bias), then the attention core."""
    qkv = list(inputs[:3])
    widths = [t.shape[-1] for t in qkv]
    if len(inputs) > 3 and inputs[3].name:
        bounds = np.cumsum([0, *widths])
        values = inputs[3].values
        qkv = [
            b.op("Add", t, b.const(values[lo:hi], f"b{i}"))
            for i, (t, lo, hi) in enumerate(zip(qkv, bounds[:-1], bounds[1:], strict=True))
        ]
    heads = node.attrs["num_heads"]
    mask = _mask_term(b, node, inputs, 4, inputs[1])
    _core(b, node, qkv, heads, widths, mask, outputs[0], packed=True)


def _attention23(b: _Builder, node: gs.Node, inputs: list, outputs: list) -> None:
    """Opset-23 Attention: rank-3 inputs split into heads like MultiHeadAttention's, rank-4 ones
    (batch, heads, tokens, D) go straight to the core; a boolean mask allows where true."""
    q, k, v = inputs[:3]
    mask = inputs[3] if len(inputs) > 3 and inputs[3].name else None
    if mask is not None and mask.dtype == np.bool_:
        mask = b.op("Where", mask, b.scalar(0.0), b.scalar(-np.inf))
    if len(q.shape) == 3:
        widths = [t.shape[-1] for t in (q, k, v)]
        _core(b, node, [q, k, v], node.attrs["q_num_heads"], widths, mask, outputs[0], packed=True)
    else:
        dims = [t.shape[-1] for t in (q, k, v)]
        _core(b, node, [q, k, v], q.shape[1], dims, mask, outputs[0], packed=False)


def _core(
    b: _Builder,
    node: gs.Node,
    qkv: list,
    heads: int,
    widths: list[int],
    mask: gs.Tensor | None,
    out: gs.Variable,
    *,
    packed: bool,
) -> None:
    """softmax(q kᵀ / (1/scale) + mask) v per head, written as torch exports it (the pattern
    ONNX Runtime's optimizer fuses again). `packed`: q, k, v are (B, S, H·D) (`widths`: their
    H·D) and are split into heads, the result merged back; otherwise they are (B, H, S, D)
    already (`widths`: their D)."""
    q, k, v = qkv
    dims = [w // heads for w in widths] if packed else list(widths)
    if packed:
        q, k, v = (
            b.op("Reshape", t, b.ints([0, 0, heads, d])) for t, d in zip(qkv, dims, strict=True)
        )
        q, v = (b.op("Transpose", t, perm=[0, 2, 1, 3]) for t in (q, v))
        k = b.op("Transpose", k, perm=[0, 2, 3, 1])
    else:
        k = b.op("Transpose", k, perm=[0, 1, 3, 2])
    scale = node.attrs.get("scale") or 1 / math.sqrt(dims[0])
    scores = b.op("Div", b.op("MatMul", q, k), b.scalar(1 / scale))
    if mask is not None:
        scores = b.op("Add", scores, mask)
    context = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)
    if not packed:
        b.op("Identity", context, out=out)
        return
    merged = b.op("Transpose", context, perm=[0, 2, 1, 3])
    b.op("Reshape", merged, b.ints([0, 0, heads * dims[2]]), out=out)


def _mask_term(b: _Builder, node: gs.Node, inputs: list, index: int, keys: gs.Tensor):
    """The additive (B, 1, 1|S, L) mask term: 0 where attended, mask_filter_value (default
    −10000, ORT's) where not; None without a mask. Token counts n_b attend keys j < n_b, a raw
    mask where it is positive. Written as torch exports BERT's `(1 − mask[:, None, None, :]) ·
    fill` (rank 2), the pattern ONNX Runtime's optimizer fuses into Attention again."""
    if len(inputs) <= index or not inputs[index].name:
        return None
    mask, fill = inputs[index], node.attrs.get("mask_filter_value", -10000.0)
    rank = _mask_rank(mask)
    if rank == 1:
        length = b.op("Squeeze", b.op("Shape", keys, start=1, end=2), b.ints([0]))
        positions = b.op("Range", b.ints(0, scalar=True), length, b.ints(1, scalar=True))
        counts = b.op("Unsqueeze", b.op("Cast", mask, to=7), b.ints([1]))
        allowed = b.op("Less", b.op("Unsqueeze", positions, b.ints([0])), counts)
    else:
        allowed = b.op("Greater", b.op("Cast", mask, to=1), b.scalar(0.0))
    for axis in _MASK_AXES[max(rank, 2)]:
        allowed = b.op("Unsqueeze", allowed, b.ints([axis]))
    masked = b.op("Sub", b.scalar(1.0), b.op("Cast", allowed, to=1))
    return b.op("Mul", masked, b.scalar(fill))


def _skip_ln(b: _Builder, node: gs.Node, inputs: list, outputs: list) -> None:
    """input (+ bias) + skip → LayerNormalization over the last axis; the sum is output 3."""
    total = inputs[0]
    if len(inputs) > 4 and inputs[4].name:
        total = b.op("Add", total, inputs[4])
    total = b.op("Add", total, inputs[1], out=_output(outputs, 3))
    _layer_norm(b, node, total, inputs[2], inputs[3] if len(inputs) > 3 else None, outputs[0])


def _embed_ln(b: _Builder, node: gs.Node, inputs: list, outputs: list) -> None:
    """word[ids] + position[positions or 0 … S−1] (+ segment[segment ids]) → LayerNormalization;
    output 1: tokens per row of the mask; output 2: the sum."""
    ids, segments = inputs[0], _optional(inputs, 1)
    total = b.op("Gather", inputs[2], ids)
    positions = _optional(inputs, 8)
    if positions is None:
        length = b.op("Shape", ids, start=1, end=2)
        table = b.op("Slice", inputs[3], b.ints([0]), length, b.ints([0]))
    else:
        table = b.op("Gather", inputs[3], positions)
    total = b.op("Add", total, table)
    if segments is not None:
        total = b.op("Add", total, b.op("Gather", inputs[4], segments))
    if _output(outputs, 2) is not None:
        total = b.op("Identity", total, out=outputs[2])
    _layer_norm(b, node, total, inputs[5], inputs[6], outputs[0])
    if _output(outputs, 1) is not None:
        ones = b.op("Cast", b.op("Cast", inputs[7], to=9), to=6)
        b.op("ReduceSum", ones, b.ints([1]), keepdims=0, out=outputs[1])


def _layer_norm(b: _Builder, node: gs.Node, x, gamma, beta, out: gs.Variable) -> None:
    epsilon = node.attrs.get("epsilon", 1e-12)
    args = [x, gamma] + ([beta] if beta is not None and beta.name else [])
    b.op("LayerNormalization", *args, axis=-1, epsilon=epsilon, out=out)


def _bias_gelu(b: _Builder, node: gs.Node, inputs: list, outputs: list) -> None:
    """(x + bias) → Gelu (erf form)."""
    _erf_gelu(b, b.op("Add", inputs[0], inputs[1]), outputs[0])


def _gelu(b: _Builder, node: gs.Node, inputs: list, outputs: list) -> None:
    _erf_gelu(b, inputs[0], outputs[0])


def _erf_gelu(b: _Builder, x, out: gs.Variable) -> None:
    """0.5·x·(1 + erf(x/√2)), as torch exports `gelu`."""
    erf = b.op("Erf", b.op("Div", x, b.scalar(math.sqrt(2.0))))
    b.op("Mul", b.op("Mul", x, b.op("Add", erf, b.scalar(1.0))), b.scalar(0.5), out=out)


def _fast_gelu(b: _Builder, node: gs.Node, inputs: list, outputs: list) -> None:
    """y = x (+ bias); 0.5·y·(1 + tanh(√(2/π)·(y + 0.044715·y³))), as torch exports
    `gelu(approximate='tanh')`."""
    y = inputs[0]
    if _optional(inputs, 1) is not None:
        y = b.op("Add", y, inputs[1])
    cube = b.op("Mul", b.op("Pow", y, b.scalar(3.0)), b.scalar(0.044715))
    inner = b.op("Mul", b.op("Add", y, cube), b.scalar(math.sqrt(2 / math.pi)))
    gate = b.op("Add", b.op("Tanh", inner), b.scalar(1.0))
    b.op("Mul", b.op("Mul", y, b.scalar(0.5)), gate, out=outputs[0])


# ------------------------------------------------------------------ helpers


class _Builder:
    """Appends nodes to `graph` named after the fused node they replace."""

    def __init__(self, graph: gs.Graph, prefix: str) -> None:
        self.graph, self.prefix, self.count = graph, prefix, 0

    def op(
        self, op: str, *inputs: gs.Tensor, out: gs.Variable | None = None, tag: str = "", **attrs
    ):
        """A node `op(*inputs)` with `attrs`, named `tag` if given; its output is `out` or a
        new tensor."""
        self.count += 1
        name = f"{self.prefix}/{tag or f'{op}_{self.count}'}"
        output = out if out is not None else gs.Variable(f"{name}_output")
        self.graph.nodes.append(gs.Node(op, name, attrs, list(inputs), [output]))
        return output

    def const(self, values: np.ndarray, tag: str) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{tag}", np.ascontiguousarray(values))

    def scalar(self, value: float) -> gs.Constant:
        """A float32 scalar constant."""
        self.count += 1
        return gs.Constant(f"{self.prefix}/c{self.count}", np.array(value, np.float32))

    def ints(self, values, *, scalar: bool = False) -> gs.Constant:
        """An int64 constant (a 0-d one with `scalar`)."""
        self.count += 1
        array = np.array(values, np.int64)
        return gs.Constant(f"{self.prefix}/i{self.count}", array if scalar else array.reshape(-1))


def _key(node: gs.Node) -> tuple[str, str]:
    return ("" if node.domain in (None, "", "ai.onnx") else node.domain), node.op


def _given(node: gs.Node, *indices: int) -> bool:
    """True when any of the inputs at `indices` is present (named)."""
    return any(i < len(node.inputs) and node.inputs[i].name for i in indices)


def _used(node: gs.Node, index: int, outputs: frozenset[str]) -> bool:
    """True when output `index` exists and something reads it (a node, or the graph's user)."""
    if index >= len(node.outputs) or not node.outputs[index].name:
        return False
    tensor = node.outputs[index]
    return bool(tensor.outputs) or tensor.name in outputs


def _extra_read(node: gs.Node, outputs: frozenset[str]) -> bool:
    """True when an output after the first is read."""
    return any(_used(node, i, outputs) for i in range(1, len(node.outputs)))


def _optional(inputs: list, index: int) -> gs.Tensor | None:
    return inputs[index] if index < len(inputs) and inputs[index].name else None


def _output(outputs: list, index: int) -> gs.Variable | None:
    """Output `index` when the node declares it (written; `cleanup` drops it if unread)."""
    return outputs[index] if index < len(outputs) and outputs[index].name else None


_RULES = {
    (MS, "Attention"): _attention,
    (MS, "MultiHeadAttention"): _mha,
    ("", "Attention"): _attention23,
    (MS, "SkipLayerNormalization"): _skip_ln,
    (MS, "EmbedLayerNormalization"): _embed_ln,
    (MS, "BiasGelu"): _bias_gelu,
    (MS, "Gelu"): _gelu,
    (MS, "FastGelu"): _fast_gelu,
}
_CHECKS = {
    (MS, "Attention"): _check_attention,
    (MS, "MultiHeadAttention"): _check_mha,
    ("", "Attention"): _check_attention23,
    (MS, "SkipLayerNormalization"): _check_skip_ln,
    (MS, "EmbedLayerNormalization"): _check_embed_ln,
}
