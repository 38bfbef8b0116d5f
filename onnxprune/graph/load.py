"""Read, normalize and write ONNX models.

`load_model` turns a path into a checked `ModelProto` (clear one-line errors for every way a file
can be wrong; a model below the supported opsets converted up by ONNX's version converter);
`normalize` returns the graph every later stage works on: Constant nodes folded into
initializers, fused transformer ops (ONNX Runtime's `com.microsoft` Attention, SkipLayerNorm …,
opset-23 Attention) written out as standard ops (graph/fused.py), subgraphs computed from
constants alone folded into constants, Identity/Dropout removed, packed q/k/v projections taken
apart (graph/packed.py), channels-last flattens before a dense layer made channel-major
(graph/channels_last.py), BatchNormalization folded into
the Conv/Gemm before it where that is exact, unique node names, shapes inferred. `save_model`
writes atomically. What a fold removes and magnitude ranking still reads (γ, σ and the raw filter
norms) stays readable through `folded_batchnorms`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx_graphsurgeon.importers.onnx_importer import (
    get_onnx_tensor_dtype,
    get_onnx_tensor_shape,
    get_onnx_tensor_type,
)

from onnxprune.errors import ModelLoadError, first_line
from onnxprune.graph.channels_last import flatten_channels_first
from onnxprune.graph.external import (
    copy_mapped,
    drop_pages,
    is_mapped,
    map_external,
    mapped_array,
    mapped_length,
    mapped_source,
    materialized_tensor,
)
from onnxprune.graph.fused import MS, expand_fused
from onnxprune.graph.packed import unpack_projections
from onnxprune.graph.repeat_kv import gather_repeats
from onnxprune.ops.flow import AXIS_MOVES, const, rank_of, shape_of
from onnxprune.ops.shape_values import (
    dim_origin,
    inferred_size,
    shape_entry,
    shape_source,
    vector_entry,
)

# From opset 24 to 28 ONNX changed the ops the tool reads only by new types and clearer docs
# (schema by schema: inputs and attributes unchanged), but for Attention (24: nonpad_kv_seqlen,
# 25: a sliding window; both refused by graph/fused.py), Cast's round_mode (float8 only) and
# SpaceToDepth's mode (no rule reads it); the ops new there (Swish, SwiGLU, CumProd …) have no
# rule, so the analysis refuses them with the reason.
SUPPORTED_OPSETS = range(11, 29)
# bytes above which a model is written with external data and run, checked and shape-inferred
# without serializing it whole (protobuf refuses 2 GB); ONNXPRUNE_EXTERNAL_LIMIT lowers it so
# tests and benchmarks can send a small model down the same path
EXTERNAL_LIMIT = int(os.environ.get("ONNXPRUNE_EXTERNAL_LIMIT", 1_800_000_000))
_STUB_MIN_ELEMENTS = 64  # float initializers larger than this become typed inputs for inference
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    | {onnx.TensorProto.BFLOAT16}
    | {
        getattr(onnx.TensorProto, n)
        for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
        if hasattr(onnx.TensorProto, n)
    }
)
_FOLD_MIN_BYTES = 1 << 20  # a folded tensor may always be this large (see `fold_constants`)


def load_model(
    path: str | os.PathLike, *, weights: bool = True, mapped: bool = False
) -> onnx.ModelProto:
    """Load an ONNX file (with its external data unless `weights` is False; with `mapped`, that
    data stays in its files, memory-mapped where read: graph/external.py); reject what later
    stages cannot handle."""
    return load_with_layout(path, weights=weights, mapped=mapped).model


class Loaded(NamedTuple):
    """A loaded model, whether its file keeps some initializers in external data files, and
    the default-domain opset it was converted from (None: loaded at its own opset)."""

    model: onnx.ModelProto
    external: bool
    converted_from: int | None = None

    def notes(self) -> tuple[str, ...]:
        """The report's note on the conversion (none without one)."""
        if self.converted_from is None:
            return ()
        opset = default_opset(self.model)
        return (
            f"converted from opset {self.converted_from} to opset {opset} by ONNX's version "
            f"converter before pruning: the pruned model is written at opset {opset}",
        )


