"""Restore each affected layer's per-channel output mean and variance after pruning.

What re-estimating BatchNorm statistics does in PyTorch, done on the folded graph: for every
Conv/Gemm/MatMul that lost input channels, in topological order, its outputs are mapped by a
per-channel affine y ← (y − μ')·σ/σ' + μ so that on the calibration data they have the original
model's mean μ and standard deviation σ again; the affine is folded into its weights and bias (a
MatMul's shift into the Add after it). Channels are axis 1 of a Conv/Gemm output and the last
axis of a MatMul's (a transformer's Linear on (batch, sequence, features)). Label-free.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.calib.data import in_parts, run_samples
from onnxprune.calib.stats import ChannelMoments, Moments, channel_moments, tap_session
from onnxprune.errors import VerificationError, first_line
from onnxprune.graph.groups import ChannelGroup, tap_key
from onnxprune.graph.load import export
from onnxprune.graph.rewrite import affine_outputs, shift_node
from onnxprune.graph.segments import Segment, order_together, segment_model, split_at
from onnxprune.plan import Plan

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]
Values = list[dict[str, np.ndarray]]  # per run (a part of a batch): tensor name → value
_AFFINE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def recalibrate(
    original: Callable[[], onnx.ModelProto],
    pruned: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    plans: Mapping[str, Plan],
    batches: Batches,
    *,
    reference: Mapping[str, Moments] | None = None,
) -> tuple[gs.Graph, int]:
    """Recalibrate `pruned` in place against the model `original()`; returns it and the layers
    adjusted.

    The original's moments at the affected layers come from `reference` (`reference_tensors`,
    read in the statistics pass) or, for those it lacks, from one pass over `original()`. The
    pruned model then runs once, cut into segments that end at the affected layers
    (`graph.segments`), in runs of at most `run_samples` samples (a run of 32 images grew a
    segment's arena by hundreds of MB and took twice the CPU time of 32 runs of one): after
    each, the layer's moments are read, its affine is folded into the graph and applied to the
    values the later segments read. A layer's moments depend only on the layers upstream of
    it, all adjusted before it, so this equals adjusting the layers one
    by one with a full pass each. The copies of a weight that several layers share (a joined
    group's readers, graph/shared.py) get one affine, from their moments pooled, so they stay
    equal: the pass runs them all before any layer that reads one (`order_together`).
    """
    targets = {t: (name, axis, keep) for name, t, axis, keep in _targets(pruned, groups, plans)}
    if not targets:
        return pruned, 0
    known = dict(reference or {})
    missing = {t: axis for t, (_, axis, _) in targets.items() if t not in known}
    if missing:
        known.update(channel_moments(original(), missing, batches()))
    model = export(pruned)
    copies = _copies(pruned, groups, targets)
    if not order_together(model, copies):
        copies = []  # one copy is computed from another: each is adjusted on its own
    family = {end: ends for ends in copies for end in ends}
    segments = split_at(model, targets)
    parts = in_parts(batches(), run_samples(model))
    with tempfile.TemporaryDirectory(prefix="onnxprune-recalibrate-") as folder:
        values = Held(_initial_values(segments, parts), Path(folder))
        waiting: set[str] = set()  # copies measured, waiting for the last of theirs
        for index, segment in enumerate(segments):
            run_segment(model, segment, values)
            ends = family.get(segment.end, (segment.end,))
            waiting.add(segment.end)
            if not waiting.issuperset(ends):
                continue  # nothing reads a copy before the last one is adjusted too
            waiting -= set(ends)
            scale, shift = _affine(targets, known, values, ends)
            for end in ends:
                affine_outputs(pruned, targets[end][0], scale, shift)
            later = segments[index + 1 :]
            _forget(values, later, ends, targets[ends[0]][1], scale, shift, hold=waiting)
    pruned.toposort()  # a MatMul's shift is a new Add after it (affine_outputs)
    return pruned, len(targets)


def reference_tensors(
    graph: gs.Graph, groups: tuple[ChannelGroup, ...], names: Iterable[str]
) -> dict[str, int]:
    """The tensors whose original moments `recalibrate` reads when the groups `names` are
    pruned, with their channel axis: the outputs of their Conv/ConvTranspose/Gemm/MatMul
    consumers."""
    names = set(names)
    consumers = {c for g in groups if g.name in names for c in g.consumers}
    return {
        n.outputs[0].name: _channel_axis(n)
        for n in graph.nodes
        if n.name in consumers and _is_affine_layer(n)
    }


class Held:
    """The values later segments read, per run: in memory until they pass `limit` bytes
    (HELD_BYTES), then in .npy files of `folder`, read back one run at a time, so that memory
    stays bounded whatever the number of samples (the values at a segment border are held for
    every sample: 312 MB for 24 ResNet-50 samples)."""

    def __init__(self, runs: Values, folder: Path, limit: int | None = None) -> None:
        self.runs: list[dict[str, np.ndarray | Path]] = list(runs)
        self.folder = folder
        self.limit = HELD_BYTES if limit is None else limit
        self.files = 0
        self.memory_bytes = sum(_nbytes(v) for run in self.runs for v in run.values())

    def __len__(self) -> int:
        return len(self.runs)

    def load(self, index: int, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The values `names` of run `index`."""
        run = self.runs[index]
        return {n: np.load(v) if isinstance(v, Path) else v for n, v in run.items() if n in names}

    def store(self, index: int, values: Mapping[str, np.ndarray]) -> None:
        """Set values of run `index`: to files once the values held in memory pass the limit."""
        run = self.runs[index]
        spill = self.memory_bytes > self.limit
        for name, value in values.items():
            if name in run:
                self._drop(run, name)
            run[name] = self._saved(value) if spill else value
            self.memory_bytes += _nbytes(run[name])

    def keep(self, names: set[str]) -> None:
        """Forget every value not in `names`."""
        for run in self.runs:
            for name in set(run) - names:
                self._drop(run, name)

    def _drop(self, run: dict[str, np.ndarray | Path], name: str) -> None:
        value = run.pop(name)
        if isinstance(value, Path):
            value.unlink()
        self.memory_bytes -= _nbytes(value)

    def _saved(self, value: np.ndarray) -> Path:
        self.files += 1
        path = self.folder / f"{self.files}.npy"
        np.save(path, value)
        return path


def _nbytes(value: np.ndarray | Path) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else 0


HELD_BYTES = 512 << 20


def _initial_values(segments: list[Segment], batches: Iterable[Mapping[str, np.ndarray]]) -> Values:
    """The graph inputs any segment reads, per run."""
    wanted = {name for segment in segments for name in segment.inputs}
    return [{k: v for k, v in feeds.items() if k in wanted} for feeds in batches]


def run_segment(model: onnx.ModelProto, segment: Segment, values: Held) -> None:
    """Run `segment` on every run's values and add its outputs to `values`."""
    if not len(values):
        return
    first = values.load(0, segment.inputs)
    types = {n: onnx.helper.np_dtype_to_tensor_dtype(first[n].dtype) for n in segment.inputs}
    part = segment_model(model, segment, types)
    try:
        session, aliases = tap_session(part, segment.outputs)
        for index in range(len(values)):
            found = session.run(aliases, values.load(index, segment.inputs))
            values.store(index, dict(zip(segment.outputs, found, strict=True)))
    except Exception as exc:  # ORT raises several unrelated exception types
        raise VerificationError(
            f"ONNX Runtime cannot run the pruned model up to '{segment.end}': {first_line(exc)}"
        ) from exc


def _affine(
    targets: Mapping[str, tuple[str, int, np.ndarray]],
    known: Mapping[str, Moments],
    values: Held,
    ends: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scale and shift that give the tensors `ends` (one layer's, or the copies of
    one shared layer's) the original's mean and variance again, over all of their positions;
    channels that are constant now only get the shift."""
    now = ChannelMoments(targets[ends[0]][1])
    rows, total, squares = 0, 0.0, 0.0
    for end in ends:
        before = now.n
        for index in range(len(values)):
            now.add(values.load(index, [end])[end])
        mean, var = (v[targets[end][2]] for v in known[end])
        count = now.n - before
        rows, total, squares = rows + count, total + count * mean, squares + count * (var + mean**2)
    mean = total / rows
    var = np.maximum(squares / rows - mean**2, 0.0)
    now_mean, now_var = now.result()
    scale = np.ones_like(var)
    live = now_var > 1e-12 * max(float(now_var.max()), 1e-30)
    scale[live] = np.sqrt(var[live] / now_var[live])
    return scale, mean - scale * now_mean


def _forget(
    values: Held,
    later: list[Segment],
    ends: Sequence[str],
    axis: int,
    scale: np.ndarray,
    shift: np.ndarray,
    *,
    hold: set[str],
) -> None:
    """Keep in `values` only what the `later` segments read and `hold` names, with `ends`
    mapped by the affine just folded into their layers."""
    needed = {name for segment in later for name in segment.inputs}
    values.keep(needed | hold)
    for end in (e for e in ends if e in needed):
        for index in range(len(values)):
            value = values.load(index, [end])[end]
            values.store(index, {end: _mapped(value, axis, scale, shift)})


def _mapped(value: np.ndarray, axis: int, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """`value` (an array this module owns) mapped in place to value·scale + shift per channel
    (on `axis`), in its own precision."""
    shape = [1] * value.ndim
    shape[axis] = -1
    value *= scale.astype(value.dtype).reshape(shape)
    value += shift.astype(value.dtype).reshape(shape)
    return value


def _targets(
    pruned: gs.Graph, groups: tuple[ChannelGroup, ...], plans: Mapping[str, Plan]
) -> list[tuple[str, str, int, np.ndarray]]:
    """(node, output tensor, its channel axis, original indices of its kept outputs) for every
    affected layer (a MatMul only with a 2-D weight, whose columns are its output channels)."""
    consumers = {c for g in groups if g.name in plans for c in g.consumers}
    found = []
    for node in pruned.nodes:
        if node.name in consumers and _is_affine_layer(node):
            keep = _kept_outputs(node, groups, plans)
            output = (shift_node(pruned, node) or node).outputs[0].name
            found.append((node.name, output, _channel_axis(node), keep))
    return found


def _copies(
    pruned: gs.Graph,
    groups: tuple[ChannelGroup, ...],
    targets: Mapping[str, tuple[str, int, np.ndarray]],
) -> list[tuple[str, ...]]:
    """The outputs of the layers that are copies of one shared layer (they read a joined
    group's pooled taps, graph/shared.py, with equal weights, biases and kept outputs), by copy
    set; layers that are alone are left out."""
    readers = set()
    for group in (g for g in groups if g.pooled):
        pooled = {key for keys in group.pooled for key in keys}
        readers |= {
            e.node
            for e in group.edits
            if e.role == "in" and tap_key(e.tap or "", e.offset) in pooled
        }
    nodes = {node.name: node for node in pruned.nodes}
    alike: dict[tuple, list[str]] = defaultdict(list)
    for end, (name, _, keep) in targets.items():
        node = nodes[name]
        if name in readers:
            weights = [t.values.tobytes() for t in node.inputs[1:] if isinstance(t, gs.Constant)]
            alike[(node.op, *weights, keep.tobytes())].append(end)
    return [tuple(ends) for ends in alike.values() if len(ends) > 1]


def _is_affine_layer(node: gs.Node) -> bool:
    """A Conv/ConvTranspose/Gemm, or a MatMul with a 2-D weight (its columns are its outputs)."""
    if node.op == "MatMul":
        return isinstance(node.inputs[1], gs.Constant) and node.inputs[1].values.ndim == 2
    return node.op in _AFFINE_OPS


def _channel_axis(node: gs.Node) -> int:
    """Axis 1 of a Conv/Gemm output, the last axis of a MatMul's."""
    return -1 if node.op == "MatMul" else 1


def _kept_outputs(
    node: gs.Node, groups: tuple[ChannelGroup, ...], plans: Mapping[str, Plan]
) -> np.ndarray:
    """Original indices of pruned `node`'s outputs, over every group they belong to (several
    where a Split cut them)."""
    owners = [g for g in groups if g.name in plans and node.name in g.producers]
    removed = sum((g.channels - len(plans[g.name].keep)) * g.row_span(node.name)[1] for g in owners)
    kept = np.arange(_out_width(node) + removed)
    for group in sorted(owners, key=lambda g: -g.row_span(node.name)[0]):
        lo, rows = group.row_span(node.name)
        end = lo + group.channels * rows
        segment = kept[lo:end].reshape(group.channels, rows)[np.asarray(plans[group.name].keep)]
        kept = np.concatenate([kept[:lo], segment.reshape(-1), kept[end:]])
    return kept


def _out_width(node: gs.Node) -> int:
    weight = node.inputs[1].values
    if node.op == "ConvTranspose":
        return int(weight.shape[1] * node.attrs.get("group", 1))
    if node.op == "Gemm":
        return int(weight.shape[0] if node.attrs.get("transB", 0) else weight.shape[1])
    if node.op == "MatMul":
        return int(weight.shape[1])
    return int(weight.shape[0])
