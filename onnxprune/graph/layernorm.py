"""LayerNorm → RMSNorm on mean-free residual streams (SliceGPT, Ashkboos et al. 2024).

LayerNorm(x) = γ ⊙ (x − mean(x)) / √(var(x) + ε) + β mixes every channel into every other
through the mean, so no rotation of the channels commutes with it. Two exact rewrites remove
that obstacle:

* **Centre the writers.** Every term summed into the stream a LayerNorm reads (a MatMul/Gemm
  and its bias, an embedding table, a constant such as a position embedding) has its output
  columns centred: W ← W (I − 11ᵀ/d); a writer with no such constant (a class-token Concat
  after a patch-embedding Conv) gets an inserted MatMul by I − 11ᵀ/d. The stream is then
  mean-free, and LayerNorm sees the same input minus its mean, which it ignores.
* **Fold the affine into the readers.** γ scales the rows of every MatMul/Gemm reading the norm
  (W ← diag(γ) W), β W goes into its bias; also through Reshape/Unsqueeze/Squeeze that keep
  every token a row of d values (tf2onnx's Keras Dense and Einsum projections), and writers are
  centred through them the same way. A reader that has no weights (a residual Add after a
  post-LN block, a graph output, pooling) gets one inserted MatMul diag(γ) + β, a consumer of
  the stream; when it feeds another stream (post-LN), its columns are centred like any writer's.

What remains is x / √(Σx²/d + ε), written Mul(x, x) → ReduceSum → Div d → Add ε → Sqrt → Div.
It commutes with any rotation of the channels (ops/rmsnorm.py), and after slicing to k of d
channels it still divides by the original d: the norm of a token whose dropped directions
carry no energy is unchanged. The converted graph computes the same function to float
rounding. A stream that a writer or reader outside these forms touches keeps its LayerNorm,
with the reason recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph.layernorm_match import LayerNorm, find_layernorms
from onnxprune.graph.load import export, import_graph, infer_shapes, set_bias_input
from onnxprune.graph.rewrite import shift_output
from onnxprune.ops.flow import const, without_trailing_ones


@dataclass(frozen=True)
class Conversion:
    """The converted graph, the norms it wrote as RMSNorms (`centred`: those that were
    LayerNorms), and the LayerNorms it kept (why)."""

    graph: gs.Graph
    converted: tuple[str, ...] = ()
    kept: tuple[tuple[str, str], ...] = ()
    centred: tuple[str, ...] = ()


def to_rmsnorm(graph: gs.Graph) -> Conversion:
    """Convert every LayerNorm over the last axis whose stream can be made mean-free.

    `graph` is left unchanged; without a convertible LayerNorm the copy is returned as is.
    """
    graph = import_graph(export(graph))
    norms = list(find_layernorms(graph))
    if not norms:
        return Conversion(graph)
    streams = _settle({norm.name: _stream(norm, norms) for norm in norms})
    converted = [norm for norm in norms if isinstance(streams[norm.name], _Stream)]
    affine = {norm.name: _fold_affine(graph, norm) for norm in converted}
    terms: dict[tuple[str, int], _Term | _Entry] = {}
    centred: set[tuple[str, int]] = set()
    for norm in converted:
        stream = streams[norm.name]
        for term in [*stream.terms, *(t for up in stream.after for t in affine[up])]:
            terms.setdefault(term.key, term)
            if norm.centred:
                centred.add(term.key)
    for key, term in terms.items():
        if key in centred:
            _centre(graph, term)
        elif isinstance(term, _Entry) and term.embedding:  # an RMSNorm's stream: a producer
            _insert_entry(graph, term, np.eye(term.width))
    for norm in converted:
        _replace(graph, norm, graph.opset)
    graph.cleanup().toposort()
    kept = tuple((name, why) for name, why in streams.items() if isinstance(why, str))
    names = tuple(norm.name for norm in converted)
    centred_norms = tuple(norm.name for norm in converted if norm.centred)
    return Conversion(infer_shapes(graph) if names else graph, names, kept, centred_norms)


def fold_embedding_matmuls(graph: gs.Graph) -> None:
    """Gather(E, ids) → MatMul(·, W) becomes Gather(E W, ids) where the MatMul alone reads the
    Gather (its output is no graph output), E is a constant table gathered by rows and W a
    constant no wider than E (in place; equal up to float rounding). This takes back the
    embedding entries the conversion inserts, pruned to the kept directions: the table shrinks
    instead of growing a MatMul."""
    outputs = {id(t) for t in graph.outputs}
    for node in [n for n in graph.nodes if n.op == "MatMul"]:
        weight, tensor = const(node, 1), node.inputs[0]
        gather = _embedding(tensor)
        if id(tensor) in outputs or gather is None or weight is None or weight.ndim != 2:
            continue
        table = const(gather, 0)
        if len(tensor.outputs) != 1 or weight.shape[1] > weight.shape[0]:
            continue
        folded = np.asarray(table, np.float64) @ np.asarray(weight, np.float64)
        gather.inputs[0] = gs.Constant(f"{node.name}__table", folded.astype(table.dtype))
        last = tensor.inputs[0]  # the Gather, or the scale after it (which commutes with W)
        if last is not gather:
            rows = gs.Variable(f"{node.name}__rows", dtype=tensor.dtype)
            last.inputs[last.inputs.index(gather.outputs[0])] = rows
            gather.outputs[0] = rows
        last.outputs[0] = node.outputs[0]
        node.outputs.clear()
    graph.cleanup()


def _embedding(tensor: gs.Tensor) -> gs.Node | None:
    """The Gather of rows of a constant 2-D table that writes `tensor`, directly or through one
    Mul by a scalar constant (Gemma scales its embeddings by √d), each read once; else None."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is not None and node.op == "Mul" and len(node.inputs) == 2:
        scales = [t for t in node.inputs if isinstance(t, gs.Constant) and t.values.size == 1]
        rows = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        if len(scales) != 1 or len(rows) != 1 or len(rows[0].outputs) != 1:
            return None
        node = rows[0].inputs[0] if len(rows[0].inputs) == 1 else None
    if node is None or node.op != "Gather" or node.attrs.get("axis", 0) != 0:
        return None
    table = const(node, 0)
    return node if table is not None and table.ndim == 2 else None