def load_with_layout(
    path: str | os.PathLike, *, weights: bool = True, mapped: bool = False
) -> Loaded:
    """`load_model`, and whether the file keeps some initializers in external data files (read
    from the same parse: parsing ResNet-50's file again only to ask took 0.15 CPU s) and the
    opset it was converted from."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file '{path}' does not exist")
    if not path.is_file():
        raise ModelLoadError(f"model path '{path}' is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"'{path}' is not a valid ONNX file ({first_line(exc, 200)})") from exc
    if not model.graph.node or not model.opset_import:
        raise ModelLoadError(f"'{path}' is not an ONNX model (no graph nodes or opset)")
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if weights and mapped:
        map_external(model, path.parent)
    elif weights:
        _load_external(model, path)
    return upgraded(model, external)


def upgraded(model: onnx.ModelProto, external: bool = False) -> Loaded:
    """`model` at a supported default-domain opset: as it is when its opset is supported; one
    below the range (ONNX Model Zoo's classics are opset 7–9) converted to the lowest supported
    opset by `onnx.version_converter`, ONNX's own per-op adapters (Upsample becomes Resize,
    BatchNormalization loses its old attributes …), which keep the function but for Resize's
    sampling (stated by `_keep_legacy_resize`), and its IR version raised to one that opset
    needs; one above the range, or one the converter cannot convert, refused."""
    opset = default_opset(model)
    if opset in SUPPORTED_OPSETS:
        return Loaded(model, external)
    supported = f"{SUPPORTED_OPSETS.start}–{SUPPORTED_OPSETS.stop - 1}"
    if opset > SUPPORTED_OPSETS.stop - 1:
        raise ModelLoadError(f"model uses opset {opset}; supported opsets are {supported}")
    hint = f"export the model again at an opset in {supported}"
    model = _without_image_scalers(model)
    defined = {schema.name for schema in onnx.defs.get_all_schemas() if schema.domain == ""}
    gone = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")} - defined)
    if gone:  # experimental ops of old opsets (Crop, ScaledTanh …): the converter has no schema
        raise ModelLoadError(
            f"model uses opset {opset} and ops that ONNX no longer defines ({', '.join(gone)}): "
            f"it cannot be converted to opset {SUPPORTED_OPSETS.start}",
            hint=hint,
        )
    try:
        converted = onnx.version_converter.convert_version(model, SUPPORTED_OPSETS.start)
    except Exception as exc:  # the converter raises RuntimeError, ValueError, C++ errors …
        raise ModelLoadError(
            f"model uses opset {opset} and ONNX's version converter cannot bring it to opset "
            f"{SUPPORTED_OPSETS.start}: {first_line(exc)}",
            hint=hint,
        ) from exc
    _keep_legacy_resize(converted.graph)
    # the IR version must allow the new opset; from IR 4 on, initializers need not be listed as
    # graph inputs (the IR-3 files of old exporters list every weight), which the rewrite needs
    minimum = onnx.helper.find_min_ir_version_for(list(converted.opset_import))
    converted.ir_version = max(converted.ir_version, minimum)
    return Loaded(converted, external, opset)


def _without_image_scalers(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (a copy, if it has any) with each ImageScaler — an experimental op of opsets ≤ 9
    that ONNX no longer defines, found in old image models — written as what it computes,
    y = scale · x + bias[c] on N×C×H×W: Mul by a Constant scale, then Add of a (1, C, 1, 1)
    Constant bias."""
    if not any(n.op_type == "ImageScaler" for n in model.graph.node):
        return model
    model = copy_model(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type != "ImageScaler":
            nodes.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        bias = np.asarray(attrs.get("bias", []), np.float32).reshape(1, -1, 1, 1)
        scale = np.asarray(attrs.get("scale", 1.0), np.float32)
        stem = f"{node.name or node.output[0]}__image_scaler"
        for part, value in (("scale", scale), ("bias", bias)):
            tensor = numpy_helper.from_array(value, f"{stem}_{part}")
            nodes.append(onnx.helper.make_node("Constant", [], [tensor.name], value=tensor))
        nodes.append(onnx.helper.make_node("Mul", [node.input[0], f"{stem}_scale"], [stem]))
        nodes.append(onnx.helper.make_node("Add", [stem, f"{stem}_bias"], list(node.output)))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _keep_legacy_resize(graph: onnx.GraphProto) -> None:
    """State the sampling of opset ≤ 10 (Upsample, Resize-10) on every Resize the converter
    wrote, in place: it leaves Resize-11's defaults (half-pixel centres, nearest rounded), which
    moved LR-ASPP's bilinear upsampling by 0.59 of its output's range. Old Upsample/Resize map
    output x to input x / scale (asymmetric) and, for nearest, take the floor where they
    upsample (what they are exported for; ONNX Runtime rounds up where they shrink an axis)."""
    for node in graph.node:
        if node.op_type == "Resize" and node.domain in ("", "ai.onnx"):
            stated = {a.name: a.s.decode() for a in node.attribute}
            legacy = {"coordinate_transformation_mode": "asymmetric"}
            if stated.get("mode", "nearest") == "nearest":
                legacy["nearest_mode"] = "floor"
            node.attribute.extend(
                onnx.helper.make_attribute(name, value)
                for name, value in legacy.items()
                if name not in stated
            )
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _keep_legacy_resize(attribute.g)
            for sub in attribute.graphs:
                _keep_legacy_resize(sub)


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ('' / 'ai.onnx') operator set."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ModelLoadError("model declares no default-domain opset")


def too_large_for_protobuf(model: onnx.ModelProto) -> bool:
    """Protobuf cannot serialize 2 GB: such models must be written with external data (and
    run, checked and shape-inferred without serializing them whole)."""
    return model_bytes(model) > EXTERNAL_LIMIT


def model_bytes(model: onnx.ModelProto) -> int:
    """The serialized size of `model`, counted per initializer and node: protobuf's own
    `ByteSize` raises past 2 GB."""
    graph = model.graph
    tensors = sum(
        mapped_length(t) if is_mapped(t) else len(t.raw_data) or t.ByteSize()
        for t in graph.initializer
    )
    return (
        tensors + sum(n.ByteSize() for n in graph.node) + sum(f.ByteSize() for f in model.functions)
    )


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of `model` that works past 2 GB (a serialize/parse round trip does not)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose float initializers of more than 64 elements are typed graph
    inputs without data: shape inference and the checker need only their types and shapes, and
    the copy is small whatever the size of the weights. The large tensors are never copied."""
    copy = _without_initializers(model)
    inputs = {vi.name: i for i, vi in enumerate(copy.graph.input)}
    for init in model.graph.initializer:
        if init.data_type in FLOAT_TYPES and math.prod(init.dims) > _STUB_MIN_ELEMENTS:
            stub = onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            if init.name in inputs:
                copy.graph.input[inputs[init.name]].CopyFrom(stub)
            else:
                copy.graph.input.append(stub)
        else:
            copy.graph.initializer.add().CopyFrom(
                materialized_tensor(init) if is_mapped(init) else init
            )
    return copy


def add_inferred_shapes(model: onnx.ModelProto) -> None:
    """Set `model`'s intermediate and output shapes by ONNX shape inference (with data
    propagation, through shape-preserving function calls), run on `weightless_copy`: weights
    are never serialized, so this works past the protobuf limit and costs no copy of them.
    Raises ONNX's InferenceError."""
    work = onnx.shape_inference.infer_shapes(weightless_copy(model), data_prop=True)
    while copy_function_shapes(work):
        work = onnx.shape_inference.infer_shapes(work, data_prop=True)
    del model.graph.value_info[:]
    model.graph.value_info.extend(work.graph.value_info)
    del model.graph.output[:]
    model.graph.output.extend(work.graph.output)


