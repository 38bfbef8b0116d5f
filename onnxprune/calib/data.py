"""Calibration and evaluation data: load it from a file, folder or dict; check it fits the model.

Every source (``.npz``, ``.npy``, an image folder, ``"random"``, a dict of arrays) ends up as a
`Dataset` of arrays keyed by model input name, with samples along axis 0. Validation runs for every
source, so a mismatch is caught here with a one-line `DataError` naming the input and both shapes,
instead of deep inside ONNX Runtime.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import DataError, UsageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Batch",
    "Dataset",
    "InputSpec",
    "batch_first",
    "batch_for",
    "count_shapes",
    "in_batches",
    "in_parts",
    "input_specs",
    "load_data",
    "run_samples",
    "with_input_shapes",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
LABELS_KEY = "labels"
LAYOUTS = ("NCHW", "NHWC")
NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class InputSpec:
    """One graph input the user must feed: its name, declared shape and numpy dtype.

    Shape entries are ints for static dims, strings for symbolic dims (``"batch"``) and None for
    dims the model leaves unnamed. Axis 0 is the sample (batch) axis.
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype


@dataclass(frozen=True, eq=False)
class Batch:
    """One slice of a dataset: the feeds for an ONNX Runtime run and the matching labels."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None


@dataclass(frozen=True, eq=False)
class Dataset:
    """Validated model inputs keyed by input name, all with the same number of samples on axis 0.

    ``labels`` (int64, one per sample) are only present for evaluation-style data; ``synthetic``
    marks random data so reports can warn that scores from it mean little; ``source`` is a short
    description for the report.
    """

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    synthetic: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        counts = {name: (a.shape[0] if a.ndim else 0) for name, a in self.arrays.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"dataset inputs have different sample counts ({_fmt_counts(counts)})")
        if self.labels is not None and self.arrays and len(self.labels) != len(self):
            raise DataError(f"dataset has {len(self.labels)} labels but {len(self)} samples")

    def __len__(self) -> int:
        for array in self.arrays.values():
            return int(array.shape[0]) if array.ndim else 0
        return 0

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Consecutive batches covering every sample exactly once; the last one may be short."""
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            feeds = {name: a[start:stop] for name, a in self.arrays.items()}
            labels = None if self.labels is None else self.labels[start:stop]
            yield Batch(feeds, labels)

    def subset(self, n: int, seed: int = 0) -> Dataset:
        """A deterministic random sample of n distinct samples (original order kept).

        Returns self when n covers the whole dataset.
        """
        if n < 1:
            raise UsageError(f"number of samples must be at least 1, got {n}")
        total = len(self)
        if n >= total:
            return self
        return self._take(_choose(total, n, seed), f"{self.source}, {n} sampled (seed {seed})")

    def head(self, n: int) -> Dataset:
        """The first n samples (all of them if n is larger)."""
        if n < 1:
            raise UsageError(f"number of samples must be at least 1, got {n}")
        if n >= len(self):
            return self
        return self._take(np.arange(n), f"{self.source}, first {n}")

    def fold(self, k: int, folds: int) -> Dataset:
        """The samples i with i mod `folds` = k (the fold statistics' split, calib/stats.py)."""
        return self._take(np.arange(k, len(self), folds), f"{self.source}, fold {k} of {folds}")

    def _take(self, index: np.ndarray, source: str) -> Dataset:
        arrays = {name: np.ascontiguousarray(a[index]) for name, a in self.arrays.items()}
        labels = None if self.labels is None else self.labels[index]
        return Dataset(arrays, labels, self.synthetic, source)


