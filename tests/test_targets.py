"""`--global`: widths allocated across groups by the method's damage per MAC saved, checked
against brute force on a two-branch model whose groups can be told apart by cost or by score."""

from __future__ import annotations

import graphs
import numpy as np
import pytest
from conftest import assert_outputs_close, reference_path

import onnxprune
from onnxprune.config import PruneConfig
from onnxprune.errors import UsageError


def two_branches(w1: np.ndarray, w2: np.ndarray, out2: int) -> object:
    """x → c1(8) → relu → c1b(2) and x → c2(8) → relu → c2b(out2): two independent groups;
    with out2 = 2 every channel of either group costs the same MACs."""
    b = graphs.Builder(5)
    y1 = b.conv("c1b", b.relu("r1", b.conv("c1", "x", 3, 8, weight=w1)), 8, 2)
    y2 = b.conv("c2b", b.relu("r2", b.conv("c2", "x", 3, 8, weight=w2)), 8, out2)
    return b.model([y1, y2])


def _global(model, ratio: float, cap: float = 0.9, method: str = "magnitude", **options):
    options = {"round_to": 1, **options}
    result = onnxprune.prune(
        model, method=method, ratio=ratio, global_ranking=True, max_group_ratio=cap,
        verify=False, **options,
    )  # fmt: skip
    return {name: len(plan.keep) for name, plan in result.plans.items()}, result


def _removed_share(norms: np.ndarray, removed: int) -> float:
    """Damage of removing the `removed` lowest-norm channels: their share of the total norm."""
    return float(np.sort(norms)[:removed].sum() / norms.sum())


def test_equal_cost_allocation_is_the_least_damage_of_all_splits():
    rng = np.random.default_rng(7)
    w1, w2 = (rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * s for s in (1.0, 0.3))
    w2[:3] *= 0.05  # c2 has three near-dead filters, c1 none: the damage curves differ
    model = two_branches(w1, w2, out2=2)
    norms = [np.abs(w).reshape(8, -1).sum(1).astype(np.float64) for w in (w1, w2)]
    for ratio in (0.25, 0.5, 0.75):
        budget = int(ratio * 16)
        widths, _ = _global(model, ratio)
        splits = [(r, budget - r) for r in range(budget + 1) if r <= 7 and budget - r <= 7]
        damage = {
            s: _removed_share(norms[0], s[0]) + _removed_share(norms[1], s[1]) for s in splits
        }
        best = min(damage, key=damage.get)
        assert (8 - widths["c1"], 8 - widths["c2"]) == best
        assert sorted(damage.values())[1] > damage[best] + 1e-9  # the optimum is unique


def test_equal_damage_allocation_saves_the_most_macs_within_the_cap():
    """Every filter has the same L1 norm, so every split of the budget removes the same share;
    c2's channels feed a wider consumer, so brute force saves most by taking c2 to its cap."""
    signs = np.random.default_rng(2).choice([-1.0, 1.0], size=(2, 8, 3, 3, 3)).astype(np.float32)
    model = two_branches(0.2 * signs[0], 0.2 * signs[1], out2=6)
    per_channel = {"c1": 64 * (27 + 2 * 9), "c2": 64 * (27 + 6 * 9)}  # producer + consumer MACs
    for ratio, cap in ((0.5, 0.75), (0.5, 0.5), (0.25, 0.9)):
        budget, most = int(ratio * 16), int(cap * 8)
        widths, result = _global(model, ratio, cap)
        splits = [(r, budget - r) for r in range(budget + 1) if r <= most and budget - r <= most]
        saved = {s: s[0] * per_channel["c1"] + s[1] * per_channel["c2"] for s in splits}
        best = max(saved, key=saved.get)
        assert (8 - widths["c1"], 8 - widths["c2"]) == best
        assert result.report.macs[0] - result.report.macs[1] == saved[best]


@pytest.mark.parametrize(
    "method", ["magnitude", "random", "fpgm", "activation", "id", "ippro", "cob"]
)
def test_every_method_reaches_the_ratio_within_the_cap(method):
    model = graphs.conv_chain()
    feeds = graphs.random_input(model, n=32)
    for ratio, cap in ((0.5, 0.9), (0.5, 0.6), (0.3, 0.4)):
        widths, result = _global(model, ratio, cap, method=method, data=feeds)
        channels = {"c1": 8, "c2": 6}
        removed = {g: channels[g] - k for g, k in widths.items()}
        assert sum(removed.values()) == int(ratio * 14)  # one-channel steps land exactly
        assert all(r <= int(cap * channels[g]) for g, r in removed.items())
        assert "global allocation" in " ".join(result.report.notes)


