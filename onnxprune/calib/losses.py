"""The loss a gradient pass differentiates, chosen from the task and whether labels exist.

With labels: cross-entropy (class scores) or mean squared error (`task="regress"`). Without:
cross-entropy to the model's own argmax for class outputs, otherwise ⟨r, f(x)⟩ with a seeded
Gaussian r, whose squared gradient in expectation is the output Jacobian's energy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from onnxprune.errors import UsageError

if TYPE_CHECKING:
    import torch

TASKS = ("auto", "classify", "regress")


def loss_name(task: str, output_shape: tuple[int, ...], has_labels: bool) -> str:
    """A short description of the loss `loss` will use, for the report."""
    classify = _is_classify(task, output_shape)
    if has_labels:
        return "cross-entropy to labels" if classify else "mean squared error to labels"
    if classify:
        return "cross-entropy to the model's own argmax (no labels)"
    return "random projection <r, f(x)> (no labels, seeded)"


def loss(task: str, output: torch.Tensor, labels: np.ndarray | None, *, seed: int) -> torch.Tensor:
    """The scalar loss of one batch (summed over samples, so batches add up)."""
    import torch
    import torch.nn.functional as F

    if task not in TASKS:
        raise UsageError(f"'task' must be one of {', '.join(TASKS)}; got '{task}'")
    if _is_classify(task, tuple(output.shape)):
        target = output.argmax(dim=1) if labels is None else torch.as_tensor(labels).long()
        return F.cross_entropy(output, target, reduction="sum")
    if labels is not None:
        target = torch.as_tensor(labels, dtype=output.dtype).reshape(output.shape)
        return F.mse_loss(output, target, reduction="sum")
    rng = np.random.default_rng(seed)
    probe = torch.as_tensor(rng.standard_normal(output.shape[1:]), dtype=output.dtype)
    return (output * probe).sum()


def _is_classify(task: str, shape: tuple[int, ...]) -> bool:
    if task != "auto":
        return task == "classify"
    return len(shape) == 2 and shape[1] > 1
