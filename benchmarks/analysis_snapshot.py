"""What the analyzer makes of a set of exports, to compare two trees of the tool.

    python benchmarks/analysis_snapshot.py /work/zoo_cache models --out before.json   # tree A
    python benchmarks/analysis_snapshot.py /work/zoo_cache models --out after.json    # tree B
    python benchmarks/analysis_snapshot.py --diff before.json after.json

Per export (every `*.onnx` in the folders given, keyed by folder and file name): each group's
name, prunability, number of edits and reason, or the error the analysis raised. `--diff` prints
the exports whose groups differ and how many groups gained or lost prunability; it exits 1 when
any differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Write a snapshot, or compare two."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="*", help="Folders of .onnx files.")
    parser.add_argument("--out", help="Snapshot to write.")
    parser.add_argument("--diff", nargs=2, metavar=("A", "B"), help="Compare two snapshots.")
    args = parser.parse_args(argv)
    if args.diff:
        return diff(*(json.loads(Path(p).read_text()) for p in args.diff))
    if not args.out or not args.folders:
        parser.error("give folders and --out, or --diff A B")
    paths = sorted(p for folder in args.folders for p in Path(folder).resolve().glob("*.onnx"))
    found = {f"{p.parent.name}/{p.name}": snapshot(p) for p in paths}
    Path(args.out).write_text(json.dumps(found, indent=1) + "\n")
    return 0


def snapshot(path: Path) -> list[list[object]] | str:
    """[name, prunable, edits, reason] of each group of the export at `path`, or the error."""
    import onnxprune

    try:
        groups = onnxprune.analyze(str(path)).groups
    except Exception as err:  # recorded: a tree that raises where the other analyses is a finding
        return f"{type(err).__name__}: {err}"
    return sorted([g.name, bool(g.prunable), len(g.edits), g.reason] for g in groups)


def diff(before: dict, after: dict) -> int:
    """Print what changed per export; 1 when anything did."""
    changed = 0
    for path in sorted(before.keys() | after.keys()):
        a, b = before.get(path), after.get(path)
        if a == b:
            continue
        changed += 1
        if isinstance(a, list) and isinstance(b, list):
            was = {g[0]: g[1] for g in a}
            now = {g[0]: g[1] for g in b}
            gained = sum(1 for n, p in now.items() if p and not was.get(n, False))
            lost = sum(1 for n, p in was.items() if p and not now.get(n, False))
            print(f"{path}: {len(a)} → {len(b)} groups, {gained} became prunable, {lost} stopped")
        else:
            print(f"{path}: {_what(a)} → {_what(b)}")
    print(f"{changed} of {len(before.keys() | after.keys())} exports differ")
    return int(changed > 0)


def _what(entry: list | str | None) -> str:
    """An error, 'N groups', or 'absent'."""
    if entry is None:
        return "absent"
    return entry if isinstance(entry, str) else f"{len(entry)} groups"


if __name__ == "__main__":
    sys.exit(main())
