"""A weight several nodes share leaves pruning shared wherever its copies came out equal."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from graphs import two_level_head

import onnxprune


def _data() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(8).standard_normal((32, 3, 8, 8)).astype(np.float32)}


def _read_by(model: onnx.ModelProto, *nodes: str) -> set[str]:
    return {n.input[1] for n in model.graph.node if n.name in nodes}


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_equal_copies_of_a_shared_weight_are_one_again():
    """By magnitude the levels' groups keep the same channels of the same weights, and nothing
    is folded into t: both levels read one pruned s and one pruned t."""
    model = two_level_head()
    result = onnxprune.prune(model, method="magnitude", ratio=0.5, data=_data(), round_to=1)
    assert len(_read_by(result.model, "s1", "s2")) == 1
    assert len(_read_by(result.model, "t1", "t2")) == 1
    assert not [n for n in result.report.notes if "separate copies" in n]
    weights = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    (s,), (t,) = _read_by(result.model, "s1", "s2"), _read_by(result.model, "t1", "t2")
    assert (weights[s], weights[t]) == ((4, 4, 3, 3), (4, 4, 1, 1))
    # c1: 4 of its 8 filters (3·9 weights and a bias each); s: 4 of 8 rows and input columns,
    # and 4 biases; t: 4 input columns: each once, not once per level
    removed = 4 * 28 + (8 * 8 - 4 * 4) * 9 + 4 + 4 * 4
    assert _params(result.model) == _params(model) - removed


def test_ratio_zero_with_the_defaults_keeps_the_model_as_it_was():
    """Nothing removed: no recalibration, maps of identity, every shared weight still one."""
    model = two_level_head()
    data = _data()
    result = onnxprune.prune(model, method="id", ratio=0.0, data=data)
    assert _params(result.model) == _params(model)
    assert len(_read_by(result.model, "s1", "s2")) == len(_read_by(result.model, "t1", "t2")) == 1
    sessions = [ort.InferenceSession(m.SerializeToString()) for m in (model, result.model)]
    want, got = (s.run(None, {"x": data["x"][:4]}) for s in sessions)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