# --- folding γ and β into the readers -----------------------------------------------------


def _fold_affine(graph: gs.Graph, norm: LayerNorm) -> list[_Term]:
    """Fold γ and β into the norm's weight readers; route every other reader through one
    inserted MatMul diag(γ) + β. Returns that affine's constants (to centre when it writes a
    stream), or [] when every reader has weights."""
    others = [
        user
        for user in list(norm.out.outputs)
        if user.op != "Shape" and not _fold_into_reader(graph, user, norm)
    ]
    if not others and not any(t is norm.out for t in graph.outputs):
        return []
    return _insert_affine(graph, norm, others)


def _weight_reader(node: gs.Node, tensor: gs.Tensor) -> bool:
    """True for a MatMul/Gemm reading `tensor` as its features with constant W (, C)."""
    weight = const(node, 1)
    if weight is None or weight.ndim != 2 or node.inputs[0] is not tensor:
        return False
    if node.op == "MatMul":
        return True
    bias_ok = len(node.inputs) < 3 or not node.inputs[2].name or const(node, 2) is not None
    return node.op == "Gemm" and not node.attrs.get("transA", 0) and bias_ok


_ROW_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze"})


def _keeps_rows(node: gs.Node, width: int) -> bool:
    """True for a Reshape/Unsqueeze/Squeeze whose input and output both end in an axis of
    `width`, followed by nothing but axes of size 1: every block of `width` values stays one row
    (tf2onnx's Keras Dense on a sequence reshapes the tokens to rows and back, its Einsums add
    and drop unit axes)."""
    if node.op not in _ROW_OPS or not node.outputs:
        return False
    ends = [without_trailing_ones(list(t.shape or [])) for t in (node.inputs[0], node.outputs[0])]
    return all(end and end[-1] == width for end in ends)


def _weight_readers(tensor: gs.Tensor, width: int) -> list[gs.Node] | None:
    """Every weight reader of `tensor`, reached directly or through ops that keep its rows
    (Shape reads no values); None when any reader is something else."""
    found = []
    for user in tensor.outputs:
        if user.op == "Shape":
            continue  # reads no values
        if _weight_reader(user, tensor):
            found.append(user)
        elif _keeps_rows(user, width) and (deeper := _weight_readers(user.outputs[0], width)):
            found += deeper
        else:
            return None
    return found


