"""Fine-tuning by distillation (onnxprune.recover.finetune): what is trained is what is
written, the graph is untouched, accuracy recovers, runs are reproducible, bad input is refused.

The pruned model is the digits MLP with 70 % of its channels removed by magnitude (no
correction), whose test accuracy collapses; the teacher is the original in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, run_model

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.calib.torch_exec import check_against_ort
from onnxprune.cli import main
from onnxprune.errors import DataError, UsageError
from onnxprune.recover.finetune import finetune, shifted

torch = pytest.importorskip("torch")

TEMPERATURE = 4.0


@pytest.fixture(scope="module")
def setup():
    """(teacher, pruned student, calibration Dataset, calibration labels, test (x, labels))."""
    teacher = onnx.load(MODELS / "mlp.onnx")
    with (
        np.load(MODELS / "digits64_calib.npz") as calib,
        np.load(MODELS / "digits64_test.npz") as t,
    ):
        data = Dataset({"input": calib["input"]}, source="digits64_calib")
        labels, test = calib["labels"], (t["input"], t["labels"])
    student = onnxprune.prune(teacher, method="magnitude", ratio=0.7, verify=False).model
    return teacher, student, data, labels, test


@pytest.fixture(scope="module")
def tuned(setup):
    teacher, student, data, _, _ = setup
    return finetune(student, teacher, data, steps=150, lr=3e-3, temperature=TEMPERATURE)


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The single output of `model` on input `x`, in ONNX Runtime."""
    (out,) = run_model(model, {"input": x}).values()
    return out


def _accuracy(model: onnx.ModelProto, test: tuple[np.ndarray, np.ndarray]) -> float:
    return float(np.mean(_logits(model, test[0]).argmax(1) == test[1]))


