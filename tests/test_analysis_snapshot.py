"""benchmarks/analysis_snapshot.py: the snapshot records each group as the analyzer sees it, and
the diff reports exactly the exports whose groups changed."""

from __future__ import annotations

import json
from pathlib import Path

import graphs
import onnx

import onnxprune
from benchmarks.analysis_snapshot import main


def test_snapshot_records_the_groups_and_the_diff_finds_a_change(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # zoo
    folder = tmp_path / "exports"
    folder.mkdir()
    onnx.save(graphs.matmul_chain(), folder / "chain.onnx")
    onnx.save(graphs.reaches_output(), folder / "output.onnx")
    before = tmp_path / "before.json"
    assert main([str(folder), "--out", str(before)]) == 0
    snap = json.loads(before.read_text())
    groups = onnxprune.analyze(graphs.matmul_chain()).groups
    chain = snap["exports/chain.onnx"]
    assert chain["groups"] == sorted([g.name, g.prunable, len(g.edits), g.reason] for g in groups)
    assert [g[:2] for g in chain["groups"]] == [["m1", True], ["m2", False]]
    assert chain["share"] == [1.0, 1.0]  # m2 reads m1's channels: both shrink with the group
    assert snap["exports/output.onnx"]["share"] == [0.0, 0.0]  # its only conv writes the output
    assert main(["--diff", str(before), str(before)]) == 0
    chain["groups"][0][1] = False  # as if m1 had been refused before
    after = tmp_path / "after.json"
    after.write_text(json.dumps(snap))
    capsys.readouterr()
    assert main(["--diff", str(after), str(before)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "exports/chain.onnx: 2 → 2 groups, 1 became prunable, 0 stopped; MACs prunable "
        "(default/--prune-residual) 100.0%/100.0% → 100.0%/100.0%",
        "1 of 2 exports differ",
    ]
