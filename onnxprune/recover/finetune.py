"""Fine-tune a pruned ONNX model by distillation from the original (the teacher), in torch.

The student runs in the ONNX→torch interpreter (`calib.torch_exec.TorchGraph`), whose float
initializers are leaf tensors an optimizer can update; the teacher's outputs come from ONNX
Runtime on the same inputs. The loss per graph output is KL(softmax(t/T) ‖ softmax(s/T))·T² on
2-D class scores and the relative squared error ‖s−t‖²/‖t‖² on anything else, plus the
cross-entropy on the first class-score output when labels are given. Adam with a cosine
schedule, a seeded batch order, early stopping after a warm-up on a held-out share of the inputs
(the best weights by held-out distillation loss are kept). With `augment`, every training batch's
image inputs are shifted by a few random whole pixels and the teacher is run on the shifted
batch. With `hints` (`recover.hints`: inner tensors whose channels are known channels of the
teacher's) the loss adds, weighted by `hint_weight`, the mean over those tensors of
‖s − t[index]‖² / ‖t[index]‖² (intermediate-feature distillation); the teacher then runs on
every batch. With `row_mask` (a 2-D input, e.g. a transformer's attention mask) the relative
squared errors of tensors whose first two axes are the mask's count only the rows it marks:
padding tokens' states, which the model's users never read, are not trained toward. With `ema`,
the held-out loss is measured on, and the written weights are, an exponential moving average of
the weights over the steps. The written model is the student's graph with new initializer
values only: same nodes, names, dtypes and shapes.

Importing this module is cheap; torch is imported when `finetune` runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.calib.data import Dataset, batch_for, input_specs
from onnxprune.calib.row_mask import row_mask_input
from onnxprune.calib.split import split_for_verification
from onnxprune.calib.stats import tapped_session
from onnxprune.errors import DataError, UsageError
from onnxprune.measure.verify import is_class_scores, run_original
from onnxprune.progress import Bar
from onnxprune.recover.hints import Hint

if TYPE_CHECKING:
    import torch

    from onnxprune.calib.torch_exec import TorchGraph

EVALS = 20  # held-out evaluations over a run (every steps/EVALS steps)
PATIENCE = 5  # evaluations without improvement before stopping early
WARMUP = 0.5  # share of the steps run before early stopping may end a run
LR = 1e-3  # Adam's learning rate, chosen on the digits CNNs
# weight of the hint (inner-tensor) loss: held-out selection on four digits CNNs preferred 1 to
# 0.1 at every learning rate (docs/RESULTS.md, "The fine-tuning defaults chosen on held-out…")
HINT_WEIGHT = 1.0


@dataclass(frozen=True)
class FinetuneResult:
    """A fine-tuned model and how it got there.

    `history` has one entry per held-out evaluation: step, mean training loss since the last
    one (None at step 0: the student as given), held-out distillation loss, learning rate.
    `best_step` is the step whose weights `model` holds (0: fine-tuning never beat the input).
    `stopped` says why training ended ("steps", "early stop", "time"). `holdout` is the data
    early stopping used; `independent` is False when it is the training data itself (too few or
    synthetic samples to hold any out). `trained` names the initializers that received gradients;
    `frozen` the nodes the interpreter lacks, run by ONNX Runtime with no gradient through them
    (what reaches the loss only through them keeps its values).
    """

    model: onnx.ModelProto
    history: tuple[dict[str, float | None], ...]
    best_step: int
    steps_run: int
    stopped: str
    seconds: float
    holdout: Dataset
    independent: bool
    trained: tuple[str, ...]
    frozen: tuple[str, ...] = ()

    @property
    def initial_loss(self) -> float:
        """Held-out distillation loss of the student before fine-tuning."""
        return self.history[0]["holdout"]

    @property
    def best_loss(self) -> float:
        """Held-out distillation loss of the returned weights."""
        return min(h["holdout"] for h in self.history)


def finetune(
    student: onnx.ModelProto,
    teacher: onnx.ModelProto,
    data: Dataset,
    *,
    steps: int = 300,
    lr: float = LR,
    batch_size: int = 32,
    temperature: float = 4.0,
    labels: np.ndarray | None = None,
    max_seconds: float | None = None,
    seed: int = 0,
    holdout: float = 0.125,
    patience: int = PATIENCE,
    warmup: float = WARMUP,
    augment: int = 0,
    hints: Sequence[Hint] = (),
    hint_weight: float = HINT_WEIGHT,
    ema: float = 0.0,
    row_mask: str | None = None,
) -> FinetuneResult:
    """Train the float initializers of `student` to reproduce `teacher` on `data`.

    `labels` (one int per sample of `data`) add a cross-entropy term; without them the run is
    pure distillation and `data.labels` is ignored. A seeded `holdout` share of `data` is kept
    out of training for early stopping: after `patience` held-out evaluations without a new best
    the run stops, but never within the first `warmup` share of `steps` (Adam's first steps at
    the cosine schedule's highest rate often raise the held-out loss before it falls). `augment`
    > 0 shifts each training sample's image inputs (4-D float, N×C×H×W) by a seeded random offset
    of up to that many pixels per axis, edges replicated, and distils on the teacher's outputs
    for the shifted batch (more distinct inputs than the data holds; the held-out loss is on the
    unshifted samples). `hints` add intermediate-feature distillation weighted by `hint_weight`
    (0: off); the held-out loss stays on the outputs. `ema` in [0, 1): the decay of an
    exponential moving average of the weights, updated after every step, that is evaluated and
    returned instead of the raw weights (0: off). `row_mask`: the input whose zero entries
    mark token rows the relative squared errors leave out ("auto": an integer 2-D input named
    attention_mask, if any; `calib.row_mask`). Raises UsageError on bad options,
    DataError when the two models do not share their inputs and outputs or a hint's tensor is
    missing or of another width in either model. Nodes the torch interpreter lacks run in ONNX
    Runtime, frozen (`frozen`); a graph is refused (UnsupportedOpError) only when such a node's
    output types are unknown.
    """
    import torch

    from onnxprune.calib.torch_exec import TorchGraph, check_against_ort

    _check_options(
        steps,
        lr,
        batch_size,
        temperature,
        max_seconds,
        holdout,
        patience,
        warmup,
        augment,
        hint_weight,
        ema,
    )
    _check_pair(student, teacher)
    row_mask = row_mask_input(student, row_mask)
    hints = tuple(hints) if hint_weight else ()
    _check_hint_names(student, teacher, hints)
    split = split_for_verification(
        Dataset(data.arrays, _labels(labels, data), data.synthetic, data.source),
        share=holdout,
        samples=len(data),
        seed=seed,
        fitted=True,
    )
    batch = batch_for((s.shape for s in input_specs(student)), batch_size)
    torch.manual_seed(seed)
    graph = TorchGraph(student, freeze=True)
    first = _rows(split.fit.arrays, np.arange(min(batch, len(split.fit))))
    check_against_ort(student, first, graph=graph)
    trainer = _Trainer(
        graph, teacher, split.fit, split.verify, temperature, augment, seed, hints, hint_weight,
        row_mask,
    )  # fmt: skip
    trainer.check_hints(first)
    schedule = _Schedule(steps, lr, batch, max_seconds, seed, patience, round(warmup * steps))
    loop = _loop(trainer, schedule, ema)
    trained = tuple(n for n, p in graph.params.items() if p.grad is not None)
    model = with_initializers(student, loop.best)
    return FinetuneResult(
        model,
        tuple(loop.history),
        loop.best_step,
        loop.steps_run,
        loop.stopped,
        loop.seconds,
        split.verify,
        split.independent,
        trained,
        graph.frozen,
    )


def with_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `values` hold those values, cast to the
    initializer's own dtype (names, shapes and the node list are unchanged)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for index, init in enumerate(out.graph.initializer):
        if init.name in values:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            value = np.asarray(values[init.name]).astype(dtype).reshape(tuple(init.dims))
            out.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, init.name))
    return out


def shifted(
    arrays: Mapping[str, np.ndarray], pixels: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """`arrays` with each sample's image inputs (4-D float, N×C×H×W) moved by one random
    whole-pixel offset in [-pixels, pixels]² (the same for every image input of the sample): a
    random crop of the image padded by replicating its edges, so no new values appear at the
    borders. Other inputs are returned as they are."""
    n = len(next(iter(arrays.values())))
    offsets = rng.integers(0, 2 * pixels + 1, size=(n, 2))
    out = {}
    for name, a in arrays.items():
        if not _is_image(a):
            out[name] = a
            continue
        h, w = a.shape[2:]
        padded = np.pad(a, ((0, 0), (0, 0), (pixels, pixels), (pixels, pixels)), mode="edge")
        crops = [padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)]
        out[name] = np.ascontiguousarray(np.stack(crops))
    return out


def _is_image(array: np.ndarray) -> bool:
    """A batch of images as the shift augmentation reads it: 4-D float N×C×H×W."""
    return array.ndim == 4 and array.dtype.kind == "f"


@dataclass(frozen=True)
class _Schedule:
    """How long and how fast to train, and when early stopping may end the run."""

    steps: int
    lr: float
    batch: int
    max_seconds: float | None
    seed: int
    patience: int  # held-out evaluations without a new best before stopping
    min_steps: int  # no early stop before this step

    @property
    def every(self) -> int:
        """Steps between held-out evaluations."""
        return max(1, self.steps // EVALS)

    def stops_early(self, step: int, best_step: int) -> bool:
        """Past the warm-up, before the last step, and `patience` evaluations since the best."""
        waited = step - best_step >= self.patience * self.every
        return self.min_steps <= step < self.steps and waited


@dataclass
class _LoopState:
    """What the training loop leaves behind."""

    best: dict[str, np.ndarray]
    best_step: int
    history: list[dict[str, float | None]]
    steps_run: int = 0
    stopped: str = "steps"
    seconds: float = 0.0


class _Trainer:
    """The student graph, the teacher's outputs on the train and held-out samples, the loss."""

    def __init__(
        self,
        graph: TorchGraph,
        teacher: onnx.ModelProto,
        train: Dataset,
        held: Dataset,
        temperature: float,
        augment: int = 0,
        seed: int = 0,
        hints: Sequence[Hint] = (),
        hint_weight: float = HINT_WEIGHT,
        row_mask: str | None = None,
    ) -> None:
        import torch

        self.graph, self.train, self.held = graph, train, held
        self.targets = run_original(teacher, train.arrays)
        self.augment, self.rng = augment, np.random.default_rng(seed + 1)
        if augment and not any(_is_image(a) for a in train.arrays.values()):
            raise UsageError("augment shifts image inputs, but no input is 4-D float (N×C×H×W)")
        self.hints, self.hint_weight = tuple(hints), hint_weight
        self.names = [*self.targets, *(h.tensor for h in self.hints)]  # what the teacher gives
        self.teacher, self.taps = None, self.names
        if augment or self.hints:  # the teacher runs on every training batch, on torch's threads
            threads = torch.get_num_threads()  # (ORT's own default spins on the cores torch needs)
            self.teacher, self.taps = tapped_session(teacher, self.names, threads=threads)
        self.held_targets = run_original(teacher, held.arrays)
        self.classes = [n for n, t in self.targets.items() if is_class_scores(t)]
        self.temperature = temperature
        self.row_mask = row_mask
        if train.labels is not None and not self.classes:
            raise UsageError("labels were given but no output of the teacher is 2-D class scores")

    def loss(self, index: np.ndarray) -> torch.Tensor:
        """Distillation (+ cross-entropy with labels) on the training samples at `index`."""
        import torch

        inputs = _rows(self.train.arrays, index)
        if self.augment:
            inputs = shifted(inputs, self.augment, self.rng)
        if self.teacher is not None:
            targets = self._teacher(inputs)
        else:
            targets = {n: t[index] for n, t in self.targets.items()}
        outputs = self.graph.run(inputs, keep=[h.tensor for h in self.hints])
        mask = self._mask(inputs)
        loss = self._distill(outputs, {n: targets[n] for n in self.targets}, mask)
        if self.hints:
            loss = loss + self.hint_weight * self.hint_loss(outputs, targets, mask)
        if self.train.labels is not None:
            labels = torch.from_numpy(self.train.labels[index].astype(np.int64))
            loss = loss + torch.nn.functional.cross_entropy(outputs[self.classes[0]], labels)
        return loss

    def check_hints(self, inputs: Mapping[str, np.ndarray]) -> None:
        """DataError unless every hint's widths hold on `inputs`: the teacher's tensor has
        `channels` along the axis and the student's one per entry of `index`."""
        import torch

        if not self.hints:
            return
        targets = self._teacher(inputs)
        with torch.no_grad():
            outputs = self.graph.run(inputs, keep=[h.tensor for h in self.hints])
        for hint in self.hints:
            theirs, mine = targets[hint.tensor].shape, tuple(outputs[hint.tensor].shape)
            if len(theirs) <= hint.axis or len(mine) <= hint.axis:
                raise DataError(f"hint '{hint.tensor}' has no axis {hint.axis}")
            if theirs[hint.axis] != hint.channels or mine[hint.axis] != len(hint.index):
                raise DataError(
                    f"hint '{hint.tensor}': teacher width {theirs[hint.axis]} (expected "
                    f"{hint.channels}), student width {mine[hint.axis]} (expected "
                    f"{len(hint.index)})"
                )

    def hint_loss(
        self,
        outputs: Mapping[str, torch.Tensor],
        targets: Mapping[str, np.ndarray],
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over the hints of ‖s − t[index]‖² / ‖t[index]‖² (t: the teacher's tensor, its
        channels `index` along the hint's axis; s: the student's; over the rows `mask` marks)."""
        import torch

        total = torch.zeros(())
        for hint in self.hints:
            t = np.take(np.asarray(targets[hint.tensor], np.float32), hint.index, axis=hint.axis)
            total = total + _relative_error(outputs[hint.tensor].float(), torch.from_numpy(t), mask)
        return total / len(self.hints)

    def _mask(self, inputs: Mapping[str, np.ndarray]) -> torch.Tensor | None:
        """1 where the row mask's entry of `inputs` is nonzero, else 0 (None: no mask)."""
        import torch

        if self.row_mask is None:
            return None
        return torch.from_numpy((np.asarray(inputs[self.row_mask]) != 0).astype(np.float32))

    def _teacher(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The teacher's outputs and hint tensors on `inputs`, by tensor name."""
        return dict(zip(self.names, self.teacher.run(self.taps, dict(inputs)), strict=True))

    def held_loss(self, batch: int) -> float:
        """Mean distillation loss over the held-out samples (no gradients)."""
        import torch

        total, n = 0.0, len(self.held)
        with torch.no_grad():
            for start in range(0, n, batch):
                index = np.arange(start, min(start + batch, n))
                inputs = _rows(self.held.arrays, index)
                targets = {k: t[index] for k, t in self.held_targets.items()}
                loss = self._distill(self.graph.run(inputs), targets, self._mask(inputs))
                total += float(loss) * len(index)
        return total / n

    def _distill(
        self,
        outputs: Mapping[str, torch.Tensor],
        targets: Mapping[str, np.ndarray],
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum over the outputs of KL·T² (class scores) or relative squared error (over the
        rows `mask` marks)."""
        import torch
        import torch.nn.functional as F

        total = torch.zeros(())
        for name, target in targets.items():
            s, t = outputs[name].float(), torch.from_numpy(np.asarray(target, np.float32))
            if name in self.classes:
                temp = self.temperature
                kl = F.kl_div(
                    F.log_softmax(s / temp, 1),
                    F.log_softmax(t / temp, 1),
                    log_target=True,
                    reduction="batchmean",
                )
                total = total + kl * temp**2
            else:
                total = total + _relative_error(s, t, mask)
        return total


def _relative_error(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """‖s − t‖² / ‖t‖²; where the first two axes are those of the (samples, positions) `mask`,
    over the rows it marks with 1 only."""
    squares, norms = (s - t) ** 2, t**2
    if mask is not None and tuple(s.shape[:2]) == tuple(mask.shape):
        weight = mask.reshape(*mask.shape, *[1] * (s.dim() - 2))
        squares, norms = squares * weight, norms * weight
    return squares.sum() / norms.sum().clamp_min(1e-30)


class _Average:
    """Exponential moving average of the graph's weights: `update` after each step, `applied`
    puts the averages in place of the weights for a while (to evaluate or snapshot them)."""

    def __init__(self, graph: TorchGraph, decay: float) -> None:
        self.graph, self.decay = graph, decay
        self.values = {name: p.detach().clone() for name, p in graph.params.items()}

    def update(self) -> None:
        for name, p in self.graph.params.items():
            self.values[name].lerp_(p.detach(), 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        import torch

        with torch.no_grad():
            current = {name: p.detach().clone() for name, p in self.graph.params.items()}
            for name, p in self.graph.params.items():
                p.copy_(self.values[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.graph.params.items():
                    p.copy_(current[name])


def _loop(trainer: _Trainer, plan: _Schedule, ema: float = 0.0) -> _LoopState:
    """Adam with a cosine schedule over `plan.steps`; every `plan.every` steps the held-out loss
    is measured and the best weights kept (with `ema` > 0: those of the moving average); stops
    early by `plan.stops_early` or when `plan.max_seconds` have passed."""
    import torch

    graph, start = trainer.graph, time.monotonic()
    average = _Average(graph, ema) if ema else None
    optimizer = torch.optim.Adam(graph.parameters(), lr=plan.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=plan.steps)
    state = _LoopState(_snapshot(graph), 0, [_entry(0, None, trainer, plan.batch, plan.lr)])
    order, running, since = _batches(len(trainer.train), plan.batch, plan.seed), 0.0, 0
    with Bar(plan.steps, "fine-tuning") as bar:
        for step in range(1, plan.steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = trainer.loss(next(order))
            loss.backward()
            optimizer.step()
            schedule.step()
            if average is not None:
                average.update()
            value = float(loss.detach())
            running, since, state.steps_run = running + value, since + 1, step
            bar.update(note=f"loss {value:.4f}")
            late = plan.max_seconds is not None and time.monotonic() - start > plan.max_seconds
            if step % plan.every == 0 or step == plan.steps or late:
                rate = schedule.get_last_lr()[0]
                with average.applied() if average is not None else nullcontext():
                    state.history.append(_entry(step, running / since, trainer, plan.batch, rate))
                    _keep_best(state, graph)
                running, since = 0.0, 0
                if late or plan.stops_early(step, state.best_step):
                    state.stopped = "time" if late else "early stop"
                    break
    state.seconds = time.monotonic() - start
    return state


def _entry(
    step: int, train: float | None, trainer: _Trainer, batch: int, lr: float
) -> dict[str, float | None]:
    """One history row; the held-out loss is measured now."""
    return {"step": step, "train": train, "holdout": trainer.held_loss(batch), "lr": lr}


def _keep_best(state: _LoopState, graph: TorchGraph) -> None:
    """Remember the weights of the last evaluation if its held-out loss is the lowest yet."""
    last = state.history[-1]
    if last["holdout"] < min(h["holdout"] for h in state.history[:-1]):
        state.best, state.best_step = _snapshot(graph), int(last["step"])


def _snapshot(graph: TorchGraph) -> dict[str, np.ndarray]:
    """Copies of the current weights (`params_numpy` shares memory the optimizer overwrites)."""
    return {name: value.copy() for name, value in graph.params_numpy().items()}


def _batches(n: int, batch: int, seed: int):
    """Endless seeded sample order: a fresh permutation per epoch, cut into batches of at most
    `batch` (a model with a fixed batch gets exactly `batch`: the epoch tail is skipped)."""
    rng = np.random.default_rng(seed)
    size = min(batch, n)
    while True:
        perm = rng.permutation(n)
        for begin in range(0, n - size + 1, size):
            yield np.sort(perm[begin : begin + size])


def _rows(arrays: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(a[index]) for name, a in arrays.items()}


def _labels(labels: np.ndarray | None, data: Dataset) -> np.ndarray | None:
    """`labels` checked against `data` (None: an unlabeled run, whatever `data` carries)."""
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise DataError(
            f"labels must be {len(data)} integers (one per sample); got {labels.dtype} "
            f"of length {len(labels)}"
        )
    return labels.astype(np.int64)


def _check_hint_names(
    student: onnx.ModelProto, teacher: onnx.ModelProto, hints: Sequence[Hint]
) -> None:
    """DataError naming the first hint whose tensor one of the models does not compute."""
    for role, model in (("student", student), ("teacher", teacher)):
        names = {t for node in model.graph.node for t in node.output}
        names.update(i.name for i in model.graph.input)
        missing = [h.tensor for h in hints if h.tensor not in names]
        if missing:
            raise DataError(f"hint tensor '{missing[0]}' is not in the {role} model")


def _check_pair(student: onnx.ModelProto, teacher: onnx.ModelProto) -> None:
    """The teacher must take the student's inputs and produce its outputs (by name)."""
    for role, get in (("inputs", input_specs), ("outputs", lambda m: m.graph.output)):
        mine = sorted(x.name for x in get(student))
        theirs = sorted(x.name for x in get(teacher))
        if mine != theirs:
            raise DataError(
                f"student and teacher {role} differ: {', '.join(mine)} vs {', '.join(theirs)}"
            )


def _check_options(
    steps: int,
    lr: float,
    batch_size: int,
    temperature: float,
    max_seconds: float | None,
    holdout: float,
    patience: int,
    warmup: float,
    augment: int,
    hint_weight: float,
    ema: float,
) -> None:
    """UsageError naming the first option out of range."""
    checks = (
        ("steps", steps, steps >= 1),
        ("lr", lr, lr > 0),
        ("batch_size", batch_size, batch_size >= 1),
        ("temperature", temperature, temperature > 0),
        ("max_seconds", max_seconds, max_seconds is None or max_seconds > 0),
        ("holdout", holdout, 0 <= holdout <= 0.5),
        ("patience", patience, patience >= 1),
        ("warmup", warmup, 0 <= warmup <= 1),
        ("augment", augment, augment >= 0),
        ("hint_weight", hint_weight, hint_weight >= 0),
        ("ema", ema, 0 <= ema < 1),
    )
    for name, value, ok in checks:
        if not ok:
            raise UsageError(f"finetune '{name}' is out of range; got {value}")