def _kl_t2(student: np.ndarray, teacher: np.ndarray, temp: float) -> float:
    """KL(softmax(t/T) ‖ softmax(s/T))·T², mean over samples, in float64."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        z = x.astype(np.float64) / temp
        z -= z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lt, ls = log_softmax(teacher), log_softmax(student)
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), 1)) * temp**2)


def test_the_written_model_is_the_trained_one(setup, tuned):
    teacher, _, _, _, _ = setup
    feeds = dict(tuned.holdout.arrays)
    check_against_ort(tuned.model, feeds, rtol=1e-5, atol=0.0)
    # the held-out loss the trainer measured in torch for the kept weights, recomputed from
    # ONNX Runtime outputs of the written file
    x = feeds["input"]
    got = _kl_t2(_logits(tuned.model, x), _logits(teacher, x), TEMPERATURE)
    assert got == pytest.approx(tuned.best_loss, rel=1e-4)
    assert tuned.independent and len(tuned.holdout) == 64


def test_the_graph_is_unchanged_only_values(setup, tuned):
    _, student, _, _, _ = setup
    before, after = student.graph, tuned.model.graph
    assert [n.SerializeToString() for n in before.node] == [
        n.SerializeToString() for n in after.node
    ]
    layout = [(i.name, i.data_type, tuple(i.dims)) for i in before.initializer]
    assert layout == [(i.name, i.data_type, tuple(i.dims)) for i in after.initializer]
    assert before.input == after.input and before.output == after.output
    changed = [
        a.name
        for a, b in zip(before.initializer, after.initializer, strict=True)
        if not np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    ]
    assert changed and set(changed) <= set(tuned.trained)


def test_distillation_recovers_test_accuracy(setup, tuned):
    teacher, student, _, _, test = setup
    before, after = _accuracy(student, test), _accuracy(tuned.model, test)
    # measured: 97.8 % original, 38.1 % pruned, 93.0 % after 150 unlabeled steps (held-out
    # distillation loss 20.1 → 2.25)
    assert _accuracy(teacher, test) > 0.95
    assert after > before + 0.4 and after > 0.85, (before, after)
    assert tuned.best_loss < 0.2 * tuned.initial_loss


def test_the_same_seed_gives_identical_weights(setup):
    teacher, student, data, labels, _ = setup
    runs = [finetune(student, teacher, data, steps=10, labels=labels, seed=3) for _ in range(2)]
    first, second = (r.model.graph.initializer for r in runs)
    for a, b in zip(first, second, strict=True):
        assert a.SerializeToString() == b.SerializeToString(), a.name
    assert runs[0].history == runs[1].history


def test_a_diverging_run_keeps_the_input_weights(setup):
    teacher, student, data, _, _ = setup
    result = finetune(student, teacher, data, steps=20, lr=50.0)
    assert result.best_step == 0
    for a, b in zip(student.graph.initializer, result.model.graph.initializer, strict=True):
        assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


@pytest.mark.parametrize(
    ("warmup", "patience", "stop"), [(0.0, 5, 5), (0.0, 2, 2), (0.5, 5, 10), (0.5, 2, 10)]
)
def test_early_stopping_waits_for_the_warmup(setup, warmup, patience, stop):
    """One evaluation per step (20 steps); a diverging run never beats step 0, so it stops
    `patience` evaluations after it, but never before `warmup` · steps."""
    teacher, student, data, _, _ = setup
    result = finetune(student, teacher, data, steps=20, lr=50.0, patience=patience, warmup=warmup)
    assert (result.best_step, result.steps_run, result.stopped) == (0, stop, "early stop")
    assert [h["step"] for h in result.history] == list(range(stop + 1))


def test_what_the_interpreter_lacks_is_frozen_and_the_rest_trained(setup):
    """An identity Shrink (λ = 0, bias 0; not in the op table) after the first layer: it runs in
    ONNX Runtime, the first layer (reached only through it) keeps its weights, the rest learns."""
    teacher, student, data, _, _ = setup
    frozen = onnx.ModelProto()
    frozen.CopyFrom(student)
    first = frozen.graph.node[1].output[0]  # the first Relu
    for node in frozen.graph.node[2:]:
        node.input[:] = ["shrunk" if i == first else i for i in node.input]
    shrink = onnx.helper.make_node("Shrink", [first], ["shrunk"], name="shrink", lambd=0.0)
    frozen.graph.node.insert(2, shrink)
    result = finetune(frozen, teacher, data, steps=30, lr=3e-3)
    assert result.frozen == ("shrink",)
    assert len(result.trained) == 4 and {n[:6] for n in result.trained} == {"net.2.", "net.4."}
    before = {i.name: i for i in frozen.graph.initializer}
    for init in result.model.graph.initializer:
        same = init.SerializeToString() == before[init.name].SerializeToString()
        assert same == init.name.startswith("net.0."), init.name
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in frozen.graph.node]
    assert result.best_loss < 0.9 * result.initial_loss  # measured: 20.1 → 17.5 in 30 steps


def test_mismatched_teacher_inputs_are_refused(setup, tmp_path):
    teacher, student, data, _, _ = setup
    renamed = onnx.ModelProto()
    renamed.CopyFrom(teacher)
    renamed.graph.input[0].name = "x"
    for node in renamed.graph.node:
        node.input[:] = ["x" if i == "input" else i for i in node.input]
    with pytest.raises(DataError, match="student and teacher inputs differ: input vs x"):
        finetune(student, renamed, data, steps=1)
    onnx.save(student, tmp_path / "student.onnx")
    onnx.save(renamed, tmp_path / "teacher.onnx")
    args = ["finetune", str(tmp_path / "student.onnx"), "--teacher", str(tmp_path / "teacher.onnx")]
    data_path = str(MODELS / "digits64_calib.npz")
    assert main([*args, "--data", data_path, "-o", str(tmp_path / "out.onnx")]) == 1
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("steps", 0),
        ("lr", -1.0),
        ("temperature", 0.0),
        ("holdout", 0.9),
        ("patience", 0),
        ("warmup", 1.5),
        ("augment", -1),
        ("hint_weight", -1.0),
        ("ema", 1.0),
    ],
)
def test_bad_options_are_refused(setup, option, value):
    teacher, student, data, _, _ = setup
    with pytest.raises(UsageError, match=f"'{option}' is out of range"):
        finetune(student, teacher, data, **{option: value})


def test_cli_writes_a_model_closer_to_the_teacher(setup, tmp_path, capsys):
    teacher, student, _, _, _ = setup
    onnx.save(student, tmp_path / "student.onnx")
    onnx.save(teacher, tmp_path / "teacher.onnx")
    out = tmp_path / "tuned.onnx"
    argv = ["finetune", str(tmp_path / "student.onnx"), "--teacher", str(tmp_path / "teacher.onnx")]
    argv += ["--data", str(MODELS / "digits64_calib.npz"), "--steps", "40", "--labels"]
    assert main([*argv, "--lr", "3e-3", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "top-1 agreement" in text and out.is_file()
    assert "kept the weights of step" in text


def test_prune_with_finetune_fits_on_the_fit_split_only(tmp_path):
    common = dict(method="magnitude", ratio=0.7, data=MODELS / "digits64_calib.npz", seed=0)
    plain = onnxprune.prune(MODELS / "mlp.onnx", **common)
    tuned = onnxprune.prune(MODELS / "mlp.onnx", finetune_steps=60, **common)
    (note,) = [n for n in tuned.report.notes if n.startswith("fine-tuned by distillation")]
    assert note.endswith("; 2 inner tensors matched to the original's kept channels")
    assert tuned.report.verification.independent
    assert tuned.report.verification.agreement > plain.report.verification.agreement + 0.2
    with pytest.raises(UsageError, match="refill the zeroed weights"):
        onnxprune.PruneConfig(
            method="magnitude", granularity="weight", sparsity=0.5, finetune_steps=5
        )


def test_prune_passes_its_finetune_learning_rate():
    """A rate that diverges (50) keeps the pruned weights (no held-out evaluation beats step 0):
    the written model is the one without fine-tuning; a non-positive rate is refused."""
    common = dict(method="magnitude", ratio=0.7, data=MODELS / "digits64_calib.npz", seed=0)
    plain = onnxprune.prune(MODELS / "mlp.onnx", **common)
    diverged = onnxprune.prune(MODELS / "mlp.onnx", finetune_steps=20, finetune_lr=50.0, **common)
    assert any("weights of step 0" in n for n in diverged.report.notes)
    for a, b in zip(plain.model.graph.initializer, diverged.model.graph.initializer, strict=True):
        assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    with pytest.raises(UsageError, match="'finetune_lr' must be positive"):
        onnxprune.PruneConfig(method="magnitude", finetune_steps=5, finetune_lr=0.0)


def test_shifted_is_a_crop_of_the_edge_padded_image():
    """Brute force: each sample equals its image padded by repeating the border pixels, then
    cropped at the drawn offset; every offset in [-p, p]² is drawn; other inputs pass as given."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((400, 2, 5, 6)).astype(np.float32)
    flat = rng.standard_normal((400, 3)).astype(np.float32)
    pixels = 2
    out = shifted({"x": images, "f": flat}, pixels, np.random.default_rng(7))
    assert out["f"] is flat and out["x"].shape == images.shape
    offsets = np.random.default_rng(7).integers(0, 2 * pixels + 1, size=(400, 2)) - pixels
    assert {tuple(o) for o in offsets} == {(a, b) for a in range(-2, 3) for b in range(-2, 3)}
    for sample, (dy, dx) in enumerate(offsets):
        for c, i, j in np.ndindex(2, 5, 6):
            source = images[sample, c, min(max(i + dy, 0), 4), min(max(j + dx, 0), 5)]
            assert out["x"][sample, c, i, j] == source


