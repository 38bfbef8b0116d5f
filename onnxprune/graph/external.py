"""Weights left in their external data files: mapped, not read.

A model loaded with `map_external` keeps its external tensors external in memory: each one's
`location` becomes the absolute path of its data file, and its values are read through a
read-only memory map (`mapped_array`) where a stage needs them. The input's weights are then in
memory at most once (the map's pages, which the kernel may drop and read again), instead of once
in the proto and again in the graph, plus the largest tensor twice while loading. Such a proto is
for onnxprune's own stages: ONNX's helpers refuse absolute locations, so every file written from
it (`graph.load.write_external`: sessions and saved models) copies the bytes from the map, and
`materialized` reads them in for a consumer that needs a self-contained proto.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import ModelLoadError

# element types whose external bytes are exactly numpy's layout of the same dtype
_MAPPABLE = frozenset(
    getattr(onnx.TensorProto, n)
    for n in ("FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64", "UINT8")
    + ("UINT16", "UINT32", "UINT64", "BOOL")
)
_CHUNK = 64 << 20  # bytes copied at a time from a map to a file


def map_external(model: onnx.ModelProto, folder: Path) -> bool:
    """Point `model`'s external tensors of mappable types at their files in `folder` by absolute
    path (the others are read in, as ONNX would); True if any tensor is mapped. Raises
    ModelLoadError naming a missing file or a tensor past its file's end."""
    mapped = False
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        path = (folder / entries.get("location", "")).resolve()
        if not path.is_file():
            raise ModelLoadError(
                f"external data file '{entries.get('location', '')}' for tensor "
                f"'{tensor.name}' is missing (looked in '{folder}')"
            )
        mappable = tensor.data_type in _MAPPABLE
        offset, length = int(entries.get("offset", 0)), int(entries.get("length", -1))
        length = _size(tensor) if length < 0 and mappable else length
        if offset + length > path.stat().st_size or (mappable and length != _size(tensor)):
            raise ModelLoadError(
                f"external data of tensor '{tensor.name}' does not fit '{path.name}' "
                f"(offset {offset}, length {length}, file {path.stat().st_size} bytes)"
            )
        _set_entry(tensor, "location", str(path))
        if mappable:
            mapped = True
        else:
            _read_in(tensor)
    return mapped


def is_mapped(tensor: onnx.TensorProto) -> bool:
    """True for a tensor `map_external` left in its file."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    return any(e.key == "location" and os.path.isabs(e.value) for e in tensor.external_data)


def has_mapped(model: onnx.ModelProto) -> bool:
    """True if any of `model`'s initializers is a tensor `map_external` left in its file."""
    return any(is_mapped(t) for t in model.graph.initializer)


def mapped_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of a mapped tensor as a read-only memory map of its file (no copy); the map
    itself (not a view of it) names its tensor: `mapped_source`."""
    entries = {e.key: e.value for e in tensor.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    offset = int(entries.get("offset", 0))
    array = np.memmap(entries["location"], dtype=dtype, mode="r", offset=offset, shape=shape)
    array.mapped_tensor = tensor  # an attribute of this object only: views do not carry it
    return array


def mapped_source(values: object) -> onnx.TensorProto | None:
    """The mapped tensor whose whole, unchanged values `values` are (`mapped_array`'s result:
    read-only, so unchanged), else None."""
    return getattr(values, "mapped_tensor", None)


def mapped_length(tensor: onnx.TensorProto) -> int:
    """Bytes of a mapped tensor's data."""
    return _size(tensor)


def tensor_values(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values: its map if it is mapped, else `numpy_helper.to_array`."""
    return mapped_array(tensor) if is_mapped(tensor) else onnx.numpy_helper.to_array(tensor)


def copy_mapped(tensor: onnx.TensorProto, out) -> None:
    """Append a mapped tensor's bytes to the open binary file `out`, a chunk at a time, read
    from its file (not through a map, whose pages would stay in this process's RSS)."""
    entries = {e.key: e.value for e in tensor.external_data}
    offset, left = int(entries.get("offset", 0)), _size(tensor)
    with open(entries["location"], "rb", buffering=0) as source:
        while left:
            chunk = os.pread(source.fileno(), min(_CHUNK, left), offset)
            if not chunk:
                raise ModelLoadError(f"external data of tensor '{tensor.name}' ends early")
            out.write(chunk)
            offset, left = offset + len(chunk), left - len(chunk)


def drop_pages(values: np.ndarray) -> None:
    """Let the kernel drop the resident pages of the part of a memory map that `values` (a
    contiguous view of a `mapped_array`) covers; no-op for any other array. A map's pages count
    in this process's RSS as long as the map lives, though the kernel holds them in its page
    cache anyway; read again, they come back from there (or the file)."""
    source = getattr(values, "_mmap", None)
    if source is None or not values.flags.c_contiguous or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = values.ctypes.data - np.frombuffer(source, np.uint8).ctypes.data
    first = start - start % mmap.PAGESIZE
    source.madvise(mmap.MADV_DONTNEED, first, start + values.nbytes - first)


def materialized_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of a mapped tensor with its bytes read in."""
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    _read_in(copy)
    return copy


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself if no tensor is mapped, else a copy with the mapped tensors read in."""
    if not has_mapped(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if is_mapped(tensor):
            _read_in(tensor)
    return copy


def _read_in(tensor: onnx.TensorProto) -> None:
    """Replace an external reference by absolute path with the bytes it names."""
    entries = {e.key: e.value for e in tensor.external_data}
    with open(entries["location"], "rb") as source:
        source.seek(int(entries.get("offset", 0)))
        data = source.read(int(entries.get("length", -1)))
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = data


def _size(tensor: onnx.TensorProto) -> int:
    """Bytes of a mappable tensor's raw data."""
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return math.prod(tensor.dims) * itemsize


def _set_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)
