"""Cells in worker processes or on Ray give the serial run's results; failures stay in a cell."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import data_path, reference_path
from parallel_cells import cell

from onnxprune.cli import main
from onnxprune.compare import measure_sensitivity
from onnxprune.compare.parallel import Backend, CellError, run_cells
from onnxprune.compare.sweep import sweep
from onnxprune.errors import UsageError

MODEL = reference_path("mlp")
CALIB, TEST = data_path("mlp", "calib"), data_path("mlp", "test")
SWEEP = ["sweep", str(MODEL), "--methods", "magnitude,id+lsq,random", "--ratios", "0.3,0.6"]
SWEEP += ["--seeds", "2", "--data", str(CALIB), "--eval", str(TEST), "--calib-samples", "128"]
SWEEP += ["--eval-samples", "200", "--round-to", "1", "--no-latency", "--save-models"]
# Workers are fresh processes: the suite's ONNXPRUNE_TEST_ORT session patch does not reach them.
SAME_ENGINE = os.environ.get("ONNXPRUNE_TEST_ORT") != "disable_all"


def _cells(out: Path) -> list[dict]:
    """The sweep's JSON cells without what differs between runs: time taken, file location."""
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    for row in cells:
        row.pop("seconds")
        row["onnx"] = Path(row["onnx"]).read_bytes() if row["onnx"] else None
    return cells


def _table(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("written:"))


def test_failures_stay_in_their_cell_serially():
    tasks = [2, "bug", 3, "refused"]
    got = run_cells(cell, 10, tasks, Backend(), "cells")
    expected = [20, CellError("KeyError: 'bug'"), 30, CellError("this cell's data is refused")]
    assert got == expected


def test_a_dying_worker_takes_down_only_its_own_cell():
    got = run_cells(cell, 10, [2, "bug", "die", 3], Backend(workers=2), "cells")
    died = CellError("the worker process died while running this cell")
    assert got == [20, CellError("KeyError: 'bug'"), died, 30]


def test_bad_worker_count_is_refused():
    with pytest.raises(UsageError, match="'workers' must be at least 1; got 0"):
        Backend(workers=0)


@pytest.mark.skipif(not SAME_ENGINE, reason="workers run ORT with its default optimisations")
def test_two_workers_give_the_serial_table_json_and_models(tmp_path, capsys):
    assert main([*SWEEP, "--out", str(tmp_path / "serial")]) == 0
    serial = capsys.readouterr().out
    assert main([*SWEEP, "--out", str(tmp_path / "workers"), "--workers", "2"]) == 0
    parallel = capsys.readouterr().out
    assert _table(parallel) == _table(serial)
    cells = _cells(tmp_path / "serial")
    assert len(cells) == 6 and all(c["onnx"] and not c["error"] for c in cells)
    assert _cells(tmp_path / "workers") == cells
    assert len(list((tmp_path / "workers" / "models").glob("*.onnx"))) == 6


@pytest.mark.skipif(not SAME_ENGINE, reason="workers run ORT with its default optimisations")
def test_sensitivity_with_workers_equals_serial():
    run = lambda backend: measure_sensitivity(  # noqa: E731
        MODEL, "magnitude", data=None, evaluation=TEST, ratios=(0.5,), round_to=1, backend=backend
    )
    assert run(Backend(workers=2)).to_dict() == run(Backend()).to_dict()


@pytest.mark.skipif(not SAME_ENGINE, reason="Ray workers run ORT with its default optimisations")
def test_ray_gives_the_serial_cells():
    pytest.importorskip("ray")
    run = lambda backend: sweep(  # noqa: E731
        MODEL, ["magnitude", "id+lsq"], data=CALIB, evaluation=TEST, ratios=[0.3, 0.6],
        latency=False, round_to=1, calib_samples=128, backend=backend,
    )  # fmt: skip
    serial, on_ray = run(Backend()), run(Backend(workers=2, ray="local"))
    strip = lambda result: [{**c, "seconds": None} for c in result.to_dict()["cells"]]  # noqa: E731
    assert strip(on_ray) == strip(serial) and not any(c.error for c in serial.cells)
    assert on_ray.format_table() == serial.format_table()


def test_a_model_past_the_protobuf_limit_is_not_sent_to_workers(monkeypatch):
    from onnxprune.graph import load

    monkeypatch.setattr(load, "EXTERNAL_LIMIT", 1 << 10)  # the mlp is larger: "past the limit"
    with pytest.raises(UsageError, match="past protobuf's 2 GB limit cannot be sent"):
        sweep(MODEL, ["magnitude"], data=None, evaluation=TEST, ratios=[0.3],
              backend=Backend(workers=2))  # fmt: skip
