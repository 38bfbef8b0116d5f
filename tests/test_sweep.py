"""`onnxprune sweep` / `sensitivity`: well-formed tables, exact recipes, overlap warning, plots."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import data_path, reference_path, run_model

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.cli import main
from onnxprune.compare import allocate, measure_sensitivity, overlap_warning, parse_method
from onnxprune.errors import UsageError
from onnxprune.methods.width import load_recipe

MODEL = reference_path("mlp")
CALIB, TEST = data_path("mlp", "calib"), data_path("mlp", "test")
FAST = ["--calib-samples", "64", "--eval-samples", "200", "--round-to", "1", "--no-latency"]


def _sweep(tmp_path: Path, *extra: str, data: Path = CALIB) -> int:
    args = ["sweep", str(MODEL), "--methods", "magnitude,id+lsq", "--ratios", "0.3,0.6"]
    return main([*args, "--data", str(data), "--eval", str(TEST), *FAST, *extra])


def test_sweep_writes_every_cell(tmp_path, capsys):
    assert _sweep(tmp_path, "--out", str(tmp_path)) == 0
    with (tmp_path / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    cells = {(r["method"], float(r["point"])) for r in rows}
    assert cells == {(m, r) for m in ("magnitude", "id+lsq") for r in (0.3, 0.6)}
    for row in rows:
        assert not row["error"]
        assert 0.0 <= float(row["accuracy"]) <= 1.0
        assert float(row["rel_l2"]) >= 0.0
        assert row["latency_ms"] == ""
    for method in ("magnitude", "id+lsq"):
        macs = [int(r["macs"]) for r in sorted(rows, key=lambda r: float(r["point"]))
                if r["method"] == method]  # fmt: skip
        assert macs[0] > macs[1]
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert report["metric"] == "accuracy" and len(report["cells"]) == 4
    assert all(c["macs"] < report["macs"] for c in report["cells"])
    assert "magnitude" in capsys.readouterr().out


def test_sweep_targets_reach_mac_reductions(tmp_path):
    result = onnxprune.compare.sweep(
        MODEL, ["magnitude"], data=None, evaluation=TEST, targets=[0.5], latency=False, round_to=1
    )
    (cell,) = result.cells
    assert cell.kind == "target" and cell.macs_reduction >= 0.5 - 0.02


def test_sweep_cell_scores_equal_a_direct_evaluation():
    """The oracle: prune the same way by hand, run ORT on the test split, score with numpy."""
    result = onnxprune.compare.sweep(
        MODEL, ["magnitude"], data=None, evaluation=TEST, ratios=[0.3], latency=False, round_to=1
    )
    (cell,) = result.cells
    pruned = onnxprune.prune(MODEL, method="magnitude", ratio=0.3, round_to=1, verify=False)
    with np.load(TEST) as split:
        x, labels = split["input"], split["labels"]
    got = run_model(pruned.model, {"input": x})["logits"].astype(np.float64)
    ref = run_model(MODEL, {"input": x})["logits"].astype(np.float64)
    assert cell.accuracy == pytest.approx(np.mean(got.argmax(1) == labels), abs=1e-12)
    assert cell.agreement == pytest.approx(np.mean(got.argmax(1) == ref.argmax(1)), abs=1e-12)
    assert cell.rel_l2 == pytest.approx(np.linalg.norm(got - ref) / np.linalg.norm(ref), rel=1e-4)
    assert result.base.accuracy == pytest.approx(np.mean(ref.argmax(1) == labels), abs=1e-12)


def test_overlap_warning_same_file_and_disjoint(tmp_path, capsys):
    assert _sweep(tmp_path, data=TEST) == 0
    err = capsys.readouterr().err
    assert err.count("onnxprune: warning:") == 1 and "same file" in err
    assert _sweep(tmp_path) == 0
    assert "warning" not in capsys.readouterr().err


def test_overlap_warning_shared_samples():
    with np.load(CALIB) as c, np.load(TEST) as t:
        calib, test = Dataset({"input": c["input"]}), Dataset({"input": t["input"]})
        mixed = Dataset({"input": np.concatenate([t["input"][:3], c["input"][:50]])})
    assert overlap_warning(calib, test) is None
    assert "share 3 identical" in overlap_warning(mixed, test)


def test_method_specs():
    assert parse_method("magnitude+lsq").options == {"compensate": "lsq"}
    assert parse_method("id+bias+recalibrate").options == {
        "compensate": "bias",
        "recalibrate": True,
    }
    for bad in ("nope", "id+foo", "magnitude+bias+lsq"):
        with pytest.raises(UsageError):
            parse_method(bad)


def test_sensitivity_recipe_meets_mac_target(tmp_path):
    sens = measure_sensitivity(MODEL, "magnitude", data=None, evaluation=TEST, round_to=1)
    assert set(sens.points) and all(len(p) == 3 for p in sens.points.values())
    allocation = allocate(MODEL, sens, 0.6, round_to=1)
    pruned = onnxprune.prune(MODEL, ratio=0.0, recipe=allocation.ratios, round_to=1, verify=False)
    before, after = pruned.report.macs
    assert after / before <= 0.6
    assert after / before == pytest.approx(allocation.reached_macs, abs=1e-9)
    kept = {row.name: row.kept for row in pruned.report.groups}
    assert all(kept[name] == k for name, k in allocation.kept.items())


def test_sensitivity_cli_writes_its_tables_and_a_loadable_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    args = ["sensitivity", str(MODEL), "--eval", str(TEST), "--eval-samples", "200"]
    args += ["--round-to", "1", "--recipe-out", str(recipe), "--target-macs", "0.5"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sensitivity.csv").is_file() and (tmp_path / "sensitivity.json").is_file()
    ratios = load_recipe(recipe)
    pruned = onnxprune.prune(MODEL, ratio=0.0, recipe=ratios, round_to=1, verify=False)
    assert pruned.report.macs[1] <= 0.5 * pruned.report.macs[0]
    assert "prune with: onnxprune" in capsys.readouterr().out


def test_plot_skipped_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert _sweep(tmp_path, "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert sum("plot skipped" in line for line in out.splitlines()) == 1
    assert (tmp_path / "sweep.csv").is_file() and not (tmp_path / "sweep.png").exists()


def test_plot_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    assert _sweep(tmp_path, "--out", str(tmp_path)) == 0
    assert (tmp_path / "sweep.png").stat().st_size > 0