def input_specs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The graph inputs that must be fed (not initializers), with numpy dtypes, in graph order."""
    initializers = {init.name for init in model.graph.initializer}
    initializers.update(init.name for init in model.graph.sparse_initializer)
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise DataError(f"model input '{value.name}' is not a tensor; only tensors can be fed")
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"model input '{value.name}' has element type {tensor_type.elem_type}, "
                "which has no numpy equivalent"
            ) from exc
        if not tensor_type.HasField("shape"):
            raise DataError(
                f"model input '{value.name}' declares no shape; run onnx shape inference or "
                "set the input shape in the model"
            )
        shape = tuple(_dim(d) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, shape, dtype))
    return tuple(specs)


def batch_for(shapes: Iterable[Sequence[int | str | None]], wanted: int) -> int:
    """The batch this model accepts: `wanted` when the sample axis (0) of every input is
    symbolic, else the size the model fixes it to (torch.onnx.export without `dynamic_axes`,
    most YOLO exports: 1). `shapes` are the declared input shapes (`InputSpec.shape`, or ORT's
    `NodeArg.shape`); the one place that decides how many samples a run may take."""
    fixed = [shape[0] for shape in shapes if shape and isinstance(shape[0], int) and shape[0] > 0]
    return min(fixed) if fixed else wanted


def run_samples(
    model: onnx.ModelProto, value_info: Sequence[onnx.ValueInfoProto] | None = None
) -> int | None:
    """The most samples one run of `model` should take: the batch a fixed-batch model takes
    (`batch_for`), else as many as keep the largest tensor whose shape the graph states
    (`value_info`, default the graph's own, and its outputs) under RUN_TENSOR_BYTES (at least
    1); None (any number) where no shape is stated.

    ONNX Runtime's arena grows with a run's largest activations, and big tensors leave the
    caches: on ResNet-50 (3.2 MB per sample for the widest activations) the recalibration's
    runs took half the CPU time at 1 sample per run than at 32 (docs/RESULTS.md)."""
    fixed = batch_for((spec.shape for spec in input_specs(model)), 0)
    if fixed:
        return fixed
    infos = model.graph.value_info if value_info is None else value_info
    sizes = [_sample_bytes(info) for info in (*infos, *model.graph.output)]
    largest = max(sizes, default=0)
    return max(1, RUN_TENSOR_BYTES // largest) if largest else None


RUN_TENSOR_BYTES = 4 << 20


def batch_first(model: onnx.ModelProto) -> bool:
    """Whether every output of `model` declares the samples on axis 0, as its first input does
    (the same symbolic or fixed first dim), so that outputs of runs on parts of the samples join
    along axis 0. Not so for a sequence model's (time, batch, …) outputs, or undeclared dims."""
    first = [first_dim(i) for i in model.graph.input[:1]]
    return (
        bool(first)
        and first[0] not in ("", 0)
        and all(first_dim(o) == first[0] for o in model.graph.output)
    )


def first_dim(info: onnx.ValueInfoProto) -> str | int:
    """The first dim of a declared tensor type: its symbol, its size (0: unknown), or "" when
    the type declares no shape."""
    dims = info.type.tensor_type.shape.dim
    if not dims:
        return ""
    return dims[0].dim_param or dims[0].dim_value


def _sample_bytes(info: onnx.ValueInfoProto) -> int:
    """Bytes per sample of a declared tensor (its dims after the first), 0 when not stated."""
    kind = info.type.tensor_type
    dims = [_dim(d) for d in kind.shape.dim[1:]] if kind.HasField("shape") else None
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims) or not kind.elem_type:
        return 0
    return int(np.prod(dims)) * onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type).itemsize


def in_parts(
    batches: Iterable[Mapping[str, np.ndarray]], samples: int | None
) -> Iterator[dict[str, np.ndarray]]:
    """Every batch of `batches` cut into consecutive runs of at most `samples` samples (views;
    None: the batches as they are)."""
    for feeds in batches:
        total = len(next(iter(feeds.values()))) if feeds else 0
        if samples is None or total <= samples:
            yield dict(feeds)
            continue
        for start in range(0, total, samples):
            yield {name: array[start : start + samples] for name, array in feeds.items()}