def _affine_readers(node: gs.Node, norm: LayerNorm) -> list[gs.Node] | None:
    """The weight readers that take the norm's affine for its reader `node`: `node` itself, or
    those behind it when it keeps the rows; None when the affine cannot be folded there."""
    if _keeps_rows(node, norm.width):
        return _weight_readers(node.outputs[0], norm.width)
    return [node] if _weight_reader(node, norm.out) else None


def _fold_into_reader(graph: gs.Graph, node: gs.Node, norm: LayerNorm) -> bool:
    """W ← diag(γ) W and bias += βᵀ W for a weight reader, or for every weight reader behind
    ops that keep the rows; False for any other reader."""
    readers = _affine_readers(node, norm)
    for reader in readers or []:
        _fold_weight(graph, reader, norm)
    return readers is not None


def _fold_weight(graph: gs.Graph, node: gs.Node, norm: LayerNorm) -> None:
    """W ← diag(γ) W and bias += βᵀ W for weight reader `node` of the norm."""
    weight = const(node, 1)
    transposed = node.op == "Gemm" and node.attrs.get("transB", 0)
    w = np.asarray(weight.T if transposed else weight, np.float64)
    scaled = norm.gamma[:, None] * w
    _set_input(node, 1, scaled.T if transposed else scaled, weight.dtype)
    shift = norm.beta @ w
    if node.op != "MatMul":
        _add_gemm_bias(node, node.attrs.get("alpha", 1.0) * shift, weight.dtype)
    elif np.any(shift):  # a zero shift needs no Add
        shift_output(graph, node, shift, "beta")


def _insert_affine(graph: gs.Graph, norm: LayerNorm, readers: list[gs.Node]) -> list[_Term]:
    """y = n diag(γ) + β as MatMul + Add, read by `readers` instead of the norm's output."""
    dtype = norm.out.dtype or np.float32
    out = gs.Variable(f"{norm.name}__affine", dtype=dtype)
    mid = gs.Variable(f"{norm.name}__affine_mm", dtype=dtype)
    weight = gs.Constant(f"{norm.name}__gamma_matrix", np.diag(norm.gamma).astype(dtype))
    shift = gs.Constant(f"{norm.name}__beta", norm.beta.astype(dtype))
    matmul = gs.Node("MatMul", f"{norm.name}__gamma", inputs=[norm.out, weight], outputs=[mid])
    add = gs.Node("Add", f"{norm.name}__beta_add", inputs=[mid, shift], outputs=[out])
    graph.nodes += [matmul, add]
    for reader in readers:
        for i, tensor in enumerate(reader.inputs):
            if tensor is norm.out:
                reader.inputs[i] = out
    for i, graph_output in enumerate(graph.outputs):
        if graph_output is norm.out:
            _rename_output(graph, i, norm, out)
    return [_Term(matmul, 1, 1), _Term(add, 1, -1)]


def _rename_output(graph: gs.Graph, index: int, norm: LayerNorm, out: gs.Tensor) -> None:
    """Keep the graph output's name on the affine's result; the norm's output gets a new one."""
    name = norm.out.name
    norm.out.name, out.name = f"{name}__normed", name
    out.shape = norm.out.shape
    graph.outputs[index] = out


def _set_input(node: gs.Node, index: int, value: np.ndarray, dtype: np.dtype) -> None:
    node.inputs[index] = gs.Constant(f"{node.inputs[index].name}__{node.name}", value.astype(dtype))


def _add_gemm_bias(node: gs.Node, shift: np.ndarray, dtype: np.dtype) -> None:
    """C ← beta·C + shift, beta ← 1 (C created when missing)."""
    has = len(node.inputs) > 2 and node.inputs[2].name
    old = node.attrs.get("beta", 1.0) * np.asarray(const(node, 2), np.float64) if has else 0.0
    value = np.asarray(old + shift, np.float64)
    node.attrs["beta"] = 1.0
    set_bias_input(node, gs.Constant(f"{node.name}__bias_beta", value.astype(dtype)))


# --- centring the writers -----------------------------------------------------------------


@dataclass(frozen=True)
class _Term:
    """A constant input of a writer whose values along `axis` are the stream's channels."""

    node: gs.Node
    input: int
    axis: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.node.name, self.input)


