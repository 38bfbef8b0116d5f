"""benchmarks/analysis_snapshot.py: the snapshot records each group as the analyzer sees it, and
the diff reports exactly the exports whose groups changed."""

from __future__ import annotations

import json

import graphs
import onnx

import onnxprune
from benchmarks.analysis_snapshot import main


def test_snapshot_records_the_groups_and_the_diff_finds_a_change(tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    onnx.save(graphs.matmul_chain(), folder / "chain.onnx")
    onnx.save(graphs.reaches_output(), folder / "output.onnx")
    before = tmp_path / "before.json"
    assert main([str(folder), "--out", str(before)]) == 0
    snap = json.loads(before.read_text())
    groups = onnxprune.analyze(graphs.matmul_chain()).groups
    assert snap["exports/chain.onnx"] == sorted(
        [g.name, g.prunable, len(g.edits), g.reason] for g in groups
    )
    assert [g[:2] for g in snap["exports/chain.onnx"]] == [["m1", True], ["m2", False]]
    assert main(["--diff", str(before), str(before)]) == 0
    snap["exports/chain.onnx"][0][1] = False  # as if m1 had been refused before
    after = tmp_path / "after.json"
    after.write_text(json.dumps(snap))
    capsys.readouterr()
    assert main(["--diff", str(after), str(before)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "exports/chain.onnx: 2 → 2 groups, 1 became prunable, 0 stopped",
        "1 of 2 exports differ",
    ]
