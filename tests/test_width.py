"""How many channels each group keeps: ratio arithmetic, rounding and the per-group overrides."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxprune.errors import UsageError
from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.width import (
    group_ratio,
    keep_counts,
    kept,
    load_recipe,
    parse_layer_ratio,
    rounding_step,
)
from onnxprune.options import WidthRule, check_ratio


def group(
    name: str,
    channels: int = 32,
    *,
    producers: tuple[str, ...] | None = None,
    reason: str | None = None,
) -> ChannelGroup:
    return ChannelGroup(name=name, channels=channels, producers=producers or (name,), reason=reason)


@pytest.mark.parametrize(
    "channels, ratio, expected",
    [
        (10, 0.5, 5),
        (10, 0.25, 8),
        (10, 0.3, 7),
        (7, 0.5, 4),
        (3, 0.34, 2),
        (100, 0.0, 100),
        (1, 0.9, 1),
        (10, 0.99, 1),
        (4, 0.75, 1),
    ],
)
def test_ratio_counts_channels_removed(channels, ratio, expected):
    assert kept(channels, ratio, 1) == expected


def test_float_noise_does_not_cost_a_channel():
    # 0.3 · 10 = 2.9999999999999996 in floating point: still 3 channels removed
    assert kept(10, 0.3, 1) == 7
    assert kept(100, 0.07, 1) == 93


@pytest.mark.parametrize(
    "channels, ratio, round_to, expected",
    [
        (64, 0.5, 8, 32),
        (64, 0.3, 8, 48),  # 45 → nearest multiple of 8
        (64, 0.45, 8, 40),  # 36 → 40 (halves round up: keep the wider option)
        (15, 0.5, 8, 8),  # fewer than 2·8 channels: no rounding
        (15, 0.6, 8, 6),
        (16, 0.6, 8, 8),  # 7 → 8
        (16, 0.9, 8, 8),  # never below one multiple
        (24, 0.0, 8, 24),  # ratio 0 keeps all, even when not a multiple
        (20, 0.05, 8, 16),
    ],
)
def test_round_to_multiples_only_for_wide_groups(channels, ratio, round_to, expected):
    assert kept(channels, ratio, round_to) == expected


@pytest.mark.parametrize(
    "channels, round_to, step",
    [
        (64, 16, 16),
        (32, 16, 16),
        (31, 16, 8),
        (16, 16, 8),
        (15, 16, 1),
        (96, 32, 32),
        (40, 32, 16),
        (20, 32, 8),
        (15, 8, 1),
        (16, 8, 8),
        (7, 4, 1),
        (24, 12, 12),
        (20, 12, 1),
        (100, 1, 1),
    ],
)
def test_narrow_groups_round_to_half_the_multiple_down_to_eight(channels, round_to, step):
    assert rounding_step(channels, round_to) == step
    assert kept(channels, 0.5, round_to) % step == 0


@pytest.mark.parametrize(
    ("units", "unit", "round_to", "step"),
    [
        (32, 8, 16, 2),  # FCOS's GroupNorm(32, 256): 16 channels = 2 groups of 8
        (8, 4, 16, 4),  # 32 channels: steps of 16 channels
        (4, 4, 16, 2),  # 16 channels, narrow: steps of 8 = 2 groups
        (4, 2, 16, 1),  # 8 channels: no rounding
        (16, 3, 16, 8),  # groups of 3: 16 would be all 16 groups; 8 groups are 24 channels
        (10, 64, 16, 1),  # a group of 64 channels is already a multiple of 16
    ],
)
def test_units_of_several_channels_round_the_channels_they_hold(units, unit, round_to, step):
    """A GroupNorm group is `unit` channels of its layers: the width stays a multiple of the
    channel step, in whole groups."""
    assert rounding_step(units, round_to, unit) == step
    k = kept(units, 0.5, round_to, unit)
    assert k % step == 0 or k == units


@settings(max_examples=60, deadline=None, database=None)
@given(
    channels=st.integers(1, 300),
    ratio=st.floats(0.0, 1.0, exclude_max=True),
    round_to=st.sampled_from([1, 2, 4, 8, 16]),
)
def test_kept_invariants(channels, ratio, round_to):
    raw = max(1, channels - math.floor(ratio * channels + 1e-9))
    k = kept(channels, ratio, round_to)
    assert 1 <= k <= channels
    if ratio == 0.0:
        assert k == channels
    step = rounding_step(channels, round_to)
    if step == 1 or raw == channels:
        assert k == raw
    elif k != channels:
        assert k % step == 0
        assert abs(k - raw) <= step / 2 or k == step  # never below one multiple


def test_keep_counts_skips_blocked_and_coupled_groups():
    groups = [
        group("a", 32),
        group("b", 16, reason="channels reach graph output 'y'"),
        group("c", 32, producers=("c", "d")),
    ]
    assert keep_counts(groups, WidthRule(ratio=0.5, round_to=1)) == {"a": 16}
    assert keep_counts(groups, WidthRule(ratio=0.5, round_to=1, prune_residual=True)) == {
        "a": 16,
        "c": 16,
    }


def test_layer_ratio_last_match_wins_and_matches_producers():
    rule = WidthRule(ratio=0.5, round_to=1, layer_ratios=(("conv", 0.25), ("conv2", 0.75)))
    groups = [
        group("conv1"),
        group("conv2"),
        group("fc"),
        group("trunk", producers=("trunk", "conv2_b")),
    ]
    assert group_ratio(groups[0], rule) == 0.25
    assert group_ratio(groups[1], rule) == 0.75
    assert group_ratio(groups[2], rule) == 0.5
    coupled = WidthRule(**{**rule.__dict__, "prune_residual": True})
    assert group_ratio(groups[3], coupled) == 0.75  # a producer's name matches
    assert keep_counts(groups[:3], rule) == {"conv1": 24, "conv2": 8, "fc": 16}


def test_exclude_beats_recipe_and_recipe_beats_layer_ratio():
    rule = WidthRule(
        ratio=0.5,
        round_to=1,
        layer_ratios=(("conv", 0.25),),
        exclude=("^fc",),
        recipe={"conv1": 0.875, "fc": 0.1},
    )
    counts = keep_counts([group("conv1"), group("conv2"), group("fc")], rule)
    assert counts == {"conv1": 4, "conv2": 24}


def test_parse_layer_ratio():
    assert parse_layer_ratio("blocks\\.1=0.25") == ("blocks\\.1", 0.25)
    assert parse_layer_ratio("a=b=0.5") == ("a=b", 0.5)  # the last '=' separates


@pytest.mark.parametrize(
    "text, message",
    [
        ("conv", "REGEX=R"),
        ("=0.5", "REGEX=R"),
        ("conv=abc", "number"),
        ("conv=1.5", "[0, 1)"),
        ("conv=-0.1", "[0, 1)"),
        ("conv=nan", "[0, 1)"),
        ("conv[=0.5", "regular expression"),
    ],
)
def test_parse_layer_ratio_errors(text, message):
    with pytest.raises(UsageError) as excinfo:
        parse_layer_ratio(text)
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("value", [1.0, 1.5, -0.5, float("nan"), float("inf")])
def test_check_ratio_rejects(value):
    with pytest.raises(UsageError, match=r"must be in \[0, 1\)"):
        check_ratio(value)


def test_load_recipe_json_flat_and_nested(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"conv1": 0.5, "fc": 0}))
    assert load_recipe(flat) == {"conv1": 0.5, "fc": 0.0}
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"ratios": {"conv1": 0.25}}))
    assert load_recipe(nested) == {"conv1": 0.25}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        ("[0.5, 0.25]", "must map group names"),
        ('{"conv1": 1.5}', "[0, 1)"),
    ],
)
def test_load_recipe_errors(tmp_path, content, message):
    path = tmp_path / "recipe.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError) as excinfo:
        load_recipe(path)
    assert message in str(excinfo.value)


@pytest.mark.parametrize("value", ['"half"', "null"])
def test_load_recipe_non_numeric_ratio_is_usage_error(tmp_path, value):
    path = tmp_path / "recipe.json"
    path.write_text(f'{{"conv1": {value}}}')
    with pytest.raises(UsageError):
        load_recipe(path)


def test_error_allocation_is_optimal_for_convex_errors_and_separable_cost():
    """With squared errors convex in the channels removed and every channel costing the same, the
    greedy error-per-cost allocation is the brute-force optimum among all width vectors that cost
    no more than it does."""
    import itertools

    import numpy as np

    from onnxprune.methods.targets import WidthCost, _Term, allocate_by_error

    rng = np.random.default_rng(3)
    channels = {"a": 6, "b": 5, "c": 4}
    cost = WidthCost(2.0, tuple(_Term(4.0 * c, ((g, c),), c, (), 1, None)
                                for g, c in channels.items()))  # fmt: skip
    curves = {}
    for g, c in channels.items():  # e²(k) convex in the removed count c − k, 0 at full width
        steps = np.sort(rng.uniform(0.01, 1.0, c))  # increasing increments: convex
        sq = np.concatenate([[0.0], np.cumsum(steps)])[::-1]  # index k = kept channels
        curves[g] = np.sqrt(sq)
    full = cost(channels)
    for target in (0.8, 0.6, 0.45, 0.3):
        got = allocate_by_error(channels, curves, cost, target, dict.fromkeys(channels, 1))
        assert cost(got) <= target * full + 1e-9
        best = min(
            (sum(curves[g][k] ** 2 for g, k in zip(channels, ks, strict=True)), ks)
            for ks in itertools.product(*(range(1, c + 1) for c in channels.values()))
            if cost(dict(zip(channels, ks, strict=True))) <= cost(got) + 1e-9
        )
        assert sum(curves[g][k] ** 2 for g, k in got.items()) <= best[0] + 1e-12
