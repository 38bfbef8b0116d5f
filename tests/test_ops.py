"""Channel rules for real architectures (graph/ops.py), each on a minimal graph.

Every rule is checked the same way: ratio 0 reproduces the original, and a pruned model runs in
ONNX Runtime and equals a numpy reference of what the pruning should do (the original with the
removed channels' readers zeroed, or a brute-force recomputation), with the rewritten constants
(group, split sizes, slice bounds, shapes) asserted where they change.
"""

from __future__ import annotations

import graphs
import numpy as np
import onnx
from conftest import assert_outputs_close
from test_rewrite import zero_removed_inputs

import onnxprune
from onnxprune.graph.analyze import analyze
from onnxprune.graph.load import normalize


def _groups(model: onnx.ModelProto) -> dict:
    return {g.name: g for g in analyze(normalize(model))}


def _initializer(model: onnx.ModelProto, node: str, index: int) -> np.ndarray:
    """The constant input `index` of node `node` in `model`."""
    name = next(n for n in model.graph.node if n.name == node).input[index]
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _attr(model: onnx.ModelProto, node: str, attr: str) -> object:
    proto = next(n for n in model.graph.node if n.name == node)
    return onnx.helper.get_attribute_value(next(a for a in proto.attribute if a.name == attr))


def _prune_exact(model: onnx.ModelProto, ratio: float = 0.5, **options: object):
    """Prune with `ratio`; the result must equal the original with removed readers zeroed."""
    result = onnxprune.prune(model, ratio=ratio, round_to=1, prune_residual=True, **options)
    reference = zero_removed_inputs(normalize(model), result.groups, result.plans)
    assert_outputs_close(reference, result.model, graphs.random_input(model, 8), atol=1e-5)
    return result


# --- grouped convolutions outside any pruned group -----------------------------------------------


def resnext_block() -> onnx.ModelProto:
    """c0(8) → relu → c1(8) → relu → g (3×3, group 2) → relu → c3(8) → relu → c4(4) → y."""
    b = graphs.Builder(40)
    h = b.relu("r0", b.conv("c0", "x", 3, 8))
    h = b.relu("r1", b.conv("c1", h, 8, 8, 1))
    h = b.relu("rg", b.conv("g", h, 8, 8, group=2))
    h = b.relu("r3", b.conv("c3", h, 8, 8, 1))
    return b.model([b.conv("c4", h, 8, 4)])


def test_grouped_conv_outside_pruned_groups_keeps_group_and_weights():
    model = resnext_block()
    exact = onnxprune.prune(model, ratio=0.0, round_to=1)
    assert_outputs_close(model, exact.model, graphs.random_input(model, 8), atol=1e-5)
    result = _prune_exact(model)
    assert {"c0", "c3"} <= set(result.plans)
    assert _attr(result.model, "g", "group") == 2
    np.testing.assert_array_equal(_initializer(result.model, "g", 1), _initializer(model, "g", 1))
    assert _initializer(result.model, "c0", 1).shape[0] == 4
