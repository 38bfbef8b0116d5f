"""Check a pruned model: ONNX checker, ONNX Runtime, and output deviation against the original."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.calib.data import (
    batch_first,
    batch_for,
    first_dim,
    in_batches,
    in_parts,
    run_samples,
)
from onnxprune.errors import ModelRunError, VerificationError, first_line
from onnxprune.graph.load import model_bytes, too_large_for_protobuf, weightless_copy
from onnxprune.graph.session import Edit, default_threads, inference_session

WARN_AGREEMENT = 0.9  # below this top-1 agreement, or above this rel-L2, the report warns
WARN_REL_L2 = 0.5
# sessions of models with more weights than this skip ORT's pre-packing of Gemm/MatMul weights
PREPACK_BYTES = 256 << 20


@dataclass(frozen=True)
class OutputDeviation:
    """How far one output of the pruned model is from the original's on the validation batch."""

    name: str
    max_abs: float
    rel_l2: float
    top1_agreement: float | None
    # (original, pruned) lengths of an output whose length the data decides (detections after
    # NMS) where they differ: its values are not compared (max_abs and rel_l2 are NaN)
    lengths: tuple[int, int] | None = None


@dataclass(frozen=True)
class Verification:
    """The result of verifying a pruned model on `samples` validation inputs.

    `split` says where those samples come from; `independent` is False when the fit used them
    too (the deviations are then optimistic). `rel_l2` is the largest relative L2 deviation over
    the outputs, `agreement` the smallest top-1 agreement over class-score outputs (None if no
    output is one).
    """

    checker: str
    samples: int
    data: str
    outputs: tuple[OutputDeviation, ...]
    split: str = ""
    independent: bool = True
    rel_l2: float = field(init=False)
    agreement: float | None = field(init=False)

    def __post_init__(self) -> None:
        top1 = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        compared = [o.rel_l2 for o in self.outputs if o.lengths is None]
        object.__setattr__(self, "rel_l2", max(compared, default=0.0))
        object.__setattr__(self, "agreement", min(top1) if top1 else None)

    def to_dict(self) -> dict:
        """A JSON-ready dict: the uncompared outputs' NaN deviations as None (JSON has no NaN)."""
        out = asdict(self)
        for output in out["outputs"]:
            if output["lengths"] is not None:
                output["max_abs"] = output["rel_l2"] = None
        return out


