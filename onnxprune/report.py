"""The pruning report: one record per group plus totals, as a terminal table and as JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from onnxprune.measure.cost import format_count
from onnxprune.measure.verify import Verification

MISS_TOLERANCE = 0.01  # a target counts as met up to this fraction of the original above it


@dataclass(frozen=True)
class GroupRow:
    """One channel group: its width before and after, and what happened to it and why.

    `error` is the relative reconstruction error of the kept channels' correction at the
    group's taps (the largest over its taps), `error_ratio` that error over the optimal rank-k
    error (1 = as good as any k-dimensional map); both None where no tap statistics were
    gathered, the ratio also for taps too wide to afford the optimum (methods/planner.py).
    `info` holds the method's own numbers.
    """

    name: str
    channels: int
    kept: int
    status: str
    info: Mapping[str, float] = field(default_factory=dict)
    error: float | None = None
    error_ratio: float | None = None


@dataclass(frozen=True)
class TargetResult:
    """How a --target-macs/params/latency was met: fractions of the original asked and reached.

    `allocation` names how the widths were chosen ("near-uniform", or an ID error allocation),
    `ratio` is the near-uniform channel ratio the search found, and `deviations` the measured
    relative L2 output deviation of every allocation scored (ID), by label; `missed` is set when
    `reached` exceeds `target` by more than MISS_TOLERANCE.
    """

    kind: str
    target: float
    reached: float
    allocation: str = "near-uniform"
    ratio: float | None = None
    deviations: Mapping[str, float] = field(default_factory=dict)
    missed: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "missed", self.reached > self.target + MISS_TOLERANCE)

    def note(self) -> str:
        """The report line: target, reached, and how the widths were chosen."""
        how = f"widths {self.allocation}"
        if self.ratio is not None and self.allocation == "near-uniform":
            how = f"near-uniform ratio {self.ratio:.3f}"
        if self.deviations:
            others = [f"{k} {v:.3f}" for k, v in self.deviations.items() if k != self.allocation]
            how += f": output deviation {self.deviations[self.allocation]:.3f}"
            how += f"; {', '.join(others)}" if others else ""
        asked = f"target {self.kind} {self.target:.3f} of the original"
        return f"{asked}: reached {self.reached:.3f} ({how})"

    def warning(self) -> str | None:
        """One line when the target was missed, saying what keeps the model from shrinking."""
        if not self.missed:
            return None
        return (
            f"target {self.kind} {self.target:.3f} missed: reached {self.reached:.3f} of the "
            "original; the groups allowed to shrink cannot go lower (coupled residual groups "
            "shrink only with --prune-residual, which id turns on by itself where a target needs "
            "it; --round-to N keeps multiples of N; excluded and unprunable groups stay)"
        )


@dataclass(frozen=True)
class Report:
    """Everything `onnxprune prune` tells the user, in one object."""

    model: str
    method: str
    options: Mapping[str, object]
    groups: tuple[GroupRow, ...]
    params: tuple[int, int]
    macs: tuple[int, int]
    file_size: tuple[int, int]
    data: str
    verification: Verification | None = None
    loss: str | None = None
    bench: Mapping[str, object] | None = None
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    target: TargetResult | None = None
    unit: str = "channels"
    nonzero_weights: tuple[int, int] | None = None
    zipped_size: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict with the same content as the terminal table."""
        out = asdict(self)
        out["verification"] = self.verification.to_dict() if self.verification else None
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float)

    def format(self) -> str:
        """The terminal table: groups, totals, verification."""
        lines = [f"onnxprune: {self.model}  method={self.method}  data: {self.data}"]
        if self.loss:
            lines.append(f"gradients of: {self.loss}")
        lines.append("")
        lines += format_groups(self.groups, self.unit)
        lines += ["", *self._totals()]
        if self.verification:
            lines += ["", *format_verification(self.verification)]
        if self.bench:
            lines += ["", str(self.bench.get("table", ""))]
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"WARNING: {warning}" for warning in self.warnings]
        return "\n".join(lines)

    def _totals(self) -> list[str]:
        rows = [("parameters", *self.params), ("MACs", *self.macs), ("file bytes", *self.file_size)]
        if self.nonzero_weights:  # per-weight pruning: zeros stay in dense tensors
            rows.insert(1, ("nonzero w.", *self.nonzero_weights))
        if self.zipped_size:
            rows.append(("zipped", *self.zipped_size))
        out = []
        for label, before, after in rows:
            change = 100.0 * (after - before) / before if before else 0.0
            counts = f"{format_count(before):>9} -> {format_count(after):>9}"
            out.append(f"{label:<11} {counts}  ({change:+.1f} %)")
        return out


def format_groups(groups: tuple[GroupRow, ...], unit: str = "channels") -> list[str]:
    """Rows `name  before -> after  status` with aligned columns (`unit`: what is counted)."""
    width = max([len(g.name) for g in groups] + [5])
    lines = [f"{'group' if unit == 'channels' else 'layer':<{width}}  {unit:>15}  status"]
    for g in groups:
        numbers = {**g.info, "err": g.error, "err/opt": g.error_ratio}
        extra = "".join(f"  {k}={v:.3g}" for k, v in numbers.items() if v is not None)
        lines.append(f"{g.name:<{width}}  {g.channels:>6} -> {g.kept:<6}  {g.status}{extra}")
    return lines


def format_verification(v: Verification) -> list[str]:
    lines = [f"verification: checker {v.checker}; {v.samples} samples ({v.data})"]
    if v.split:
        lines.append(f"  samples: {v.split}")
    for o in v.outputs:
        if o.lengths is not None:
            before, after = o.lengths
            lines.append(f"  output '{o.name}': {before} rows -> {after} (a length the data "
                         "decides, as after NMS: values not compared)")  # fmt: skip
            continue
        top1 = (
            "" if o.top1_agreement is None else f"  top-1 agreement {100 * o.top1_agreement:.1f} %"
        )
        lines.append(f"  output '{o.name}': max |Δ| {o.max_abs:.3g}  rel L2 {o.rel_l2:.3g}{top1}")
    return lines
