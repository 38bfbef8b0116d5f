"""How many channels each group keeps: ratio, per-layer overrides, recipes, exclusions, rounding.

A ratio counts channels removed from each group (not parameters or MACs). Rounding keeps counts in
multiples of `round_to` where a group has at least 2·round_to channels (narrower groups in multiples
of 8 where they have at least 16; `rounding_step`), because ONNX Runtime's
CPU conv kernels process channels in blocks of 16 on AVX-512 CPUs (8 on other x86-64): widths
between multiples of 16 cost as much as the next multiple (benchmarks/round_to.py,
docs/RESULTS.md). `--round-to auto` / `--target` pick the block (measure/host.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from onnxprune.errors import UsageError
from onnxprune.graph.groups import ChannelGroup
from onnxprune.options import WidthRule, check_ratio, check_regex

MIN_STEP = 8  # narrower multiples gained nothing measurable (benchmarks/round_to.py)


def keep_counts(groups: Sequence[ChannelGroup], rule: WidthRule) -> dict[str, int]:
    """Kept channel count per prunable, selected group (groups left alone are absent)."""
    counts = {}
    for group in groups:
        ratio = group_ratio(group, rule)
        if ratio is not None:
            counts[group.name] = kept(group.channels, ratio, rule.round_to, group.unit)
    return tied_counts(groups, counts)


def tied_counts(
    groups: Sequence[ChannelGroup], counts: Mapping[str, int], *, widest: bool = False
) -> dict[str, int]:
    """Counts where groups sharing a tie (the conv groups of one grouped Conv) keep equal
    widths: the smallest any of them is given, so a MAC target or a sensitivity probe on one
    conv group holds for all (`widest`: the largest, so an error bound each met holds for all);
    if one of them is left alone (absent), all are."""
    pick = max if widest else min
    tied, changed = dict(counts), True
    while changed:  # a group in two ties joins them: repeat until every tie agrees
        alone = {t for g in groups if g.name not in tied for t in g.ties}
        low: dict[str, int] = {}
        for group in (g for g in groups if g.name in tied):
            for tie in group.ties:
                low[tie] = pick(low.get(tie, tied[group.name]), tied[group.name])
        changed = False
        for group in (g for g in groups if g.ties and g.name in tied):
            if alone & set(group.ties):
                del tied[group.name]
                changed = True
            elif (new := pick(low[t] for t in group.ties)) != tied[group.name]:
                tied[group.name], changed = new, True
    return tied


def group_ratio(group: ChannelGroup, rule: WidthRule) -> float | None:
    """The removal ratio for `group`, or None when it is blocked, excluded or coupled."""
    if not group.prunable or (group.coupled and not rule.prune_residual):
        return None
    names = (group.name, *group.producers)
    if any(re.search(pattern, name) for pattern in rule.exclude for name in names):
        return None
    if group.name in rule.recipe:
        return rule.recipe[group.name]
    for pattern, ratio in reversed(rule.layer_ratios):
        if any(re.search(pattern, name) for name in names):
            return ratio
    return rule.ratio


def kept(channels: int, ratio: float, round_to: int, unit: int = 1) -> int:
    """Channels kept when removing `ratio` of `channels`, rounded, at least one."""
    keep = max(1, channels - math.floor(ratio * channels + 1e-9))
    step = rounding_step(channels, round_to, unit)
    if keep == channels or step == 1:
        return keep
    return min(channels, max(step, step * math.floor(keep / step + 0.5)))


def group_steps(groups: Sequence[ChannelGroup], round_to: int) -> dict[str, int]:
    """Each group's `rounding_step`, by name."""
    return {g.name: rounding_step(g.channels, round_to, g.unit) for g in groups}


def rounding_step(channels: int, round_to: int, unit: int = 1) -> int:
    """The multiple a group's width is kept in: `round_to` where the group has ≥ 2·round_to
    channels, else half of it while that stays ≥ MIN_STEP, else 1 (no rounding). Where each of
    the group's channels is `unit` channels of its layers (a GroupNorm's groups), the step is
    the fewest whole units that make a multiple of that many layer channels, and the group
    needs twice that many units.

    Narrow groups matter on small networks: on the digits MobileNetV2 at 50 % fewer MACs, widths
    in multiples of 8 ran 1.2–1.3× faster than the original while unrounded ones ran 0.55–0.65×
    (docs/RESULTS.md, "Rounding on the digits models").
    """
    step = round_to
    while step > 1:
        units = math.lcm(step, unit) // unit
        if channels >= 2 * units:
            return units
        if step % 2 or step // 2 < MIN_STEP:
            return 1
        step //= 2
    return 1


def parse_layer_ratio(text: str) -> tuple[str, float]:
    """Parse `REGEX=R` from --layer-ratio."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise UsageError(f"--layer-ratio expects REGEX=R; got '{text}'")
    check_regex(pattern)
    try:
        return pattern, check_ratio(float(value), f"layer ratio for {pattern}")
    except ValueError as exc:
        raise UsageError(f"--layer-ratio expects a number after '='; got '{value}'") from exc


def load_recipe(path: str | Path) -> dict[str, float]:
    """Read a recipe: a JSON or YAML mapping of group name to removal ratio."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe file '{path}' does not exist")
    text = path.read_text()
    try:
        data = _parse_recipe_text(path, text)
    except ValueError as exc:
        raise UsageError(f"recipe '{path}' is not valid JSON/YAML: {exc}") from exc
    ratios = data.get("ratios", data) if isinstance(data, dict) else None
    if not isinstance(ratios, dict):
        raise UsageError(f"recipe '{path}' must map group names to ratios")
    return {
        str(k): check_ratio(_number(v, f"recipe ratio for {k}"), f"recipe ratio for {k}")
        for k, v in ratios.items()
    }


def _number(value: object, what: str) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what} must be a number; got {value!r}") from exc


def _parse_recipe_text(path: Path, text: str) -> object:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise UsageError(
                "YAML recipes need PyYAML", hint="pip install onnxprune[yaml]"
            ) from exc
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(str(exc).splitlines()[0]) from exc
    return json.loads(text)