def verify(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    data: str,
    reference: Mapping[str, np.ndarray] | None = None,
) -> Verification:
    """Run the checker on `pruned`, then both models in ORT, and compare every output.

    `reference`: the original's outputs on `feeds` where a caller has them already (the
    statistics pass computes them: `calib.stats.collect_all`); the original then does not run
    again. It must hold every output of `original`, else the original runs."""
    try:
        onnx.checker.check_model(_checkable(pruned), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(f"pruned model fails the ONNX checker: {first_line(exc)}") from exc
    names = [o.name for o in original.graph.output]
    if reference is None or set(reference) != set(names):
        reference = run_original(original, feeds)
    result = run(pruned, feeds)
    variable = data_lengths(original)
    outputs = tuple(
        _deviation(name, reference[name], result[name], name in variable) for name in names
    )
    samples = len(next(iter(feeds.values()))) if feeds else 0
    return Verification("passed (full_check)", samples, data, outputs)


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of `model` on `feeds` in ONNX Runtime (CPU provider), by output name; a model
    with a fixed batch runs the samples in batches of that size, one whose outputs all have
    the samples on axis 0 (`batch_first`) in runs of at most `run_samples(model)` samples (ORT's
    arena grows with a run's activations: 32 samples of 224×224 in one ResNet-50 run took
    185 MB more), outputs joined along axis 0."""
    try:
        part = _run_part(model)
        session = session_for(model)
        names = [o.name for o in session.get_outputs()]
        return run_session(session, names, feeds, part=part)
    except Exception as exc:  # ORT raises several unrelated exception types
        raise VerificationError(f"ONNX Runtime cannot run the model: {first_line(exc)}") from exc


def run_session(
    session: ort.InferenceSession,
    names: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    *,
    part: int | None = None,
) -> dict[str, np.ndarray]:
    """The outputs `names` of `session` on `feeds`, by name; a session with a fixed batch runs
    the samples in batches of that size, any other in runs of at most `part` samples (None:
    all at once), outputs joined along axis 0 (ORT's errors pass)."""
    names = list(names)
    samples = len(next(iter(feeds.values()))) if feeds else 0
    batch = batch_for((i.shape for i in session.get_inputs()), samples)
    if batch == samples and (part is None or samples <= part):
        return dict(zip(names, session.run(names, dict(feeds)), strict=True))
    runs = in_batches(feeds, batch) if batch != samples else in_parts([feeds], part)
    parts = [session.run(names, chunk) for chunk in runs]
    # the copies that fill a fixed batch's last run are dropped; without copies nothing is cut
    # (an output whose axis 0 is not the samples, e.g. detections after NMS, joins whole)
    end = samples if samples % batch else None
    joined = [np.concatenate(outputs)[:end] for outputs in zip(*parts, strict=True)]
    return dict(zip(names, joined, strict=True))


def shortfalls(
    check: Verification, *, min_agreement: float | None, max_rel_l2: float | None
) -> tuple[str, ...]:
    """One phrase per output that misses a bound (None: not checked), e.g. "output 'logits':
    top-1 agreement 7.8 % < 90 %". A bound on agreement needs a class-score output."""
    found = []
    if min_agreement is not None and check.agreement is None:
        found.append("no output is 2-D class scores, so top-1 agreement cannot be checked")
    for o in check.outputs:
        top1 = o.top1_agreement
        if min_agreement is not None and top1 is not None and top1 < min_agreement:
            found.append(
                f"output '{o.name}': top-1 agreement {100 * top1:.1f} % < {100 * min_agreement:g} %"
            )
        if max_rel_l2 is not None and o.rel_l2 > max_rel_l2:
            found.append(f"output '{o.name}': rel-L2 {o.rel_l2:.3g} > {max_rel_l2:g}")
    return tuple(found)


def deviation_warning(check: Verification) -> str | None:
    """One line when an output is far from the original's (agreement < WARN_AGREEMENT or
    rel-L2 > WARN_REL_L2, or a length the data decides halved or doubled: detections lost or
    gained), naming the outputs and numbers; None otherwise."""
    misses = shortfalls(check, min_agreement=None, max_rel_l2=WARN_REL_L2)
    if check.agreement is not None:
        misses = shortfalls(check, min_agreement=WARN_AGREEMENT, max_rel_l2=WARN_REL_L2)
    misses += tuple(
        f"output '{o.name}': {o.lengths[0]} rows -> {o.lengths[1]}"
        for o in check.outputs
        if o.lengths is not None and not 0.5 <= o.lengths[1] / max(o.lengths[0], 1) <= 2.0
    )
    if not misses:
        return None
    seen = "the fit never saw" if check.independent else "the fit also used"
    return f"the pruned model is far from the original on {check.samples} samples {seen}: " + (
        "; ".join(misses)
    )


def run_original(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`run` for the input model: ORT failing on it is the input's problem (ModelRunError,
    exit 1), not a failed verification of the pruning."""
    try:
        return run(model, feeds)
    except VerificationError as exc:
        raise ModelRunError(
            f"ONNX Runtime cannot run the original model on this data: {first_line(exc.__cause__)}",
            hint="the input model or data is at fault: check the data's shapes and values",
        ) from exc


def session_for(
    model: onnx.ModelProto,
    *,
    threads: int = 0,
    edit: Edit | None = None,
    disabled: Sequence[str] = (),
) -> ort.InferenceSession:
    """An ORT CPU session for an in-memory model; `threads` 0: `default_threads()`; `edit` and
    `disabled` as in `inference_session`.

    Its worker threads do not spin-wait between operators: every run here is one of many short
    ones (a sample or a part of a batch) on cores that other work may share, where spinning
    only burns CPU time. ResNet-50, one sample per run on 2 busy cores: 2.24 CPU s per 32
    samples spinning, 1.27 not (and less wall time too); 1.47 and 1.35 at 32 per run.

    Past PREPACK_BYTES of weights it does not pre-pack them: ORT packs every Gemm/MatMul weight
    into a copy while it still holds the original, 2× the weights for the whole session
    creation (a 0.59 GB MLP: peak 1.00 GB packed, 0.61 GB not), for about 14 % more time per
    run on such a Gemm-only model and float32 rounding that differs by ~1e-6."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if model_bytes(model) > PREPACK_BYTES:
        options.add_session_config_entry("session.disable_prepacking", "1")
    threads = threads or default_threads()
    if threads:
        options.intra_op_num_threads = threads
    return inference_session(model, options, edit=edit, disabled=disabled)


def _run_part(model: onnx.ModelProto) -> int | None:
    """The most samples one run of `model` takes in `run` (None: all): `run_samples` on its
    intermediate shapes, inferred on `weightless_copy` where the model states none (the
    pruned and the loaded models usually do not); None where outputs do not join on axis 0
    or ONNX's shape inference fails (a run of all samples is still correct)."""
    if not batch_first(model):
        return None
    if model.graph.value_info:
        return run_samples(model)
    try:
        shapes = onnx.shape_inference.infer_shapes(weightless_copy(model)).graph.value_info
    except (onnx.shape_inference.InferenceError, ValueError):
        return None
    return run_samples(model, shapes)


def _checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself, or past the protobuf limit (the checker serializes it) its weightless
    copy: the graph, types and shapes are checked, the weights' values are not."""
    return weightless_copy(model) if too_large_for_protobuf(model) else model


def is_class_scores(array: np.ndarray) -> bool:
    """A 2-D float output with more than one column is read as class scores."""
    return array.ndim == 2 and array.shape[1] > 1 and np.issubdtype(array.dtype, np.floating)


def data_lengths(model: onnx.ModelProto) -> set[str]:
    """The outputs of `model` whose axis-0 length the data decides: declared with a symbolic or
    unknown size there that is not the first input's sample dim (NonZero, NonMaxSuppression and
    TopK results: a detector's boxes after NMS). Their lengths may differ once pruned."""
    sample = {first_dim(i) for i in model.graph.input[:1]}
    found = set()
    for output in model.graph.output:
        dim = first_dim(output)
        if dim not in sample and (dim == 0 or (isinstance(dim, str) and dim)):
            found.add(output.name)
    return found


def _deviation(name: str, ref: np.ndarray, got: np.ndarray, variable: bool) -> OutputDeviation:
    if ref.shape != got.shape:
        if variable and ref.shape[1:] == got.shape[1:]:
            return OutputDeviation(name, math.nan, math.nan, None, (len(ref), len(got)))
        raise VerificationError(f"output '{name}' changed shape from {ref.shape} to {got.shape}")
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    diff = got64 - ref64
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(ref64), 1e-30))
    top1 = None
    if is_class_scores(ref) and len(ref) and not variable:  # not a detector's (K, 4) boxes
        top1 = float(np.mean(ref.argmax(axis=1) == got.argmax(axis=1)))
    return OutputDeviation(name, float(np.abs(diff).max(initial=0.0)), rel, top1)