def test_augment_needs_an_image_input(setup):
    teacher, student, data, _, _ = setup
    with pytest.raises(UsageError, match="no input is 4-D float"):
        finetune(student, teacher, data, steps=1, augment=1)


def test_augment_distils_on_the_teachers_outputs_for_the_shifted_batch():
    """The student is the teacher: with the teacher run on the same shifted batch the training
    loss is 0 (up to rounding), while the teacher's outputs on shifted and unshifted inputs
    differ, so targets of the unshifted inputs would give a loss far from 0."""
    teacher = onnx.load(MODELS / "inception.onnx")
    with np.load(MODELS / "digits32_calib.npz") as calib:
        x = calib["input"][:64]
    result = finetune(teacher, teacher, Dataset({"input": x}), steps=2, lr=1e-9, augment=2)
    assert max(h["train"] for h in result.history[1:]) < 1e-6
    moved = shifted({"input": x}, 2, np.random.default_rng(1))["input"]
    assert _kl_t2(_logits(teacher, moved), _logits(teacher, x), TEMPERATURE) > 1e-2


def test_ema_writes_the_moving_average_of_the_weights(setup):
    """One step with decay 0.5: the written weights are the mean of the input weights and the
    weights one step of the same run (ema 0) reaches."""
    teacher, student, data, _, _ = setup
    plain = finetune(student, teacher, data, steps=1, lr=1e-4)
    average = finetune(student, teacher, data, steps=1, lr=1e-4, ema=0.5)
    assert plain.best_step == average.best_step == 1
    before = {i.name: onnx.numpy_helper.to_array(i) for i in student.graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in plain.model.graph.initializer}
    for init in average.model.graph.initializer:
        got, want = onnx.numpy_helper.to_array(init), (before[init.name] + after[init.name]) / 2
        assert np.allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max()), init.name
    assert any(not np.array_equal(before[n], after[n]) for n in plain.trained)


