"""What the analyzer makes of a set of exports, to compare two trees of the tool.

    python benchmarks/analysis_snapshot.py /work/zoo_cache models --out before.json   # tree A
    python benchmarks/analysis_snapshot.py /work/zoo_cache models --out after.json    # tree B
    python benchmarks/analysis_snapshot.py --diff before.json after.json

Per export (every `*.onnx` in the folders given, keyed by folder and file name): each group's
name, prunability, number of edits and reason, and the share of the Conv/Gemm/MatMul MACs in
prunable groups by default and with `--prune-residual` (`zoo.py`'s count), or the error the
analysis raised. `--diff` prints the exports whose groups differ, how many groups gained or lost
prunability and the shares before and after; it exits 1 when any differ.
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


def snapshot(path: Path) -> dict[str, object] | str:
    """The groups ([name, prunable, edits, reason]) and prunable MAC shares of the export at
    `path`, or the error."""
    from zoo import analysis_summary

    import onnxprune

    try:
        groups = onnxprune.analyze(str(path)).groups
        summary = analysis_summary(path)
    except Exception as err:  # recorded: a tree that raises where the other analyses is a finding
        return f"{type(err).__name__}: {err}"
    shares = [summary[mode]["share"] for mode in ("default", "prune_residual")]
    return {
        "groups": sorted([g.name, bool(g.prunable), len(g.edits), g.reason] for g in groups),
        "share": [round(float(x), 4) for x in shares],
    }


def diff(before: dict, after: dict) -> int:
    """Print what changed per export; 1 when anything did."""
    changed = 0
    for path in sorted(before.keys() | after.keys()):
        a, b = before.get(path), after.get(path)
        if a == b:
            continue
        changed += 1
        if isinstance(a, dict) and isinstance(b, dict):
            was = {g[0]: g[1] for g in a["groups"]}
            now = {g[0]: g[1] for g in b["groups"]}
            gained = sum(1 for n, p in now.items() if p and not was.get(n, False))
            lost = sum(1 for n, p in was.items() if p and not now.get(n, False))
            shares = " → ".join("/".join(f"{x:.1%}" for x in e["share"]) for e in (a, b))
            print(f"{path}: {len(was)} → {len(now)} groups, {gained} became prunable, {lost} "
                  f"stopped; MACs prunable (default/--prune-residual) {shares}")  # fmt: skip
        else:
            print(f"{path}: {_what(a)} → {_what(b)}")
    print(f"{changed} of {len(before.keys() | after.keys())} exports differ")
    return int(changed > 0)


def _what(entry: dict | str | None) -> str:
    """An error, 'N groups', or 'absent'."""
    if entry is None:
        return "absent"
    return entry if isinstance(entry, str) else f"{len(entry['groups'])} groups"


if __name__ == "__main__":
    sys.exit(main())
