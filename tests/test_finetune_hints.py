"""Intermediate-feature distillation (onnxprune.recover.hints and finetune's `hints`): the
correspondence of channels is the one the pruned file has, the hint loss is 0 for a student
equal to the teacher, and what is written still runs as it was trained."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, run_model
from graphs import concat, random_input

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.calib.stats import with_outputs
from onnxprune.calib.torch_exec import check_against_ort
from onnxprune.errors import DataError
from onnxprune.recover.finetune import finetune
from onnxprune.recover.hints import Hint, hints_from_plans

torch = pytest.importorskip("torch")


def _hints(result: onnxprune.Result) -> tuple[Hint, ...]:
    outputs = [o.name for o in result.model.graph.output]
    return hints_from_plans(result.groups, result.plans, skip=outputs)


@pytest.fixture(scope="module")
def inception():
    """(teacher, calibration images) of the digits Inception (Concat of four branches)."""
    with np.load(MODELS / "digits32_calib.npz") as calib:
        x = calib["input"][:96]
    return onnx.load(MODELS / "inception.onnx"), x


def test_the_kept_channels_are_the_teachers_at_the_hinted_indices():
    """Brute force on a Concat of two branches that both read the input, pruned without a
    correction (so every kept channel is the original's channel exactly): each channel of the
    student's Concat output equals exactly one channel of the teacher's, the hinted one."""
    teacher = concat(c1=5, c2=7)
    result = onnxprune.prune(teacher, method="magnitude", ratio=0.5, verify=False)
    (hint,) = _hints(result)
    assert (hint.tensor, hint.axis, hint.channels) == ("cat_out", 1, 12)
    second = hint.index >= 5  # the channels of branch b, after branch a's
    assert 0 < second.sum() < 7 and 0 < (~second).sum() < 5 and np.all(np.diff(second) >= 0)
    feeds = random_input(teacher, n=3)
    theirs = run_model(with_outputs(teacher, ["cat_out"]), feeds)["cat_out"]
    mine = run_model(with_outputs(result.model, ["cat_out"]), feeds)["cat_out"]
    assert mine.shape[1] == len(hint.index)
    for j in range(mine.shape[1]):
        scale = np.abs(theirs).max()
        equal = [c for c in range(12) if np.allclose(mine[:, j], theirs[:, c], atol=1e-6 * scale)]
        assert equal == [hint.index[j]]


def test_the_hint_loss_is_zero_for_a_student_equal_to_the_teacher(inception):
    """Ratio 0: every tap is hinted whole. The first step's training loss (before any update)
    with hints minus the same without them is the hint term alone: 0 up to float32 rounding;
    the same hints with two channels swapped make it far from 0."""
    teacher, x = inception
    result = onnxprune.prune(teacher, method="id", ratio=0.0, data={"input": x}, verify=False)
    hints = _hints(result)
    assert len(hints) >= 6 and all(np.array_equal(h.index, np.arange(h.channels)) for h in hints)
    first = hints[0]
    swapped = Hint(first.tensor, first.axis, np.roll(first.index, 1), first.channels)

    def hint_term(hints: tuple[Hint, ...]) -> float:
        losses = [
            finetune(
                result.model, teacher, Dataset({"input": x}), steps=2, lr=1e-9, hints=h
            ).history[1]["train"]
            for h in (hints, ())
        ]
        return losses[0] - losses[1]

    assert abs(hint_term(hints)) < 1e-9
    assert hint_term((swapped, *hints[1:])) > 0.05 / len(hints)


def test_the_written_model_runs_as_trained_with_hints(inception):
    """Pruned to 30 % of its MACs and fine-tuned with hints: the written file's outputs in ONNX
    Runtime match the interpreter's to 1e-5 relative, and the weights did change."""
    teacher, x = inception
    # one-shot maps: a start that 20 small steps improve on held-out data (the sequential
    # refit's start is already near what they reach, so early stopping would keep step 0)
    result = onnxprune.prune(
        teacher,
        method="id",
        target_macs=0.3,
        round_to=1,
        sequential=False,
        data={"input": x},
        verify=False,
    )
    hints = _hints(result)
    assert hints and any(len(h.index) < h.channels for h in hints)
    tuned = finetune(result.model, teacher, Dataset({"input": x}), steps=20, lr=3e-4, hints=hints)
    check_against_ort(tuned.model, dict(tuned.holdout.arrays), rtol=1e-5, atol=0.0)
    assert tuned.best_step > 0 and tuned.trained


def test_hints_that_do_not_fit_are_refused(inception):
    teacher, x = inception
    data = Dataset({"input": x})
    first = next(n.output[0] for n in teacher.graph.node if n.op_type == "Relu")
    with pytest.raises(DataError, match="hint tensor 'nowhere' is not in the student"):
        finetune(teacher, teacher, data, steps=1, hints=(Hint.whole("nowhere", 1, 4),))
    with pytest.raises(DataError, match=f"hint '{first}': teacher width"):
        finetune(teacher, teacher, data, steps=1, hints=(Hint.whole(first, 1, 5),))
