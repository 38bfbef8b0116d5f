"""`id` prunes residual streams where a MAC/parameter target is out of reach without them; the
other methods, a ratio, and `--no-prune-residual` leave them whole."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_outputs_close
from onnx import numpy_helper

import onnxprune
from onnxprune.budget import clearly_less
from onnxprune.cli import build_parser
from onnxprune.cli.prune import _config
from onnxprune.config import PruneConfig
from onnxprune.options import WidthRule


def test_only_id_leaves_the_choice_to_the_target():
    def residual(**options) -> bool | None:
        return PruneConfig(**options).width.prune_residual

    assert residual(method="id") is None
    assert residual(method="id", width=WidthRule(prune_residual=False)) is False
    assert residual(method="magnitude") is False and residual(method="taylor") is False
    assert residual(method="magnitude", width=WidthRule(prune_residual=True)) is True


@pytest.mark.parametrize(
    "flags, expected",
    [((), None), (("--prune-residual",), True), (("--no-prune-residual",), False)],
)
def test_the_command_line_leaves_the_default_to_the_method(flags, expected):
    args = build_parser().parse_args(["prune", "m.onnx", "--method", "id", *flags])
    assert _config(args).width.prune_residual is expected
    magnitude = build_parser().parse_args(["prune", "m.onnx", *flags])
    assert _config(magnitude).width.prune_residual is bool(expected)


def _duplicated_stream() -> onnx.ModelProto:
    """graphs.residual_block with the stream's channels 4–7 copies of 0–3 in both of its
    producers (c1 and c3), so t + u carries 4 independent channels of 8. With c2 excluded the
    stream is the only group: keeping 4 of its 8 channels keeps half the MACs."""
    model = graphs.residual_block()
    for init in model.graph.initializer:
        if init.name.split(".")[0] in ("c1", "c3"):
            value = numpy_helper.to_array(init).copy()
            value[4:] = value[:4]
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return model


def _weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Each Conv's weight shape, by node name."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"}


def test_id_prunes_a_residual_stream_exactly_when_the_target_needs_it(save_tmp):
    """A MAC target the stream left whole cannot reach: id removes the duplicated half of the
    stream (8 → 4 at c1, c3 and c4's input; c2, excluded, keeps its 6), the outputs do not
    change, the target is met and the report says why; with `prune_residual=False` it is missed,
    and a ratio leaves the stream whole."""
    model = _duplicated_stream()
    path = save_tmp(model)
    data = graphs.random_input(model, 128)
    options = {"method": "id", "data": data, "round_to": 1, "exclude": ("c2",), "verify": False}
    result = onnxprune.prune(path, target_macs=0.5, **options)
    shapes = _weight_shapes(result.model)
    assert shapes["c1"][0] == shapes["c3"][0] == shapes["c4"][1] == 4 and shapes["c2"][0] == 6
    assert_outputs_close(path, result.model, graphs.random_input(model, 16, seed=1), atol=1e-4)
    assert not result.report.target.missed
    assert any("residual streams pruned" in note for note in result.report.notes)
    whole = onnxprune.prune(path, target_macs=0.5, prune_residual=False, allow_noop=True,
                            **options)  # fmt: skip
    assert whole.report.target.missed and _weight_shapes(whole.model)["c1"][0] == 8
    by_ratio = onnxprune.prune(path, ratio=0.5, allow_noop=True, **options)
    assert _weight_shapes(by_ratio.model)["c1"][0] == 8


def test_id_prunes_a_residual_stream_where_that_deviates_least(save_tmp):
    """A target that cutting c2 alone would reach (streams whole: 0.47 of the MACs at width 1):
    the candidates with the stream pruned compete, and halving the duplicated stream, which
    loses nothing, is chosen over narrowing c2, which loses the information of its channels;
    `--no-prune-residual` keeps the stream whole and deviates."""
    model = _duplicated_stream()
    path = save_tmp(model)
    data = graphs.random_input(model, 128)
    options = {"method": "id", "data": data, "round_to": 1, "target_macs": 0.6, "verify": False}
    result = onnxprune.prune(path, **options)
    shapes = _weight_shapes(result.model)
    assert shapes["c1"][0] == shapes["c3"][0] == shapes["c4"][1] == 4 and shapes["c2"][0] == 6
    held_out = graphs.random_input(model, 16, seed=1)
    assert_outputs_close(path, result.model, held_out, atol=1e-4)
    target = result.report.target
    assert not target.missed and target.allocation.endswith("residual streams pruned")
    assert target.deviations[target.allocation] == min(target.deviations.values()) < 1e-4
    assert any("residual streams pruned: they deviated least" in n for n in result.report.notes)
    whole = onnxprune.prune(path, prune_residual=False, **options)
    assert _weight_shapes(whole.model)["c1"][0] == 8 and not whole.report.target.missed
    assert max(whole.report.target.deviations.values()) > 1e-2
    assert not any("residual streams pruned" in n for n in whole.report.notes)


@pytest.mark.parametrize("seed", range(4))
def test_clearly_less_is_the_paired_t_statistic_above_the_evidence(seed):
    """`clearly_less(a, b, e)` is: the paired t statistic of b − a exceeds e (scipy's)."""
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(seed)
    b = rng.random(40)
    for shift in (0.0, 0.02, 0.05, 0.1, 0.3):
        a = b - shift + 0.1 * rng.standard_normal(40)
        t = ttest_rel(b, a).statistic
        for evidence in (0.5, 2.0, 4.0):
            assert clearly_less(a, b, evidence) is bool(t > evidence)
    assert not clearly_less(np.zeros(1), np.ones(1))  # one sample: no evidence
    assert clearly_less(np.zeros(5), np.ones(5))  # less on every sample by the same amount
