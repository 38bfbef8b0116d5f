"""A cell function for the parallel-runner tests, in a module light enough to import quickly in
every spawned worker (the test module itself imports the whole package and conftest)."""

from __future__ import annotations

import os

from onnxprune.errors import DataError


def cell(shared: int, task: object) -> int:
    """Multiplies, raises a bug, refuses its input, or kills its worker process."""
    if task == "die":
        os._exit(3)
    if task == "bug":
        raise KeyError(task)
    if task == "refused":
        raise DataError("this cell's data is refused")
    return shared * int(task)