@dataclass(frozen=True)
class FoldedBatchNorm:
    """A BatchNormalization folded into its producer at load time, per output channel: γ,
    σ = √(var + ε), and the L1 and L2 norms of the producer's filter rows before the fold.

    The fold multiplies each filter by γ/σ, so the folded weights alone no longer show which
    channels the network itself scaled down (network slimming's |γ|) nor the raw filter norms.
    """

    gamma: np.ndarray
    sigma: np.ndarray
    raw_l1: np.ndarray
    raw_l2: np.ndarray

    def rows(self, lo: int, hi: int) -> FoldedBatchNorm:
        """The same record for output channels lo..hi-1 (a group cut by a Split)."""
        return FoldedBatchNorm(*(v[lo:hi] for v in vars(self).values()))


def normalize(model: onnx.ModelProto) -> gs.Graph:
    """Return the canonical graph: constants folded, no-ops removed, BN folded, shapes inferred."""
    model = _constants_to_initializers(model)
    graph = _with_inferred_shapes(import_graph(model))
    _name_nodes(graph)
    _state_softmax_axes(graph, default_opset(model))
    if expand_fused(graph, default_opset(model)):
        graph = infer_shapes(graph)
    _remove_noops(graph)
    _bypass_broadcast_expands(graph)
    _copy_dims_as_zero(graph)
    graph = _fold_until_settled(graph)
    _bypass_identity_reshapes(graph)
    _state_inferred_sizes(graph)
    _add_constants_first(graph)
    _own_targets(graph)
    _own_tables(graph)
    _gather_from_concat_part(graph)
    flatten_channels_first(graph)
    folds = _fold_batchnorm(graph)
    graph.cleanup().toposort()
    graph = infer_shapes(graph)
    if unpack_projections(graph):  # reads inferred shapes, so after inference, then again
        graph = infer_shapes(graph.cleanup().toposort())
    if gather_repeats(graph):  # proves sizes with inferred shapes
        graph = infer_shapes(graph.cleanup().toposort())
    graph.folded_batchnorms = folds  # plain attribute: a copy or re-import drops it
    return graph


def folded_batchnorms(graph: gs.Graph) -> dict[str, FoldedBatchNorm]:
    """The BatchNorms `normalize` folded, by producer node name (empty for other graphs)."""
    return getattr(graph, "folded_batchnorms", None) or {}