def with_input_shapes(
    specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]] | None
) -> tuple[InputSpec, ...]:
    """`specs` with the dims after the batch taken from `shapes` (``--input-shape``), which says
    what a model's symbolic dims are when no data shows them (random data, MAC counts); the
    batch dim stays as declared. Names, ranks and fixed dims must agree with the model."""
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - {spec.name for spec in specs})
    if unknown:
        names = sorted(spec.name for spec in specs)
        raise UsageError(f"--input-shape names {unknown} but the model inputs are {names}")
    return tuple(
        _with_shape(spec, shapes[spec.name]) if spec.name in shapes else spec for spec in specs
    )


def in_batches(feeds: Mapping[str, np.ndarray], batch: int) -> Iterator[dict[str, np.ndarray]]:
    """`feeds` in runs of exactly `batch` samples (axis 0), the last one filled up with copies of
    its last sample: a model with a fixed batch takes no other count. The caller drops the
    outputs of the copies (samples run independently in inference)."""
    samples = len(next(iter(feeds.values()))) if feeds else 0
    for start in range(0, max(samples, 1), batch):
        index = np.minimum(np.arange(start, start + batch), max(samples - 1, 0))
        yield {name: array[index] for name, array in feeds.items()}


def count_shapes(dataset: Dataset, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
    """Per input, the shape of one run the MACs are counted at: the batch the model accepts (1
    where it is free) by the dims of the data, which fix the model's symbolic dims."""
    batch = batch_for((spec.shape for spec in specs), 1)
    return {name: (batch, *array.shape[1:]) for name, array in dataset.arrays.items()}


def load_data(
    source: str | os.PathLike | dict[str, np.ndarray] | None,
    specs: Sequence[InputSpec],
    *,
    labels: str | os.PathLike | np.ndarray | None = None,
    samples: int | None = None,
    image_size: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layout: str = "NCHW",
    random_samples: int = 32,
    seed: int = 0,
    role: str = "calibration",
) -> Dataset:
    """Load data for the model inputs `specs` and validate it; raise DataError on any mismatch.

    `source` is an ``.npz`` (arrays keyed by input name, optional ``labels`` key), an ``.npy``
    (single-input models), a folder of images, ``"random"``/None (seeded synthetic data) or a dict
    of arrays. `labels` (a ``.npy``/``.npz``/``.txt``/``.csv`` path or an array) overrides labels
    found in the source. `samples` keeps a deterministic random subset (by `seed`) when smaller
    than the data. `image_size` is (height, width); `mean`/`std` apply per channel after scaling
    pixels to [0, 1]. `role` ("calibration"/"evaluation") prefixes error messages.
    """
    specs = tuple(specs)
    if samples is not None and samples < 1:
        raise UsageError(f"number of {role} samples must be at least 1, got {samples}")
    if not specs:
        raise DataError(f"{role} data: the model has no inputs to feed")
    for spec in specs:
        if not spec.shape:
            raise DataError(
                f"{role} data: model input '{spec.name}' is a scalar; samples are fed along "
                "axis 0, so scalar inputs are not supported"
            )

    if source is None or (isinstance(source, str) and source == "random"):
        if labels is not None:
            raise UsageError(f"{role} labels were given without {role} data (random data)")
        arrays = _random_arrays(specs, random_samples, seed, role)
        return _finish(
            arrays,
            None,
            specs,
            role=role,
            samples=samples,
            seed=seed,
            origin=f"random (seed {seed}, ",
            unit="samples",
            extra=", synthetic)",
            synthetic=True,
        )

    if isinstance(source, Mapping):
        arrays, found_labels = _split_keys(dict(source), specs, "the input dict", role)
        origin = "arrays ("
    else:
        path, shown = Path(os.fspath(source)).expanduser(), os.fspath(source)
        if path.is_dir():
            return _load_image_dir(
                path,
                shown,
                specs,
                labels=labels,
                samples=samples,
                image_size=image_size,
                mean=mean,
                std=std,
                layout=layout,
                seed=seed,
                role=role,
            )
        arrays, found_labels = _read_arrays(path, shown, specs, role)
        origin = f"{shown} ("
    return _finish(
        arrays,
        _resolve_labels(labels, found_labels, role),
        specs,
        role=role,
        samples=samples,
        seed=seed,
        origin=origin,
        unit="samples",
    )


def unbatched_inputs(
    specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]]
) -> tuple[str, ...]:
    """The inputs declared without a sample axis (graph/unbatched.py): a fully static shape that
    the data's arrays (`shapes`, by input name: `data_shapes`) have after one more axis."""
    return tuple(
        s.name
        for s in specs
        if s.shape
        and all(isinstance(d, int) and d > 0 for d in s.shape)
        and len(shapes.get(s.name, ())) == len(s.shape) + 1
        and tuple(shapes[s.name][1:]) == s.shape
    )


