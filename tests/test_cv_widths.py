"""`--cv-widths`: width candidates scored on the calibration samples their maps were not fitted
to (two folds), against a brute-force held-out evaluation."""

from __future__ import annotations

from dataclasses import replace

import graphs
import numpy as np
import pytest

import onnxprune
from onnxprune.budget import held_out_deviation
from onnxprune.calib.data import Dataset
from onnxprune.calib.gather import gather
from onnxprune.cli import build_parser
from onnxprune.cli.prune import _config
from onnxprune.config import PruneConfig
from onnxprune.graph.analyze import analyze as find_groups
from onnxprune.graph.load import export, normalize
from onnxprune.graph.rewrite import rewrite
from onnxprune.measure.verify import run, run_original
from onnxprune.methods.id import InterpolativeDecomposition
from onnxprune.methods.planner import make_plans

CANDIDATES = [{"c1": 2, "c2": 5}, {"c1": 5, "c2": 2}, {"c1": 3, "c2": 3}, {"c1": 8, "c2": 1}]


def _setup(n: int):
    model = graphs.conv_chain()
    config = PruneConfig(method="id", target_macs=0.5, recalibrate=False, sequential=False,
                         cv_widths=True)  # fmt: skip
    graph = normalize(model)
    groups = find_groups(graph)
    dataset = Dataset(graphs.random_input(model, n, seed=2))
    return graph, groups, dataset, config


def _brute_force(graph, groups, dataset, config, counts) -> float:
    """Statistics gathered on each fold's samples alone, the maps fitted on them, the squared
    deviation of the other fold's outputs summed, over both folds' squared output norms."""
    method, original = InterpolativeDecomposition(intercept=True), export(graph)
    config = replace(config, cv_widths=False)  # plain statistics: no fold sums to read
    folds = [dataset.fold(k, 2) for k in (0, 1)]
    deviation = norm = 0.0
    for fit, held in (folds, folds[::-1]):
        stats = gather(graph, groups, counts, frozenset({"gram"}), fit, config).stats
        plans = make_plans(groups, counts, stats, method, config)
        got = run(export(rewrite(graph, groups, plans)), held.arrays)
        for name, value in run_original(original, held.arrays).items():
            deviation += float(np.sum((got[name].astype(np.float64) - value) ** 2))
            norm += float(np.sum(value.astype(np.float64) ** 2))
    return deviation / norm


def test_held_out_scores_are_the_brute_force_held_out_deviations():
    """One statistics pass with fold sums scores every candidate exactly as fitting on each
    half alone and measuring the other half does."""
    graph, groups, dataset, config = _setup(10)
    full = {g.name: g.channels for g in groups if g.prunable}
    stats = gather(graph, groups, full, frozenset({"gram"}), dataset, config).stats
    method = InterpolativeDecomposition(intercept=True)
    held = held_out_deviation(graph, groups, stats, method, config, dataset)
    for counts in CANDIDATES:
        expected = _brute_force(graph, groups, dataset, config, counts)
        got = held(counts)
        assert got.shape == (len(dataset),)
        np.testing.assert_allclose(float(np.sum(got)), expected, rtol=1e-4)


def test_the_candidate_chosen_is_the_brute_force_held_out_best(save_tmp):
    """`prune` with `cv_widths` reports each candidate's held-out deviation, equal to the brute
    force one for the widths it reached, and keeps the least."""
    model = graphs.conv_chain()
    path = save_tmp(model)
    data = graphs.random_input(model, 10, seed=2)
    options = {"recalibrate": False, "sequential": False, "round_to": 1, "verify": False}
    result = onnxprune.prune(
        path, method="id", data=data, target_macs=0.5, cv_widths=True, **options
    )
    target = result.report.target
    assert target.allocation == min(target.deviations, key=target.deviations.get)
    counts = {g.name: g.kept for g in result.report.groups if g.status == "pruned"}
    graph, groups, dataset, config = _setup(10)
    expected = _brute_force(graph, groups, dataset, config, counts)
    np.testing.assert_allclose(target.deviations[target.allocation] ** 2, expected, rtol=1e-4)


@pytest.mark.parametrize("flags, expected", [((), False), (("--cv-widths",), True)])
def test_the_command_line_switches_it(flags, expected):
    args = build_parser().parse_args(["prune", "m.onnx", "--method", "id", *flags])
    assert _config(args).cv_widths is expected