def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """Forget intermediate shapes and infer them again (after rewriting, old ones are stale);
    returns `graph`, changed in place. Inference runs on `weightless_export(graph)` and the
    shapes found are copied back, so no weight is copied (whatever the model's size)."""
    io = {t.name for t in graph.inputs + graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in io:
            tensor.shape = None
    model = weightless_export(graph)
    try:
        add_inferred_shapes(model)
    except onnx.onnx_cpp2py_export.shape_inference.InferenceError as exc:
        raise ModelLoadError(f"shape inference failed: {first_line(exc, 200)}") from exc
    set_shapes(graph, model)
    return graph


def weightless_export(graph: gs.Graph) -> onnx.ModelProto:
    """`graph` exported with its float constants of more than 64 elements as initializers
    without data (name, type and dims; marked external, with no location): what shape
    inference (`add_inferred_shapes`) and counting (`measure.cost.count`) read, and small. The
    graph's arrays are neither copied nor serialized. Not a model to run or save."""
    copy = graph.copy()  # shares the constants' arrays with `graph`
    stubs = set()
    for tensor in copy.tensors().values():
        if isinstance(tensor, gs.Constant) and _stubbed(tensor):
            stub = tensor.to_variable(shape=list(tensor.shape))
            stub.type = "tensor_type"  # what Variable() sets and to_variable does not
            copy.inputs.append(stub)
            stubs.add(stub.name)
    model = export(copy)
    inputs = [info for info in model.graph.input if info.name not in stubs]
    for info in model.graph.input:
        if info.name in stubs:
            kind = info.type.tensor_type
            tensor = model.graph.initializer.add(name=info.name, data_type=kind.elem_type)
            tensor.dims.extend(d.dim_value for d in kind.shape.dim)
            tensor.data_location = onnx.TensorProto.EXTERNAL
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return model


def set_shapes(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Give `graph`'s variables the types and shapes `model` (its export, shape-inferred)
    declares for tensors of the same names: its value_info and outputs."""
    infos = {info.name: info for info in (*model.graph.value_info, *model.graph.output)}
    for name, tensor in graph.tensors().items():
        info = infos.get(name)
        if isinstance(tensor, gs.Variable) and info is not None and info.type.ByteSize():
            tensor.dtype = get_onnx_tensor_dtype(info)
            tensor.shape = get_onnx_tensor_shape(info)
            tensor.type = get_onnx_tensor_type(info)


def _stubbed(tensor: gs.Constant) -> bool:
    """A float constant of more than 64 elements: shape inference needs its type and shape only."""
    try:
        dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
    except (KeyError, TypeError, ValueError):  # not a numpy type: exported with its data
        return False
    return dtype in FLOAT_TYPES and math.prod(tensor.shape) > _STUB_MIN_ELEMENTS


# model-local functions whose output has the shape and type of their input (ONNX shape
# inference cannot see through their bodies: the axes come from attribute references), and
# ONNX Runtime's element-wise fused ops that graph/fused.py may leave in place
SHAPE_PRESERVING = frozenset(
    {("onnxprune", "TSRA"), ("onnxprune", "RMSNorm")}
    | {(MS, op) for op in ("SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu")}
)


def copy_function_shapes(model: onnx.ModelProto) -> bool:
    """Give shape-preserving function calls their input's type; True if any was added."""
    infos = {v.name: v for v in (*model.graph.input, *model.graph.value_info)}
    added = False
    for node in model.graph.node:
        if (node.domain, node.op_type) not in SHAPE_PRESERVING or _shaped(infos, node.output[0]):
            continue
        if not _shaped(infos, node.input[0]):
            continue
        info = infos.get(node.output[0]) or model.graph.value_info.add()
        info.CopyFrom(infos[node.input[0]])
        info.name = node.output[0]
        infos[info.name] = info
        added = True
    return added


def _shaped(infos: dict, name: str) -> bool:
    return name in infos and infos[name].type.tensor_type.HasField("shape")


class MappedValues(gs.ir.tensor.LazyValues):
    """A constant left in its external data file (graph/external.py): read as a memory map,
    exported as the same external reference until something replaces its values."""

    def load(self) -> np.ndarray:
        return mapped_array(self.tensor)


def drop_mapped_pages(graph: gs.Graph) -> None:
    """Release the resident pages of every constant of `graph` read through its input's memory
    map (`external.drop_pages`): a stage that read the weights (scores, a rewrite's selections)
    leaves them in RSS until the graph is freed otherwise."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and isinstance(tensor._values, np.ndarray):
            drop_pages(tensor._values)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """`gs.import_onnx(model)` whose mapped initializers read their memory maps (graphsurgeon's
    own lazy values would ask ONNX to load them, which refuses an absolute location)."""
    graph = gs.import_onnx(model)
    for tensor in graph.tensors().values():
        lazy = getattr(tensor, "_values", None)
        if type(lazy) is gs.ir.tensor.LazyValues and is_mapped(lazy.tensor):
            tensor.values = MappedValues(lazy.tensor)
            tensor.data_location = None  # else an export of its read values is marked external
    return graph


def export(graph: gs.Graph) -> onnx.ModelProto:
    """Export a graphsurgeon graph to a ModelProto, keeping opset imports and IR version. A
    constant whose values are still its input's memory map is exported as that external
    reference (graph/external.py), not as a copy of its bytes."""
    read = [
        (tensor, tensor.values)
        for tensor in graph.tensors().values()
        if isinstance(tensor, gs.Constant) and mapped_source(tensor._values) is not None
    ]
    for tensor, values in read:  # a copy: graphsurgeon renames the proto it exports
        source = onnx.TensorProto()
        source.CopyFrom(mapped_source(values))
        tensor.values = MappedValues(source)
    try:
        return gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in read:
            tensor.values = values


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False
) -> None:
    """Write `model` to `path` atomically: everything goes into a temporary folder beside the
    target first (the model and, with `external_data` or past the protobuf limit, its
    `<name>.data` file), then is renamed into place, the data file first. `model` itself is not
    changed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as folder:
        staged = Path(folder) / path.name
        if external_data or too_large_for_protobuf(model):
            data = write_external(model, staged)
            os.replace(data, path.with_name(data.name))
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, path)


def write_external(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path` with every tensor of 1 KiB or more in one `<name>.data` file
    beside it (ONNX's external data layout, offsets aligned to 4 KiB so ONNX Runtime can map
    them); returns the data file's path. Unlike `onnx.save_model(..., save_as_external_data=True)`
    this leaves `model` unchanged without copying it: only the graph without weights is
    serialized."""
    data = path.with_name(f"{path.name}.data")
    skeleton = _without_initializers(model)
    with open(data, "wb") as out:
        for init in model.graph.initializer:
            tensor = skeleton.graph.initializer.add()
            mapped = is_mapped(init)
            if mapped:
                size = mapped_length(init)
            else:
                raw = b"" if init.data_type == onnx.TensorProto.STRING else _raw_bytes(init)
                size = len(raw)
            if size < 1024:
                tensor.CopyFrom(materialized_tensor(init) if mapped else init)
                continue
            out.seek(-out.tell() % 4096, os.SEEK_CUR)
            tensor.name, tensor.data_type = init.name, init.data_type
            tensor.dims.extend(init.dims)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            where = {"location": data.name, "offset": out.tell(), "length": size}
            for key, value in where.items():
                tensor.external_data.add(key=key, value=str(value))
            if mapped:
                copy_mapped(init, out)  # streamed from the input's file, never whole in memory
            else:
                out.write(raw)
    onnx.save_model(skeleton, str(path))
    return data


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's data in `raw_data` layout (little-endian, packed), wherever it is stored."""
    return tensor.raw_data or numpy_helper.to_array(tensor).tobytes()


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with an empty initializer list, made without copying the weights."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip="graph")
    _copy_fields(model.graph, copy.graph, skip="initializer")
    return copy


def _copy_fields(source, target, *, skip: str) -> None:
    """Copy every set field of protobuf message `source` but `skip` into `target`."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # a repeated field (descriptors' `label` is gone in 7.x)
            getattr(target, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _load_external(model: onnx.ModelProto, path: Path) -> None:
    """Load external tensors, naming the missing data file when there is one."""
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not (path.parent / location).is_file():
            raise ModelLoadError(
                f"external data file '{location}' for tensor '{tensor.name}' is missing "
                f"(looked in '{path.parent}')"
            )
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot read external data of '{path}': {first_line(exc, 200)}"
        ) from exc


_CONSTANT_ATTRS = {
    "value": numpy_helper.to_array,
    "value_float": lambda v: np.array(v, dtype=np.float32),
    "value_floats": lambda v: np.array(list(v), dtype=np.float32),
    "value_int": lambda v: np.array(v, dtype=np.int64),
    "value_ints": lambda v: np.array(list(v), dtype=np.int64),
}


def _constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn top-level Constant nodes (Paddle-style weights) into initializers, in a copy of
    `model`; `model` itself when it has none (no copy of its weights)."""
    if not any(_constant_attr(node) for node in model.graph.node):
        return model
    model = copy_model(model)
    keep = []
    for node in model.graph.node:
        attr = _constant_attr(node)
        if attr is None:
            keep.append(node)
            continue
        value = onnx.helper.get_attribute_value(attr)
        array = _CONSTANT_ATTRS[attr.name](value)
        model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _constant_attr(node: onnx.NodeProto) -> onnx.AttributeProto | None:
    """The value attribute of a standard Constant node that `_CONSTANT_ATTRS` reads, else None."""
    attr = node.attribute[0] if node.op_type == "Constant" and node.attribute else None
    if attr is None or node.domain not in ("", "ai.onnx") or attr.name not in _CONSTANT_ATTRS:
        return None
    return attr


def _with_inferred_shapes(graph: gs.Graph) -> gs.Graph:
    """`graph`, changed in place, with intermediate shapes where inference finds them (Shape
    nodes fold only on known shapes); unchanged when inference fails, which `infer_shapes`
    reports later."""
    model = weightless_export(graph)
    with contextlib.suppress(onnx.onnx_cpp2py_export.shape_inference.InferenceError):
        add_inferred_shapes(model)
        set_shapes(graph, model)
    return graph


def fold_constants(graph: gs.Graph) -> gs.Graph:
    """Replace every subgraph computed from constants alone by its value (Paddle's
    `Reshape(Constant, Constant)` biases and Mul/Add BatchNorm factors, torch's Shape→Gather→Concat
    on static dims), so the analyzer sees constant weights and shapes.

    graphsurgeon's `fold_constants` does it: it is maintained, already a dependency, evaluates the
    subgraphs with ONNX Runtime (every op ORT runs, exactly as ORT would) and keeps tensor names,
    so graph inputs and outputs stay as they were; ORT's own basic optimisation level would also
    fuse and rename nodes. Shape nodes fold where the shapes the graph carries are static.

    Not folded: a tensor larger than the largest constant already in the file (a weight computed
    from constants is a weight) and 1 MiB, so an Expand/Tile of a constant is not blown up into
    the file; float-to-float Casts of more than a few values, so an fp16 weight does not become a
    twice larger fp32 one
    (graphsurgeon keeps (De)QuantizeLinear for the same reason); whatever fails (`error_ok`).
    The nodes that computed folded tensors stay until `cleanup()`. ORT's warnings about the
    sessions graphsurgeon opens (optimizer notes on shape subgraphs) are silenced: they concern
    no model the user runs.
    """
    if not any(_foldable(node) for node in graph.nodes):
        return graph  # most files: nothing to fold, and folding would export the whole graph
    for node in filter(_foldable, graph.nodes):  # graphsurgeon exports these to run them:
        for tensor in node.inputs:  # read mapped ones, so it writes their bytes, not their maps
            if isinstance(tensor, gs.Constant) and isinstance(tensor._values, MappedValues):
                tensor.values = tensor.values
    sizes = [t.values.nbytes for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    threshold = max([_FOLD_MIN_BYTES, *sizes])
    graph.toposort()
    ort.set_default_logger_severity(3)
    try:
        graph.fold_constants(
            size_threshold=threshold, error_ok=True, should_exclude_node=_keeps_number_format
        )
    finally:
        ort.set_default_logger_severity(2)  # ORT's default
    return graph


def _fold_until_settled(graph: gs.Graph) -> gs.Graph:
    """Fold constants, infer shapes again and fold again while a fold removes nodes: a value
    computed from the shape of a tensor whose shape was itself computed (ShuffleNet's chunk
    bounds, read from the previous unit's reshaped output) folds only once the shapes before
    it are known (16 units: 8 rounds)."""
    while True:
        count = len(graph.nodes)
        fold_constants(graph).cleanup()
        if len(graph.nodes) == count:
            return graph
        graph = _with_inferred_shapes(graph)


def _keeps_number_format(node: gs.Node) -> bool:
    """A Cast from a float constant of more than _SMALL_CONSTANT values to another float type
    (graphsurgeon itself never folds (De)QuantizeLinear). Small ones fold: float16 converters
    write a Resize's scales as a float16 constant cast back to float32, which the Resize rule
    must read as a constant."""
    if node.op != "Cast" or not _const(node, 0) or node.inputs[0].values.size <= _SMALL_CONSTANT:
        return False
    target = onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])
    return node.inputs[0].values.dtype.kind == "f" and np.dtype(target).kind == "f"


_SMALL_CONSTANT = 64


def _foldable(node: gs.Node) -> bool:
    """A Shape node, or a node computed from constants alone: where folding starts."""
    return node.op == "Shape" or all(isinstance(t, gs.Constant) for t in node.inputs if t.name)


def _copy_dims_as_zero(graph: gs.Graph) -> None:
    """Write a Reshape target's dim i of its own input x at position i (one entry of Shape(x),
    read by a Gather or a Slice, through Unsqueeze/Cast) as Reshape's 0 ("copy dim i"), and a
    constant target's -1 at position i as 0 where the other entries fix it to x's dim i: the
    same values by definition, and constant. torch exports `x.view(x.size(0), -1)` with a Gather
    of the shape, Paddle `flatten` with a Slice, Paddle's channel shuffle as
    Reshape(x, [-1, g, C/g, H, W]); with a dynamic batch the first targets then fold to [0, -1],
    a flatten the analyzer reads, and the last keeps the batch's symbol through shape inference.
    The dynamo exporter's `allowzero` is dropped from constant targets with no 0 entry, where it
    changes nothing (`x.flatten(2)` written as Reshape(x, [-1, C, H·W])). An entry read from a
    shape whose size is proven static (`dim_origin`) is written as that constant: HF SegFormer
    reshapes tokens back to an image with the height and width read from an earlier map."""
    for node in graph.nodes:
        if node.op != "Reshape":
            continue
        constant = isinstance(node.inputs[1], gs.Constant)
        if node.attrs.get("allowzero", 0):  # dynamo's: it only matters for entries of 0
            if not constant or not np.all(node.inputs[1].values):
                continue
            del node.attrs["allowzero"]
        if constant:
            _copy_inferred_dim(node)
            continue
        concat = _producer(node.inputs[1], "Concat")
        if concat is None or concat.attrs.get("axis") != 0:
            continue
        position = 0
        for k, part in enumerate(concat.inputs):
            size = shape_of(part)
            if size is None or len(size) != 1 or not isinstance(size[0], int):
                break
            if size[0] == 1 and _copies_dim(part, node.inputs[0], position):
                zero = gs.Constant(f"{concat.name}.copy{position}", np.zeros(1, np.int64))
                concat.inputs[k] = zero
            elif size[0] == 1 and not isinstance(part, gs.Constant):
                stated = shape_entry(part, 0)  # a static size read from a shape: a constant
                if isinstance(stated, int) and stated > 0:
                    value = np.array([stated], np.int64)
                    concat.inputs[k] = gs.Constant(f"{concat.name}.size{position}", value)
            position += size[0]


def _copies_dim(piece: gs.Tensor, x: gs.Tensor, position: int) -> bool:
    """True when the one-entry shape piece is dim `position` of x: read from Shape(x) there, or
    from a dim of another tensor proven (`dim_origin`) the same symbolic size as x's (HF
    SegFormer takes the batch for its image Reshapes from the tokens' shape). Static sizes are
    written as constants instead (`_copy_dims_as_zero`)."""
    source = shape_source(piece, 0)
    if source is None or source == (x, position):
        return source is not None
    size = dim_origin(*source)
    return isinstance(size, str) and size == dim_origin(x, position)


def _bypass_identity_reshapes(graph: gs.Graph) -> None:
    """Bypass a Reshape whose every target entry but one -1 is its input's own dim there (a 0,
    or a size proven equal to the input's by `dim_origin`): its output is its input. HF's
    attention modules write `out.reshape(B, -1, S, D)` on (B, H, S, D), and the head count the
    -1 stands for would count as computed."""
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.op != "Reshape" or node.outputs[0].name in outputs:
            continue
        x, target = node.inputs[0], node.inputs[1]
        rank = rank_of(x)
        if rank is None or shape_of(target) != [rank]:
            continue
        entries = [vector_entry(target, i) for i in range(rank)]
        allowzero = node.attrs.get("allowzero", 0)
        if entries.count(-1) > 1 or any(
            e != -1 and not (e == 0 and not allowzero) and (e is None or e != dim_origin(x, i))
            for i, e in enumerate(entries)
        ):
            continue
        for reader in list(node.outputs[0].outputs):
            reader.inputs[reader.inputs.index(node.outputs[0])] = x


def _state_inferred_sizes(graph: gs.Graph) -> None:
    """Write a constant Reshape target's -1 as the size it stands for (`inferred_size`) where
    shape inference lost it (the output's dim there is not static). Inference then finds the
    sizes after it (HF SegFormer's tokens back to an image as [0, -1, H, W], the -1 its channel
    count)."""
    for node in graph.nodes:
        target = const(node, 1) if node.op == "Reshape" and len(node.inputs) > 1 else None
        shape_out = shape_of(node.outputs[0])
        if target is None or shape_out is None:
            continue
        entries = [int(t) for t in target.reshape(-1)]
        if -1 not in entries or isinstance(shape_out[entries.index(-1)], int):
            continue
        size = inferred_size(node)
        if size is not None:
            entries[entries.index(-1)] = size
            node.inputs[1] = gs.Constant(f"{node.name}.sizes", np.array(entries, target.dtype))


def _add_constants_first(graph: gs.Graph) -> None:
    """Write x + (c + y), c a constant wider than y (`_widens`) and c + y read by the outer Add
    alone, as (x + c) + y: the same sum up to float rounding. HF models add a relative position
    bias to the attention mask and the sum to the scores (BEiT through the dynamo exporter,
    Swin's shifted windows), and the heads' rule slices a constant added to the scores, not one
    added to a mask first."""
    outputs = {t.name for t in graph.outputs}
    for outer in [n for n in graph.nodes if n.op == "Add" and len(n.inputs) == 2]:
        for x, inner_out in (outer.inputs, outer.inputs[::-1]):
            inner = inner_out.inputs[0] if len(inner_out.inputs) == 1 else None
            if (
                inner is None
                or inner.op != "Add"
                or isinstance(x, gs.Constant)
                or len(inner_out.outputs) != 1
                or inner_out.name in outputs
            ):
                continue
            constants = [t for t in inner.inputs if isinstance(t, gs.Constant)]
            if len(constants) != 1:
                continue
            y = next(t for t in inner.inputs if t is not constants[0])
            if not _widens(constants[0], y):  # a bias after its MatMul stays where it is
                continue
            outer.inputs.clear()
            inner.inputs.clear()
            inner.inputs.extend([x, constants[0]])
            inner_out.shape = None  # now x's shape broadcast with c's; inference sets it
            outer.inputs.extend([inner_out, y])
            break


def _widens(c: gs.Constant, y: gs.Tensor) -> bool:
    """True when constant c is wider than y on some axis that y broadcasts (size 1 there):
    a per-head bias beside a mask shared by the heads."""
    shape = shape_of(y)
    if shape is None:
        return False
    pairs = zip(reversed(c.values.shape), reversed(shape), strict=False)
    return any(size > 1 and own == 1 for size, own in pairs)


def _own_targets(graph: gs.Graph) -> None:
    """Give every Reshape its own target Concat: the dynamo exporter shares one computed target
    between Reshapes of equal shapes (GPT-2's two MLPs reshape their rows back to tokens with
    one Concat), and each must shrink with its own group."""
    for concat in [n for n in graph.nodes if n.op == "Concat"]:
        target = concat.outputs[0]
        readers = [u for u in target.outputs if u.op == "Reshape" and u.inputs[1] is target]
        for k, reshape in enumerate(readers[1:], start=1):
            copy = gs.Variable(f"{target.name}.{k}", dtype=target.dtype, shape=target.shape)
            graph.nodes.append(
                gs.Node("Concat", f"{concat.name}.{k}", dict(concat.attrs), list(concat.inputs),
                        [copy])
            )  # fmt: skip
            reshape.inputs[1] = copy


_OWN_TABLE_BYTES = 1 << 20  # a copy per reader costs little only for a small table


def _own_tables(graph: gs.Graph) -> None:
    """Give every Add or Sub its own copy of a small constant table Gathered by computed indices
    and moved (Transposes, Unsqueezes, Squeezes) into a tensor that several of them read: T5
    computes one relative position bias in its first layer and adds it to every layer's scores,
    and each layer's heads must slice its own copy of the table's columns
    (ops/elementwise.py, `table_edit`)."""
    for gather in [n for n in graph.nodes if n.op == "Gather"]:
        table = gather.inputs[0]
        if not isinstance(table, gs.Constant) or table.values.nbytes > _OWN_TABLE_BYTES:
            continue
        chain, tensor = [gather], gather.outputs[0]
        while len(tensor.outputs) == 1 and tensor.outputs[0].op in AXIS_MOVES:
            chain.append(tensor.outputs[0])
            tensor = chain[-1].outputs[0]
        readers = [u for u in tensor.outputs if u.op in ("Add", "Sub")]
        if len(table.outputs) != 1 or len(readers) < 2 or tensor in graph.outputs:
            continue
        for k, reader in enumerate(readers[1:], start=1):
            source = gs.Constant(f"{table.name}.{k}", table.values)
            for node in chain:
                out = node.outputs[0]
                copy = gs.Variable(f"{out.name}.{k}", dtype=out.dtype, shape=out.shape)
                inputs = [source, *node.inputs[1:]]
                graph.nodes.append(gs.Node(node.op, f"{node.name}.{k}", dict(node.attrs), inputs,
                                           [copy]))  # fmt: skip
                source = copy
            reader.inputs[reader.inputs.index(tensor)] = source


def _copy_inferred_dim(node: gs.Node) -> None:
    """Replace the -1 of Reshape `node`'s constant target by 0 where it can only be the input's
    own symbolic dim at that position: every other input dim static, their product equal to
    that of the other target entries (0 read as the input's dim)."""
    dims, target = shape_of(node.inputs[0]), np.asarray(node.inputs[1].values).reshape(-1)
    if dims is None or list(target).count(-1) != 1:
        return
    p = int(np.flatnonzero(target == -1)[0])
    others = [d for i, d in enumerate(dims) if i != p]
    zeros = np.flatnonzero(target == 0)
    if p >= len(dims) or isinstance(dims[p], int) or (zeros.size and zeros[-1] >= len(dims)):
        return
    if not all(isinstance(d, int) for d in others):
        return
    stated = [dims[i] if t == 0 else int(t) for i, t in enumerate(target) if i != p]
    if math.prod(stated) == math.prod(others):
        copied = np.where(target == -1, 0, target).astype(target.dtype)
        node.inputs[1] = gs.Constant(f"{node.name}.copy{p}", copied)


def _gather_from_concat_part(graph: gs.Graph) -> None:
    """Let a Gather of a Concat, on the Concat's axis, whose constant indices all fall in one of
    the Concat's inputs read that input (indices shifted): the same values. torch exports a
    stacked LSTM's `h_n[-1]` so (every layer's Y_h joined on axis 0), and the analyzer follows
    the last layer's hidden units through the Gather but not through the Concat."""
    for gather in graph.nodes:
        concat = _producer(gather.inputs[0], "Concat") if gather.op == "Gather" else None
        indices = _const_values(gather, 1) if concat else None
        shape = None if indices is None else gather.inputs[0].shape
        if shape is None or indices.size == 0:
            continue
        axis = gather.attrs.get("axis", 0) % len(shape)
        sizes = [None if t.shape is None else t.shape[axis] for t in concat.inputs]
        if concat.attrs.get("axis", 0) % len(shape) != axis or not all(
            isinstance(size, int) for size in sizes
        ):
            continue
        bounds = np.cumsum([0, *sizes])
        flat = np.where(indices < 0, indices + bounds[-1], indices)
        for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            if np.all((lo <= flat) & (flat < hi)):
                part = np.asarray(flat - lo, dtype=indices.dtype)
                gather.inputs[1] = gs.Constant(f"{gather.name}.part", part)
                gather.inputs[0] = concat.inputs[k]
                break


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The node of type `op` that computes `tensor`, if that is what computes it."""
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _const_values(node: gs.Node, index: int) -> np.ndarray | None:
    return node.inputs[index].values if _const(node, index) else None


def _name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique, stable name: groups and reports refer to nodes by name."""
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)


def _state_softmax_axes(graph: gs.Graph, opset: int) -> None:
    """Write the axis of every Softmax/LogSoftmax/Hardmax that leaves it to the default (tf2onnx
    does): -1 from opset 13, 1 before, so that the analysis reads it like any stated axis."""
    for node in graph.nodes:
        if node.op in ("Softmax", "LogSoftmax", "Hardmax") and "axis" not in node.attrs:
            node.attrs["axis"] = -1 if opset >= 13 else 1


def _remove_noops(graph: gs.Graph) -> None:
    """Bypass Identity, inference-mode Dropout and Casts to the type their input already has
    (HF LLaMA's RMSNorm casts its float32 input to float32), keeping graph output names."""
    outputs = {t.name for t in graph.outputs}
    for node in list(graph.nodes):
        if not (node.op in ("Identity", "Dropout") or _same_type_cast(node)) or not node.inputs:
            continue
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            continue  # the mask is used: not a no-op
        src, dst = node.inputs[0], node.outputs[0]
        if dst.name in outputs:
            if src.name in outputs or any(t is src for t in graph.inputs) or not src.inputs:
                continue
            src.inputs[0].outputs[src.inputs[0].outputs.index(src)] = dst
        else:
            for consumer in list(dst.outputs):
                consumer.inputs[consumer.inputs.index(dst)] = src
        node.outputs.clear()
        node.inputs.clear()


def _same_type_cast(node: gs.Node) -> bool:
    if node.op != "Cast" or not node.inputs or node.inputs[0].dtype is None:
        return False
    return np.dtype(node.inputs[0].dtype) == onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])


_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div"})


def _bypass_broadcast_expands(graph: gs.Graph) -> None:
    """Bypass `Expand(a, Shape(t))` where every reader is an Add, Sub, Mul or Div that also
    reads t: broadcasting a against t there gives the same shape and values. torch exports
    `F.normalize(x)` as `x / clamp(norm(x)).expand_as(x)` so (Swin V2's cosine attention), and
    the Expand's target would read the channel count of x."""
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        shape = _producer(node.inputs[1], "Shape") if node.op == "Expand" else None
        if shape is None or shape.attrs.get("start", 0) or shape.attrs.get("end") is not None:
            continue
        source, expanded = shape.inputs[0], node.outputs[0]
        readers = list(expanded.outputs)
        if expanded.name in outputs or not readers:
            continue
        if all(r.op in _BROADCASTING and any(t is source for t in r.inputs) for r in readers):
            for reader in readers:
                reader.inputs[reader.inputs.index(expanded)] = node.inputs[0]


def _fold_batchnorm(graph: gs.Graph) -> dict[str, FoldedBatchNorm]:
    """Fold BatchNormalization into a preceding Conv/Gemm that feeds only it (exact); return
    what each fold removed, by producer name."""
    folds = {}
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        x = bn.inputs[0]
        if len(bn.outputs) != 1 or len(x.outputs) != 1 or not x.inputs:
            continue
        prev = x.inputs[0]
        if x in graph.outputs or not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
            continue
        if prev.op == "Conv" and _const(prev, 1):
            folds[prev.name] = _fold_into(prev, bn, out_axis=0)
        elif prev.op == "Gemm" and _const(prev, 1) and _gemm_bias_foldable(prev):
            out_axis = 0 if prev.attrs.get("transB", 0) else 1
            folds[prev.name] = _fold_into(prev, bn, out_axis=out_axis)
        else:
            continue
        prev.outputs[0] = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
    return folds


def _const(node: gs.Node, index: int) -> bool:
    return len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant)


def _gemm_bias_foldable(node: gs.Node) -> bool:
    """Gemm folds BN when A is not transposed and C is absent or a per-feature vector."""
    if node.attrs.get("transA", 0):
        return False
    if len(node.inputs) < 3 or node.inputs[2].name == "":
        return True
    bias = node.inputs[2]
    return isinstance(bias, gs.Constant) and (bias.values.ndim <= 1 or bias.values.shape[0] == 1)


def _fold_into(node: gs.Node, bn: gs.Node, *, out_axis: int) -> FoldedBatchNorm:
    """W ← W·s along the output axis, b ← (b − μ)·s + β with s = γ/√(σ² + ε)."""
    gamma, beta, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
    sigma = np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    scale = gamma / sigma
    weight = node.inputs[1].values
    rows = np.moveaxis(weight.astype(np.float64), out_axis, 0).reshape(len(scale), -1)
    record = FoldedBatchNorm(gamma, sigma, np.abs(rows).sum(1), np.sqrt((rows**2).sum(1)))
    shape = [1] * weight.ndim
    shape[out_axis] = -1
    new_w = (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)
    bias = _effective_bias(node, len(scale))
    new_b = ((bias - mean) * scale + beta).astype(weight.dtype)
    node.inputs[1] = gs.Constant(f"{node.name}.weight_bnfold", new_w)
    set_bias_input(node, gs.Constant(f"{node.name}.bias_bnfold", new_b))
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    return record


def set_bias_input(node: gs.Node, bias: gs.Constant) -> None:
    """Make `bias` input 2 of a Conv, ConvTranspose or Gemm: in place of the one it has (an
    empty optional input included), else appended."""
    if len(node.inputs) > 2:
        node.inputs[2] = bias
    else:
        node.inputs.append(bias)


def _effective_bias(node: gs.Node, channels: int) -> np.ndarray:
    """The per-output bias a Conv/Gemm adds (Gemm's beta applied), as float64 of length C."""
    if len(node.inputs) < 3 or node.inputs[2].name == "":
        return np.zeros(channels)
    values = node.inputs[2].values.astype(np.float64)
    if node.op == "Gemm":
        values = values * node.attrs.get("beta", 1.0)
    return np.broadcast_to(
        values.reshape(-1)[-channels:] if values.size > 1 else values, (channels,)
    ).copy()