def inputs_without_sample_axis(
    model: onnx.ModelProto, source: str | os.PathLike | Mapping[str, np.ndarray] | Dataset | None
) -> tuple[str, ...]:
    """`unbatched_inputs` of `model` for the data `source` holds (`data_shapes`)."""
    specs = input_specs(model)
    return unbatched_inputs(specs, data_shapes(source, specs))


def fed_specs(
    model: onnx.ModelProto, source: str | os.PathLike | Mapping[str, np.ndarray] | None
) -> tuple[InputSpec, ...]:
    """`input_specs(model)` as `source`'s samples are fed: an input without a sample axis
    (`unbatched_inputs`) runs one sample at a time, as if it had one of 1."""
    specs = input_specs(model)
    unbatched = inputs_without_sample_axis(model, source)
    return tuple(
        InputSpec(s.name, (1, *s.shape), s.dtype) if s.name in unbatched else s for s in specs
    )


def data_shapes(
    source: str | os.PathLike | Mapping[str, np.ndarray] | Dataset | None,
    specs: Sequence[InputSpec],
) -> dict[str, tuple[int, ...]]:
    """The shapes of the arrays `source` gives each input, read without loading them (an .npz's
    headers, an .npy memory-mapped); {} for image folders, random data and what cannot be read
    (`load_data` reports those). Keys map to inputs as `load_data` maps them."""
    if isinstance(source, Dataset):
        return {name: a.shape for name, a in source.arrays.items()}
    if isinstance(source, Mapping):
        shapes = {k: np.shape(v) for k, v in source.items()}
    elif source is None or (isinstance(source, str) and source == "random"):
        return {}
    else:
        shapes = _file_shapes(Path(os.fspath(source)).expanduser())
    names = [s.name for s in specs]
    keys = [k for k in shapes if k != LABELS_KEY or k in names]
    if len(names) == 1 and len(keys) == 1:
        return {names[0]: tuple(shapes[keys[0]])}
    return {k: tuple(shapes[k]) for k in keys if k in names}


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes of an .npz (by key) or an .npy (key "") from their headers."""
    try:
        if path.suffix.lower() == ".npy" and path.is_file():
            return {"": np.load(path, mmap_mode="r", allow_pickle=False).shape}
        if path.suffix.lower() != ".npz" or not zipfile.is_zipfile(path):
            return {}
        shapes = {}
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if major == 1
                            else np.lib.format.read_array_header_2_0)  # fmt: skip
                    shapes[member.removesuffix(".npy")] = read(f)[0]
        return shapes
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}


# --- sources -------------------------------------------------------------------------------------


def _read_arrays(
    path: Path, shown: str, specs: tuple[InputSpec, ...], role: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The input arrays and any labels of an .npz (keyed by input name) or an .npy (the one
    input's array) at `path`, named `shown` in errors."""
    if not path.exists():
        raise DataError(f"{role} data: file not found: {shown}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _split_keys(_read_npz(path, shown, role), specs, shown, role)
    if suffix != ".npy":
        raise DataError(f"{role} data: {shown} is not an .npz, .npy or a folder of images")
    spec = _single_input(specs, f"{shown} holds one array", role)
    return {spec.name: _read_npy(path, shown, role)}, None


def _single_input(specs: tuple[InputSpec, ...], source: str, role: str) -> InputSpec:
    """The model's one input, for a source that feeds one (`source` says why it does); a
    DataError that names the inputs and the way to feed several otherwise."""
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise DataError(
            f"{role} data: {source}, but the model has {len(specs)} inputs ({names}); use an "
            ".npz keyed by input name"
        )
    return specs[0]


def _random_arrays(
    specs: tuple[InputSpec, ...], n: int, seed: int, role: str
) -> dict[str, np.ndarray]:
    """Standard-normal floats (zeros for integer/bool inputs) with `n` samples on axis 0."""
    if n < 1:
        raise UsageError(f"number of random {role} samples must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        dynamic = [d for d in spec.shape[1:] if not isinstance(d, int)]
        if dynamic:
            raise DataError(
                f"{role} data: input '{spec.name}' has shape {_fmt_shape(spec.shape)} with "
                f"dynamic dims other than the batch ({', '.join(_fmt_dim(d) for d in dynamic)}); "
                "random data needs static shapes: give explicit data or --input-shape"
            )
        shape = (n, *(int(d) for d in spec.shape[1:]))  # type: ignore[arg-type]
        if spec.dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
        else:
            arrays[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return arrays


def _read_npz(path: Path, shown: str, role: str) -> dict[str, np.ndarray]:
    try:
        if not zipfile.is_zipfile(path):
            if _magic(path) == NPY_MAGIC:
                raise DataError(f"{role} data: {shown} is a single .npy array; rename it to .npy")
            raise DataError(f"{role} data: cannot read {shown}: not an .npz (zip) archive")
        loaded = np.load(path, allow_pickle=False)
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{role} data: cannot read {shown}: {_one_line(exc)}") from exc


def _read_npy(path: Path, shown: str, role: str) -> np.ndarray:
    try:
        if _magic(path) != NPY_MAGIC:
            if zipfile.is_zipfile(path):
                raise DataError(f"{role} data: {shown} is an .npz archive; rename it to .npz")
            raise DataError(f"{role} data: cannot read {shown}: not an .npy file")
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{role} data: cannot read {shown}: {_one_line(exc)}") from exc


def _split_keys(
    mapping: dict[str, Any], specs: tuple[InputSpec, ...], origin: str, role: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Map keys to model inputs; a ``labels`` key (unless it is an input) becomes the labels."""
    names = [s.name for s in specs]
    keys = list(mapping)
    found_labels = None
    if LABELS_KEY in mapping and LABELS_KEY not in names:
        found_labels = _as_array(LABELS_KEY, mapping[LABELS_KEY], role)
        keys.remove(LABELS_KEY)
    if len(names) == 1 and len(keys) == 1:
        return {names[0]: _as_array(keys[0], mapping[keys[0]], role)}, found_labels
    missing = [n for n in names if n not in keys]
    extra = [k for k in keys if k not in names]
    problems = []
    if missing:
        problems.append(f"has no array for model input(s) {_quoted(missing)}")
    if extra:
        problems.append(f"has unexpected key(s) {_quoted(extra)}")
    if problems:
        raise DataError(
            f"{role} data: {origin} {' and '.join(problems)} (model inputs: {', '.join(names)})"
        )
    return {n: _as_array(n, mapping[n], role) for n in names}, found_labels


def _as_array(key: str, value: Any, role: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{role} data: '{key}' is not an array: {_one_line(exc)}") from exc
    if array.dtype == object:
        raise DataError(f"{role} data: '{key}' is an object array; give numeric arrays")
    return array


def _load_image_dir(
    root: Path,
    shown: str,
    specs: tuple[InputSpec, ...],
    *,
    labels: str | os.PathLike | np.ndarray | None,
    samples: int | None,
    image_size: tuple[int, int] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    layout: str,
    seed: int,
    role: str,
) -> Dataset:
    """Decode a folder of images for a single rank-4 image input.

    Images are found recursively (hidden files skipped) and sorted by path. If every image sits in
    a subfolder and there are at least two subfolders, labels are the index of the top-level
    subfolder name in sorted order (ImageFolder style). Images are resized to (H, W) without
    cropping. When `samples` is smaller than the folder, only the chosen images are decoded.
    """
    if layout not in LAYOUTS:
        raise UsageError(f"image layout must be NCHW or NHWC, got {layout!r}")
    spec = _single_input(specs, "an image folder feeds single-input models", role)
    if len(spec.shape) != 4:
        raise DataError(
            f"{role} data: input '{spec.name}' has shape {_fmt_shape(spec.shape)}; an image "
            f"folder needs a rank-4 {layout} input"
        )
    if spec.dtype.kind not in "fiu":
        raise DataError(
            f"{role} data: input '{spec.name}' has dtype {spec.dtype}; images need a float or "
            "integer input"
        )
    channels_dim = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    hw_dims = spec.shape[2:4] if layout == "NCHW" else spec.shape[1:3]
    channels = _image_channels(spec, channels_dim, mean, std, layout, role)
    height, width = _image_hw(spec, hw_dims, image_size, role)
    mean_arr = _per_channel("mean", mean, channels)
    std_arr = _per_channel("std", std, channels)
    if std_arr is not None and np.any(std_arr == 0):
        raise UsageError("std must not contain zeros")
    if spec.dtype.kind != "f" and (mean_arr is not None or std_arr is not None):
        raise UsageError(
            f"mean/std normalisation needs a float input; '{spec.name}' is {spec.dtype}"
        )

    paths = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )
    if not paths:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"{role} data: no images ({exts}) found in {shown}")
    total = len(paths)

    folder_labels = None
    classes: list[str] = []
    rel_parts = [p.relative_to(root).parts for p in paths]
    if all(len(parts) >= 2 for parts in rel_parts):
        classes = sorted({parts[0] for parts in rel_parts})
        if len(classes) >= 2:
            index = {name: i for i, name in enumerate(classes)}
            folder_labels = np.array([index[parts[0]] for parts in rel_parts], dtype=np.int64)
        else:
            classes = []
    label_arr = _resolve_labels(labels, folder_labels, role)
    if label_arr is not None:
        label_arr = _check_labels(label_arr, total, role)

    chosen = np.arange(total)
    if samples is not None and samples < total:
        chosen = _choose(total, samples, seed)
    pixels = _decode_images([paths[i] for i in chosen], height, width, channels, role)
    if spec.dtype.kind == "f":
        pixels /= 255.0
        if mean_arr is not None:
            pixels -= mean_arr
        if std_arr is not None:
            pixels /= std_arr
    if layout == "NCHW":
        pixels = pixels.transpose(0, 3, 1, 2)
    arrays = {spec.name: np.ascontiguousarray(pixels.astype(spec.dtype, copy=False))}
    if label_arr is not None:
        label_arr = label_arr[chosen]

    mode = "L" if channels == 1 else "RGB"
    extra = f", {height}x{width} {mode} {layout}"
    if classes and labels is None:
        extra += f", {len(classes)} class folders"
    origin = f"{shown} ("
    if len(chosen) < total:
        desc = f"{origin}{len(chosen)} of {total} images, seed {seed}{extra})"
    else:
        desc = f"{origin}{total} images{extra})"
    _validate(arrays, specs, role)
    return _whole_batches(Dataset(arrays, label_arr, False, desc), specs, role)


def _image_channels(
    spec: InputSpec,
    dim: int | str | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    layout: str,
    role: str,
) -> int:
    if isinstance(dim, int):
        if dim in (1, 3):
            return dim
        raise DataError(
            f"{role} data: input '{spec.name}' has shape {_fmt_shape(spec.shape)}, i.e. {dim} "
            f"channels in {layout} layout; images give 1 (L) or 3 (RGB) channels "
            "(is the layout right?)"
        )
    for values in (mean, std):
        if values is not None and len(values) == 1:
            return 1
    return 3


def _image_hw(
    spec: InputSpec,
    dims: tuple[int | str | None, ...],
    image_size: tuple[int, int] | None,
    role: str,
) -> tuple[int, int]:
    if image_size is not None:
        if len(image_size) != 2 or any(int(v) < 1 for v in image_size):
            raise UsageError(
                f"image size must be two positive ints (height, width), got {image_size}"
            )
        return int(image_size[0]), int(image_size[1])
    if all(isinstance(d, int) for d in dims):
        return int(dims[0]), int(dims[1])  # type: ignore[arg-type]
    raise DataError(
        f"{role} data: input '{spec.name}' has shape {_fmt_shape(spec.shape)} with no fixed "
        "height and width; give an image size"
    )


def _per_channel(name: str, values: Sequence[float] | None, channels: int) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.size not in (1, channels):
        raise UsageError(f"{name} needs 1 or {channels} values, got {arr.size}")
    return arr


def _decode_images(
    paths: list[Path], height: int, width: int, channels: int, role: str
) -> np.ndarray:
    """Decode to float32 (N, H, W, C) with raw 0..255 values."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError(
            f"{role} data: reading an image folder needs Pillow, which is not installed",
            hint="pip install onnxprune[images]",
        ) from exc
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(paths), height, width, channels), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                out[i] = np.asarray(image, dtype=np.float32).reshape(height, width, channels)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{role} data: cannot decode image {path}: {_one_line(exc)}") from exc
    return out


# --- labels --------------------------------------------------------------------------------------


def _resolve_labels(
    given: str | os.PathLike | np.ndarray | None, found: np.ndarray | None, role: str
) -> np.ndarray | None:
    """Explicit labels win over labels found in the data source."""
    if given is None:
        return found
    if isinstance(given, (str, os.PathLike)):
        return _read_labels(Path(os.fspath(given)).expanduser(), os.fspath(given), role)
    return np.asarray(given)


def _read_labels(path: Path, shown: str, role: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{role} labels: file not found: {shown}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ".csv"):
            return np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=1)
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):
            return loaded
        with loaded:
            if LABELS_KEY in loaded.files:
                return loaded[LABELS_KEY]
            if len(loaded.files) == 1:
                return loaded[loaded.files[0]]
            raise DataError(
                f"{role} labels: {shown} has keys {_quoted(loaded.files)} but no 'labels' key"
            )
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{role} labels: cannot read {shown}: {_one_line(exc)}") from exc


