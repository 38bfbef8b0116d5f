"""Option values and their checks, shared by PruneConfig and the stages that read them.

Neutral ground: config.py validates a run's options with these at construction (DESIGN.md §1b:
validate once, at the boundary) without importing methods/ or calib/, which import them in turn.
Only `errors` is imported here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from onnxprune.errors import UsageError

METHODS: tuple[str, ...] = (
    "id",
    "magnitude",
    "random",
    "taylor",
    "fpgm",
    "activation",
    "ippro",
    "biascomp",
    "cob",
    "wanda",
)
"""The method names, in the order the CLI lists them (methods.build_method builds each, except
the per-weight-only WEIGHT_ONLY_METHODS)."""

CRITERIA = ("gamma", "bn-scale", "raw", "folded")
"""What magnitude ranks a channel by (methods/magnitude.py): |γ| of the BatchNorm folded into
it, |γ|/σ, the raw filter's norm before folding, or the folded filter's norm."""

WEIGHT_METHODS = ("biascomp", "magnitude", "wanda", "taylor", "random")
WEIGHT_ONLY_METHODS = ("wanda",)
"""Methods that score single weights and have no channel form."""
CHANNEL_METHODS = tuple(m for m in METHODS if m not in WEIGHT_ONLY_METHODS)
THRESHOLD_RULES = ("max", "mean", "median", "zscore")


def parse_threshold(text: str) -> tuple[str, float]:
    """Parse `RULE:T` (max:0.1, mean:T, median:T, zscore:T) from --threshold."""
    rule, sep, value = text.partition(":")
    if not sep or rule not in THRESHOLD_RULES:
        raise UsageError(
            f"--threshold expects RULE:T, RULE one of {', '.join(THRESHOLD_RULES)}; got '{text}'"
        )
    try:
        number = float(value)
    except ValueError as exc:
        raise UsageError(f"--threshold expects a number after ':'; got '{value}'") from exc
    if not math.isfinite(number) or (rule != "zscore" and number < 0):
        raise UsageError(f"--threshold {rule} needs a finite value ≥ 0; got {value}")
    return rule, number


@dataclass(frozen=True)
class WidthRule:
    """The user's width options, validated once."""

    ratio: float = 0.5
    layer_ratios: tuple[tuple[str, float], ...] = ()
    exclude: tuple[str, ...] = ()
    round_to: int = 16
    prune_residual: bool | None = None  # None (id's default): only where a target needs them
    recipe: Mapping[str, float] = field(default_factory=dict)


def check_ratio(value: float, what: str = "ratio") -> float:
    """A removal ratio must lie in [0, 1)."""
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise UsageError(f"'{what}' must be in [0, 1); got {value}")
    return float(value)


def check_patterns(patterns: Sequence[str]) -> tuple[str, ...]:
    """Validate --exclude regular expressions."""
    for pattern in patterns:
        check_regex(pattern)
    return tuple(patterns)


def check_regex(pattern: str) -> None:
    """Compile `pattern` once, so a bad --exclude / --layer-ratio regex fails at parsing."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"invalid regular expression '{pattern}': {exc}") from exc


def parse_jacobian(text: str) -> tuple[str, int]:
    """'exact' → ("exact", 0); 'probe:N' → ("probe", N)."""
    if text == "exact":
        return "exact", 0
    kind, _, count = text.partition(":")
    if kind == "probe" and count.isdigit() and int(count) > 0:
        return "probe", int(count)
    raise UsageError(f"--jacobian expects 'exact' or 'probe:N'; got '{text}'")


def check_weight_options(
    granularity: str, method: str, sparsity: float | None, *, channel_only: Mapping[str, bool]
) -> None:
    """One-line UsageError for any option that does not fit the chosen granularity."""
    if granularity not in ("channel", "weight"):
        raise UsageError(f"'granularity' must be 'channel' or 'weight'; got '{granularity}'")
    if granularity == "channel":
        if method in WEIGHT_ONLY_METHODS:
            raise UsageError(
                f"--method {method} scores single weights: add --granularity weight --sparsity F"
            )
        if sparsity is not None:
            raise UsageError("--sparsity is for --granularity weight; channels use --ratio")
        return
    if method not in WEIGHT_METHODS:
        raise UsageError(
            f"--granularity weight supports {', '.join(WEIGHT_METHODS)}; got '{method}'"
        )
    if sparsity is None:
        raise UsageError("--granularity weight needs --sparsity F (fraction of weights removed)")
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"'sparsity' must be in [0, 1); got {sparsity}")
    for option, given in channel_only.items():
        if given:
            raise UsageError(f"{option} applies to channel pruning, not --granularity weight")


def parse_pattern(text: str) -> tuple[int, int] | None:
    """--pattern 'row' → None (a fraction of every output row); 'N:M' → (N, M): N of every M
    consecutive weights of a row kept (2:4 keeps 2 of 4), for 0 < N < M."""
    if text == "row":
        return None
    kept, sep, block = text.partition(":")
    if sep and kept.isdigit() and block.isdigit() and 0 < int(kept) < int(block):
        return int(kept), int(block)
    raise UsageError(f"--pattern expects 'row' or N:M with 0 < N < M (e.g. 2:4); got '{text}'")