@dataclass(frozen=True)
class _Entry:
    """A tensor entering the stream from a writer with no constants to centre: an inserted
    MatMul by C = I − 11ᵀ/d centres it (d² MACs per token; a producer for the analyzer).
    `embedding`: the writer is a Gather of a table, which gets the MatMul on an RMSNorm's
    stream too (as I: a producer to rotate) and takes it back into its table on export."""

    tensor: gs.Tensor
    width: int
    embedding: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.tensor.name, -1)


@dataclass(frozen=True)
class _Stream:
    """What makes one norm's input mean-free: constants to centre, and the norms upstream
    (post-LN) whose inserted affine writes into it and must be centred too."""

    terms: tuple[_Term | _Entry, ...]
    after: tuple[str, ...]


def _stream(norm: LayerNorm, norms: list[LayerNorm]) -> _Stream | str:
    """The stream feeding `norm`, followed back through residual Adds to its writers, or why it
    cannot be made mean-free.

    Every tensor on the way must be read only by LayerNorms, Shape, or the Adds that carry it
    on to a LayerNorm: centring changes what any other reader sees. The output of
    an upstream norm (post-LN) is a writer too, through the affine its non-weight readers get.
    """
    readers = {node.name for n in norms for node in n.nodes}
    outputs = {n.out.name: n for n in norms}
    terms, after, tensors, stack = [], [], {}, [norm.x]
    while stack:
        tensor = stack.pop()
        if tensor.name in tensors:
            continue
        tensors[tensor.name] = tensor
        if tensor.name in outputs:
            after.append(outputs[tensor.name])
            continue
        found = _writer_terms(tensor, norm.width)
        if isinstance(found, str):
            return found
        terms += found[0]
        stack += found[1]
    carried = {n.name for t in tensors.values() for n in t.inputs}
    for tensor in tensors.values():
        upstream = outputs.get(tensor.name)
        for user in tensor.outputs:
            if upstream is not None and _affine_readers(user, upstream) is not None:
                continue
            if user.name in readers or user.name in carried or user.op == "Shape":
                continue
            if user.op == "Add" and _leads_to_norm(user, readers, norm.width):
                continue
            return f"the stream '{tensor.name}' is also read by {user.op} '{user.name}'"
    return _Stream(tuple(terms), tuple(n.name for n in after))


def _settle(streams: dict[str, _Stream | str]) -> dict[str, _Stream | str]:
    """A norm whose stream comes from a norm that stays a LayerNorm stays one too."""
    changed = True
    while changed:
        changed = False
        for name, stream in streams.items():
            if isinstance(stream, _Stream):
                blocked = next((u for u in stream.after if isinstance(streams[u], str)), None)
                if blocked is not None:
                    streams[name] = f"its stream comes from LayerNorm '{blocked}', which stays"
                    changed = True
    return streams


def _writer_terms(
    tensor: gs.Tensor, width: int
) -> tuple[list[_Term | _Entry], list[gs.Tensor]] | str:
    """The constants of the node writing `tensor` to centre, and its stream inputs to follow.

    A writer without such constants (a Concat of a class token, a Transpose after a patch
    embedding Conv) is centred by an inserted MatMul C where its output enters the stream."""
    if not tensor.inputs:
        return f"the stream '{tensor.name}' is a graph input, which cannot be centred"
    node = tensor.inputs[0]
    weight = const(node, 1)
    if node.op == "MatMul" and weight is not None and weight.ndim == 2:
        return [_Term(node, 1, 1)], []
    if node.op == "Gemm" and weight is not None and not node.attrs.get("transA", 0):
        return _gemm_terms(node)
    if _embedding(tensor) is not None:
        return [_Entry(tensor, width, embedding=True)], []
    if node.op == "Add":
        return _sum_terms(node)
    elif _keeps_rows(node, width) and _only_reader(node.inputs[0], node):
        return [], [node.inputs[0]]  # the writer before the rows were regrouped
    shape = tensor.shape
    if shape and shape[-1] == width:
        return [_Entry(tensor, width)], []
    return _cannot(node)


def _only_reader(tensor: gs.Tensor, node: gs.Node) -> bool:
    """`node` is the one reader of `tensor` besides Shape reads (OPT reads the shape of the
    stream it reshapes to rows)."""
    readers = [user for user in tensor.outputs if user.op != "Shape"]
    return len(readers) == 1 and readers[0] is node


def _cannot(node: gs.Node) -> str:
    return f"the stream is written by {node.op} '{node.name}', whose width is unknown"