def _check_labels(labels: np.ndarray, n: int, role: str) -> np.ndarray:
    """Class indices as int64 of length n; one-hot or score rows are reduced by argmax."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[:, 0] if labels.shape[1] == 1 else labels.argmax(axis=1)
    if labels.ndim != 1:
        raise DataError(
            f"{role} labels: expected one class index per sample (1-D) or one-hot rows (2-D), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise DataError(f"{role} labels: labels must be integer class indices")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{role} labels: labels have dtype {labels.dtype}; expected integers")
    if len(labels) != n:
        raise DataError(f"{role} labels: {len(labels)} labels but the data has {n} samples")
    return labels.astype(np.int64)


# --- validation ----------------------------------------------------------------------------------


def _finish(
    arrays: dict[str, np.ndarray],
    labels: np.ndarray | None,
    specs: tuple[InputSpec, ...],
    *,
    role: str,
    samples: int | None,
    seed: int,
    origin: str,
    unit: str,
    extra: str = ")",
    synthetic: bool = False,
) -> Dataset:
    """Validate, attach labels, take the `samples` subset and describe the result."""
    arrays = _validate(arrays, specs, role)
    n = len(next(iter(arrays.values())))
    if labels is not None:
        labels = _check_labels(labels, n, role)
    dataset = Dataset(arrays, labels, synthetic, f"{origin}{n} {unit}{extra}")
    if samples is not None and samples < n:
        seed_note = "" if synthetic else f", seed {seed}"  # random data already names its seed
        source = f"{origin}{samples} of {n} {unit}{seed_note}{extra}"
        dataset = dataset._take(_choose(n, samples, seed), source)
    return _whole_batches(dataset, specs, role)


def _with_shape(spec: InputSpec, shape: Sequence[int]) -> InputSpec:
    """`spec` with the given dims after the batch, which must match its rank and fixed dims."""
    if len(shape) != len(spec.shape) or any(
        isinstance(want, int) and want != got
        for want, got in zip(spec.shape[1:], shape[1:], strict=False)
    ):
        raise UsageError(
            f"--input-shape gives {tuple(shape)} for input '{spec.name}', which the model "
            f"declares {_fmt_shape(spec.shape)}"
        )
    return InputSpec(spec.name, (spec.shape[0], *(int(d) for d in shape[1:])), spec.dtype)


def _whole_batches(dataset: Dataset, specs: tuple[InputSpec, ...], role: str) -> Dataset:
    """The first samples that fill whole batches of a model with a fixed batch B > 1 (every run
    must get exactly B samples); the dataset itself for any other model."""
    batch = batch_for((s.shape for s in specs), 1)
    whole = len(dataset) // batch * batch
    if whole == len(dataset):
        return dataset
    if not whole:
        raise DataError(
            f"{role} data: {len(dataset)} samples, but the model's inputs fix the batch to {batch}"
        )
    return dataset._take(np.arange(whole), f"{dataset.source}, first {whole} (fixed batch {batch})")


def _validate(
    arrays: dict[str, np.ndarray], specs: tuple[InputSpec, ...], role: str
) -> dict[str, np.ndarray]:
    """Check dtype, shape, sample counts and finiteness; cast floats to the model's float type
    (float64 data for a float32 input, float32 images for a float16 model; values beyond the
    narrower range become inf and are refused below)."""
    out = {}
    for spec in specs:
        array = np.asarray(arrays[spec.name])
        if array.dtype != spec.dtype:
            if array.dtype.kind == "f" and np.dtype(spec.dtype).kind == "f":
                with np.errstate(over="ignore"):
                    array = array.astype(spec.dtype)
            else:
                raise DataError(
                    f"{role} data: input '{spec.name}' has dtype {array.dtype} but the model "
                    f"expects {spec.dtype}"
                )
        if array.ndim != len(spec.shape) or any(
            isinstance(want, int) and got != want
            for got, want in zip(array.shape[1:], spec.shape[1:], strict=False)
        ):
            raise DataError(
                f"{role} data: input '{spec.name}' has shape {tuple(array.shape)} but the model "
                f"expects {_fmt_shape(spec.shape)}"
            )
        out[spec.name] = np.ascontiguousarray(array)
    counts = {name: int(a.shape[0]) for name, a in out.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{role} data: inputs have different sample counts ({_fmt_counts(counts)})")
    if next(iter(counts.values())) == 0:
        raise DataError(f"{role} data: no samples (axis 0 has length 0)")
    for name, array in out.items():
        if array.dtype.kind in "fc":
            finite = np.isfinite(array)
            if not finite.all():
                nan = int(np.isnan(array).sum())
                inf = int(array.size - finite.sum()) - nan
                raise DataError(
                    f"{role} data: input '{name}' has {nan + inf} non-finite values "
                    f"({nan} NaN, {inf} Inf)"
                )
    return out


# --- small helpers -------------------------------------------------------------------------------


def _choose(total: int, n: int, seed: int) -> np.ndarray:
    """n distinct indices out of total, sorted, reproducible from seed."""
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value") and dim.dim_value >= 0:
        return int(dim.dim_value)
    if dim.HasField("dim_param") and dim.dim_param:
        return dim.dim_param
    return None


def _magic(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(len(NPY_MAGIC))


def _fmt_dim(dim: int | str | None) -> str:
    return "?" if dim is None else str(dim)


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    parts = [_fmt_dim(d) for d in shape]
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"


def _fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name}: {n}" for name, n in counts.items())


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