def _token_projection(weight: np.ndarray) -> onnx.ModelProto:
    """y = x · W for tokens x (samples, positions, 4); `attention_mask` (samples, positions) is
    an input the graph does not read, as a padded batch's mask is for what the loss counts."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tokens",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "s", 4]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["n", "s"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "s", 3])],
        [onnx.numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("row_mask", [None, "auto", "attention_mask"])
def test_the_row_mask_leaves_padding_rows_out_of_the_loss(row_mask):
    """The held-out loss of the student as given (step 0) against brute force in float64 on
    the held-out samples: ‖x(W' − W)‖² / ‖xW‖² over the rows the mask marks, or over every row
    without one. Padding rows are 100× larger, so the two differ by far."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3))
    changed = weight + 0.1 * rng.standard_normal((4, 3))
    mask = (rng.random((64, 6)) < 0.6).astype(np.int64)
    x = (rng.standard_normal((64, 6, 4)) * np.where(mask, 1.0, 100.0)[..., None]).astype(np.float32)
    data = Dataset({"x": x, "attention_mask": mask})
    teacher, student = _token_projection(weight), _token_projection(changed)
    result = finetune(student, teacher, data, steps=1, lr=1e-9, holdout=0.25, row_mask=row_mask)
    held_x = result.holdout.arrays["x"].astype(np.float64)
    rows = result.holdout.arrays["attention_mask"] != 0 if row_mask else np.ones(held_x.shape[:2])
    error = (held_x @ (changed - weight)) ** 2 * rows[..., None]
    norm = (held_x @ weight) ** 2 * rows[..., None]
    expected = error.sum() / norm.sum()
    assert result.history[0]["holdout"] == pytest.approx(expected, rel=1e-4)
    every_row = ((held_x @ (changed - weight)) ** 2).sum() / ((held_x @ weight) ** 2).sum()
    assert (abs(expected - every_row) > 0.1 * expected) == (row_mask is not None)


def test_a_row_mask_that_is_not_an_input_is_refused():
    weight = np.eye(4)[:, :3]
    model = _token_projection(weight)
    data = Dataset({"x": np.zeros((8, 2, 4), np.float32), "attention_mask": np.ones((8, 2))})
    with pytest.raises(UsageError, match="--row-mask 'mask' is not an input"):
        finetune(model, model, data, steps=1, row_mask="mask")
