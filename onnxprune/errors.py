"""One error tree: every failure the user can cause is an OnnxPruneError with a one-line message.

The CLI maps these to exit codes (1 for OnnxPruneError, 3 for VerificationError); anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of `exc`'s message (its type's name when empty), cut at `limit` chars:
    how a library exception is quoted inside one of ours."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


class OnnxPruneError(Exception):
    """A problem the user can fix; the message is one line naming the file, tensor or node."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ModelLoadError(OnnxPruneError):
    """The model file is missing, unreadable, not ONNX, or uses an unsupported opset."""


class UsageError(OnnxPruneError):
    """An option value is out of range or inconsistent with another option."""


class DataError(OnnxPruneError):
    """Calibration or evaluation data does not match the model, or holds NaN/Inf."""


class NothingToPruneError(OnnxPruneError):
    """The analyzer found no prunable channel group."""


class UnsupportedOpError(OnnxPruneError):
    """The ONNX→torch interpreter lacks an op, so gradient-based methods cannot run."""


class InterpreterMismatchError(OnnxPruneError):
    """The ONNX→torch interpreter's forward pass disagrees with ONNX Runtime."""


class ModelRunError(OnnxPruneError):
    """ONNX Runtime cannot run the original model on the given data: the input's problem."""


class VerificationError(OnnxPruneError):
    """The pruned model failed the checker or could not run in ONNX Runtime."""


class RejectedError(VerificationError):
    """The pruned model runs but misses a bound the caller set (--min-agreement,
    --max-deviation); `result` is the rejected Result, for callers that keep it anyway."""

    def __init__(self, message: str, *, result: object, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.result = result
