"""Markdown tables of `benchmarks/results/zoo.json` (written by `benchmarks/zoo.py`).

python benchmarks/zoo_report.py [results/zoo.json]     # prints the tables for RESULTS.md
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT = Path(__file__).resolve().parent / "results" / "zoo.json"
RUN_KEYS = ("magnitude@0.25", "magnitude@0.5", "id@0.25", "id@0.5")


def main(argv: list[str] | None = None) -> None:
    """Print the coverage table, the pruning table and the top blockers per model."""
    args = sys.argv[1:] if argv is None else argv
    results = json.loads(Path(args[0] if args else DEFAULT).read_text())
    models = results["models"]
    print("\n".join(coverage_table(models)))
    print()
    print("\n".join(pruning_table(models)))
    print()
    print("\n".join(blocker_list(models)))


def coverage_table(models: Mapping[str, Any]) -> list[str]:
    """Per model: analyze time, prunable MAC shares, MAC check, ratio-0 deviation, bench time."""
    lines = [
        "| model | analyze s | groups (prunable) | MACs prunable: default | --prune-residual "
        "| MACs tool / ORT shapes | ratio 0 max rel dev | 1 ORT pass, 32 samples (s) "
        "| benchmark s | measured at |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        a, check, zero = m["analysis"], m["mac_check"], m["ratio0"]
        if "error" in a:
            cells = [f"error: {a['error']}"] + ["—"] * 3
        else:
            groups = f"{a['groups']} ({a['prunable_groups']})"
            shares = [pct(a["default"]["share"]), pct(a["prune_residual"]["share"])]
            cells = [f"{a['analyze_s']:.1f}", groups, *shares]
        ratio = short(check.get("error")) or f"{check['ratio']:.4f}" + unknown_note(check)
        dev = short(zero.get("error")) or f"{zero['max_rel_deviation']:.1e}"
        forward = m["forward_s"] if isinstance(m["forward_s"], float) else "error"
        lines.append(
            f"| {name} | " + " | ".join([*cells, ratio, dev, str(forward)]) + f" | "
            f"{m['benchmark_s']:.0f} | {m.get('onnxprune_commit', '?')} |"
        )
    return lines


def pruning_table(models: Mapping[str, Any]) -> list[str]:
    """Per model and run: status, deviation, MAC cut, speedup, prune time ÷ forward pass."""
    lines = [
        "| model | run | exit | checker | held-out rel-L2 | MAC cut: tool (ORT shapes) "
        "| speedup (b1) | prune s (÷ 1 pass) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        for key in RUN_KEYS:
            lines.append(f"| {name} | {key} | " + " | ".join(run_cells(m["runs"][key])) + " |")
    return lines


def run_cells(run: Mapping[str, Any]) -> list[str]:
    """The cells of one prune run; a failure shows its one-line error."""
    time_cell = f"{run['prune_s']:.0f} ({run.get('prune_over_forward', '—')}×)"
    if run["exit"] != 0:
        error = str(run.get("error", "")).replace("|", "\\|")[:160]
        return [str(run["exit"]), f"**{error}**", "—", "—", "—", time_cell]
    checker = "ok" if run["checker"] is True else f"**{run['checker']['error']}**"
    if run["ort_runs"] is not True:
        return ["0", checker, f"**ORT: {run['ort_runs']}**", "—", "—", time_cell]
    latency = run["latency"]
    speed = f"{latency['speedup']:.2f}" if "speedup" in latency else f"error: {latency['error']}"
    rel = f"{run['rel_l2'][0]:.3f}"
    if "rel_l2_centered" in run:
        rel += f" (centred {run['rel_l2_centered'][0]:.3f})"
    ort_cut = run["mac_cut_ort_shapes"]
    cut = f"{pct(run['mac_cut'])} ({pct(ort_cut) if isinstance(ort_cut, float) else 'error'})"
    return ["0", checker, rel, cut, speed, time_cell]


def blocker_list(models: Mapping[str, Any]) -> list[str]:
    """The three blockers holding the most MACs per model (default mode), with an example."""
    lines = ["| model | blocker (MACs it holds, groups) | example |", "|---|---|---|"]
    for name, m in models.items():
        if "error" in m["analysis"]:
            continue
        for row in m["analysis"]["default"]["blockers"][:3]:
            if not row["mac_share"]:
                continue
            what = f"{row['blocker']} ({pct(row['mac_share'])}, {row['groups']})"
            lines.append(f"| {name} | {cell(what)} | {cell(row['example'])} |")
    return lines


def unknown_note(check: Mapping[str, Any]) -> str:
    """How many nodes the tool's shape inference left unknown, if any."""
    return f" ({check['unknown']} nodes unknown)" if check.get("unknown") else ""


def short(error: str | None) -> str:
    """An error cut to fit a table cell (the full line is in the JSON)."""
    return "" if error is None else f"error: {cell(error)[:90]}…"


def pct(value: float | None) -> str:
    """A share as a percentage with one decimal."""
    return "—" if value is None else f"{100 * value:.1f} %"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell (pipes escaped, long names cut)."""
    return text.replace("|", "\\|")[:200]


if __name__ == "__main__":
    main()