def test_a_cap_too_tight_for_the_ratio_stops_at_the_cap():
    widths, _ = _global(graphs.conv_chain(), 0.8, 0.5)
    assert widths == {"c1": 4, "c2": 3}


def test_global_on_a_digits_model_keeps_rounding_and_cap():
    widths, result = _global(reference_path("resnet"), 0.5, 0.75, round_to=16)
    channels = {g.name: g.channels for g in result.groups}
    removed = {g: channels[g] - k for g, k in widths.items()}
    assert sum(removed.values()) >= 0.5 * sum(channels[g] for g in widths)
    assert all(k % 16 == 0 or channels[g] < 32 for g, k in widths.items())
    assert all(r <= 0.75 * channels[g] for g, r in removed.items())


def test_global_with_a_mac_target_meets_it():
    model = reference_path("vgg")
    result = onnxprune.prune(
        model, method="magnitude", target_macs=0.4, global_ranking=True, verify=False
    )
    assert result.report.macs[1] <= 0.4 * result.report.macs[0]
    assert not result.report.target.missed


def test_global_refuses_latency_targets_and_epsilon():
    with pytest.raises(UsageError, match="--global allocates"):
        PruneConfig(method="id", global_ranking=True, epsilon=0.1)


@pytest.mark.parametrize("name", ["vgg", "resnet", "mobilenetv2", "inception"])
def test_a_mac_target_lands_nearest_among_near_uniform_widths(name):
    """Brute force over every near-uniform rounded width vector one step around the result:
    none is nearer the target while staying within the tolerance above it."""
    from onnxprune.budget import choose_widths, cost_of
    from onnxprune.graph.analyze import analyze
    from onnxprune.graph.load import load_model, normalize
    from onnxprune.methods.targets import _step_down
    from onnxprune.methods.width import rounding_step
    from onnxprune.report import MISS_TOLERANCE

    graph = normalize(load_model(reference_path(name)))
    groups = analyze(graph)
    config = PruneConfig(method="magnitude", target_macs=0.5)
    widths = choose_widths(graph, groups, config)
    cost = cost_of(graph, groups, "macs")
    reached = cost(widths.counts) / cost({})
    assert reached == pytest.approx(widths.target.reached, rel=1e-12)
    assert reached <= 0.5 + MISS_TOLERANCE and not widths.target.missed
    channels = {g.name: g.channels for g in groups}
    for group, k in widths.counts.items():
        step = rounding_step(channels[group], 16)
        for new in (_step_down(k, step), min(k + 16, channels[group])):
            if new <= 0:
                continue
            other = cost({**widths.counts, group: new}) / cost({})
            if other <= 0.5 + MISS_TOLERANCE:
                assert abs(reached - 0.5) <= abs(other - 0.5) + 1e-12, (group, new)


@pytest.mark.parametrize("method", ["id", "cob"])
def test_dependent_channels_behind_a_relu_go_first(method):
    """c1's last four filters (and biases) are positive multiples of its first four, so behind
    the ReLU its taps span four dimensions: removing those four costs nothing to ID, and cob,
    which cannot rotate through the ReLU, plans (and ranks) that group as ID does. c2's filters
    are independent and weaker, so by energy c2 would lose channels first."""
    rng = np.random.default_rng(3)
    w1, w2 = rng.standard_normal((2, 8, 3, 3, 3)).astype(np.float32)
    b1, b2 = rng.standard_normal((2, 8)).astype(np.float32)
    scales = np.array([1.5, 0.5, 2.0, 1.0], np.float32)
    w1[4:], b1[4:], w2, b2 = (
        w1[:4] * scales[:, None, None, None],
        b1[:4] * scales,
        w2 * 0.3,
        b2 * 0.3,
    )
    b = graphs.Builder(5)
    y1 = b.conv("c1b", b.relu("r1", b.conv("c1", "x", 3, 8, weight=w1, b=b1)), 8, 2)
    y2 = b.conv("c2b", b.relu("r2", b.conv("c2", "x", 3, 8, weight=w2, b=b2)), 8, 2)
    model = b.model([y1, y2])
    feeds = graphs.random_input(model, n=64)
    widths, result = _global(model, 0.25, method=method, data=feeds, batch_size=64)
    assert widths == {"c1": 4, "c2": 8}
    assert_outputs_close(model, result.model, graphs.random_input(model, n=16, seed=1), atol=1e-4)