def _gemm_terms(node: gs.Node) -> tuple[list[_Term], list[gs.Tensor]] | str:
    terms = [_Term(node, 1, 0 if node.attrs.get("transB", 0) else 1)]
    if len(node.inputs) > 2 and node.inputs[2].name:
        if const(node, 2) is None:
            return _cannot(node)
        terms.append(_Term(node, 2, -1))
    return terms, []


def _sum_terms(node: gs.Node) -> tuple[list[_Term], list[gs.Tensor]]:
    """An Add sums writers: its constant operands are centred, its other inputs followed."""
    terms, inputs = [], []
    for i, tensor in enumerate(node.inputs):
        if isinstance(tensor, gs.Constant):
            terms.append(_Term(node, i, -1))
        else:
            inputs.append(tensor)
    return terms, inputs


def _leads_to_norm(node: gs.Node, readers: set[str], width: int) -> bool:
    """True when `node`'s output reaches a LayerNorm through Adds and ops that keep its rows
    only (OPT reshapes the tokens to rows between its residual Adds)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        for user in current.outputs[0].outputs:
            if user.name in readers:
                return True
            if user.op == "Add" or _keeps_rows(user, width):
                stack.append(user)
    return False


def _centre(graph: gs.Graph, term: _Term | _Entry) -> None:
    """Subtract the mean over the stream's channels from the writer's constant, or insert the
    centring MatMul (the writer's output renamed; every reader keeps reading the old tensor)."""
    if isinstance(term, _Entry):
        _insert_entry(graph, term, np.eye(term.width) - 1.0 / term.width)
        return
    value = np.asarray(term.node.inputs[term.input].values)
    work = value.astype(np.float64).reshape(value.shape or (1,))
    work = work - work.mean(axis=term.axis, keepdims=True)
    _set_input(term.node, term.input, work.reshape(value.shape), value.dtype)


def _insert_entry(graph: gs.Graph, term: _Entry, matrix: np.ndarray) -> None:
    """The writer's output renamed and multiplied by `matrix`; every reader keeps reading the
    old tensor. After an embedding Gather, export folds the (pruned) matrix into the table
    (`fold_embedding_matmuls`)."""
    tensor = term.tensor
    writer = tensor.inputs[0]
    raw = gs.Variable(f"{tensor.name}__uncentred", dtype=tensor.dtype, shape=tensor.shape)
    writer.outputs[writer.outputs.index(tensor)] = raw
    constant = gs.Constant(f"{tensor.name}__centring", matrix.astype(tensor.dtype or np.float32))
    graph.nodes.append(gs.Node("MatMul", f"{tensor.name}__centre", inputs=[raw, constant],
                               outputs=[tensor]))  # fmt: skip


# --- the RMSNorm that replaces the LayerNorm --------------------------------------------------


def _replace(graph: gs.Graph, norm: LayerNorm, opset: int) -> None:
    """x / √(Σ_c x² / d + ε) over the last axis, writing the norm's output tensor."""
    for node in norm.nodes:
        node.outputs.clear()
    dtype = norm.x.dtype or np.float32
    name = f"{norm.name}__rms"

    def var(suffix: str) -> gs.Variable:
        return gs.Variable(f"{name}_{suffix}", dtype=dtype)

    square, total, mean, shifted, root = (var(s) for s in ("sq", "sum", "mean", "eps", "root"))
    axes = np.array([-1], np.int64)
    reduce_inputs = [square] if opset < 13 else [square, gs.Constant(f"{name}_axes", axes)]
    reduce_attrs = {"keepdims": 1, **({"axes": [-1]} if opset < 13 else {})}
    scalar = lambda s, v: gs.Constant(f"{name}_{s}", np.array(v, dtype))  # noqa: E731
    graph.nodes += [
        gs.Node("Mul", name, inputs=[norm.x, norm.x], outputs=[square]),
        gs.Node("ReduceSum", f"{name}_sum", reduce_attrs, reduce_inputs, [total]),
        gs.Node("Div", f"{name}_width", inputs=[total, scalar("d", norm.width)], outputs=[mean]),
        gs.Node("Add", f"{name}_add", inputs=[mean, scalar("e", norm.eps)], outputs=[shifted]),
        gs.Node("Sqrt", f"{name}_sqrt", inputs=[shifted], outputs=[root]),
        gs.Node("Div", f"{name}_div", inputs=[norm.x, root], outputs=[norm.out]),
    ]
