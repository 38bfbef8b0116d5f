"""Row masks (`--row-mask`): the tap statistics of padded batches with the mask equal those of
the unpadded token rows alone, and a prune on them does not read the padding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.budget import output_deviation
from onnxprune.calib.data import Dataset
from onnxprune.calib.gather import gather
from onnxprune.calib.row_mask import row_keep, row_mask_input
from onnxprune.calib.stats import collect_all
from onnxprune.config import PruneConfig
from onnxprune.errors import UsageError
from onnxprune.graph.analyze import analyze as find_groups
from onnxprune.graph.groups import Tap
from onnxprune.graph.load import normalize
from onnxprune.methods.id import InterpolativeDecomposition

C, H, T = 6, 16, 7  # features, hidden neurons, padded length


def token_mlp(mask_dtype: int = TensorProto.INT64) -> onnx.ModelProto:
    """x (N, T, C) → two hidden layers of H (MatMul + bias, Relu) → MatMul + bias: a token-wise
    MLP whose states at padding positions are computed like a transformer's (and never read by
    its pooled users); a second output, the mask as float, uses the mask input. Two hidden
    groups, so that the sequential refit of the second sees drift."""
    rng = np.random.default_rng(0)
    shapes = {"w1": (C, H), "b1": (H,), "w2": (H, H), "b2": (H,), "w3": (H, C), "b3": (C,)}
    inits = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in shapes.items()
    ]
    inits.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "axis"))
    nodes, x = [], "x"
    for i in (1, 2, 3):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}_bias"))
        if i < 3:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    nodes += [
        helper.make_node("Unsqueeze", ["attention_mask", "axis"], ["m3d"], name="unsq"),
        helper.make_node("Cast", ["m3d"], ["mf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Identity", ["h3"], ["out"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "token_mlp",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", C]),
            helper.make_tensor_value_info("attention_mask", mask_dtype, ["N", "T"]),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "T", C]),
            helper.make_tensor_value_info("mf", TensorProto.FLOAT, ["N", "T", 1]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def padded(n: int, seed: int, garbage: float = 50.0) -> tuple[dict[str, np.ndarray], list[int]]:
    """n sequences of 1..T real tokens padded to T; the padding features are large noise
    (seeded by `seed` + 1000, so that two calls differ only there)."""
    rng = np.random.default_rng(seed)
    lengths = [int(k) for k in rng.integers(1, T + 1, size=n)]
    x = rng.standard_normal((n, T, C)).astype(np.float32)
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    noise = np.random.default_rng(seed + 1000).standard_normal((n, T, C)) * garbage
    x = np.where(mask[..., None] == 1, x, noise.astype(np.float32))
    return {"x": x, "attention_mask": mask}, lengths


def _close(found: np.ndarray, expected: np.ndarray) -> None:
    scale = max(np.abs(expected).max(), 1.0)
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-6 * scale)


def test_masked_statistics_equal_those_of_the_unpadded_rows() -> None:
    """Tap statistics over padded batches with the mask == the same statistics summed over each
    sentence run alone at its own length (no padding), folds included."""
    model, tap = token_mlp(), Tap("h1", -1, 0)
    feeds, lengths = padded(10, seed=1)
    batches = [{k: v[:4] for k, v in feeds.items()}, {k: v[4:] for k, v in feeds.items()}]
    masked = collect_all(model, [(tap, H)], {}, batches, folded={tap}, row_mask="attention_mask")
    alone = [
        {"x": feeds["x"][i : i + 1, :k], "attention_mask": feeds["attention_mask"][i : i + 1, :k]}
        for i, k in enumerate(lengths)
    ]
    expected = collect_all(model, [(tap, H)], {}, alone, folded={tap})
    found, wanted = masked.stats[tap], expected.stats[tap]
    assert found.n == wanted.n == sum(lengths)
    for got, want in [(found, wanted), *zip(found.folds, wanted.folds, strict=True)]:
        assert got.n == want.n
        for name in ("sum", "abs_sum", "gram"):
            _close(getattr(got, name), getattr(want, name))
    unmasked = collect_all(model, [(tap, H)], {}, batches).stats[tap]
    assert unmasked.n == 10 * T  # without the mask every padded row counts


def test_row_keep_only_where_the_view_is_the_masks() -> None:
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    feeds = {"attention_mask": mask}
    keep = row_keep(np.zeros((2, 3, 5)), feeds, "attention_mask")
    np.testing.assert_array_equal(keep, [True, True, False, True, False, False])
    assert row_keep(np.zeros((2, 6, 5)), feeds, "attention_mask") is None  # not one row a token
    assert row_keep(np.zeros((2, 3, 5)), feeds, None) is None


def test_row_mask_input_auto_named_and_refused() -> None:
    model = token_mlp()
    assert row_mask_input(model, "auto") == "attention_mask"
    assert row_mask_input(model, None) is None
    assert row_mask_input(token_mlp(TensorProto.FLOAT), "auto") is None  # not an integer mask
    with pytest.raises(UsageError, match="not an input"):
        row_mask_input(model, "mask")
    with pytest.raises(UsageError, match="2-D"):
        row_mask_input(model, "x")


def _pruned(
    data: dict[str, np.ndarray], row_mask: str | None, sequential: bool, **width
) -> dict[str, np.ndarray]:
    width = width or {"ratio": 0.5}
    result = onnxprune.prune(token_mlp(), method="id", data=data, row_mask=row_mask, verify=False,
                             sequential=sequential, recalibrate=False, **width)  # fmt: skip
    return {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}


@pytest.mark.parametrize("sequential", [False, True])
def test_prune_with_the_mask_does_not_read_the_padding(sequential: bool) -> None:
    """Two calibration sets with the same real tokens and different padding: with the mask the
    pruned weights are the same, with the sequential refit too; without it they differ (the
    padding moves the fit)."""
    first, _ = padded(48, seed=3)
    second, _ = padded(48, seed=3, garbage=5.0)
    masked = [_pruned(data, "attention_mask", sequential) for data in (first, second)]
    assert masked[0].keys() == masked[1].keys()
    for name, value in masked[0].items():
        _close(masked[1][name], value)
    unmasked = [_pruned(data, None, sequential) for data in (first, second)]
    differ = [
        not np.allclose(unmasked[1][n], v, rtol=1e-3)
        for n, v in unmasked[0].items()
        if n in unmasked[1] and unmasked[1][n].shape == v.shape
    ]
    assert any(differ) or unmasked[0].keys() != unmasked[1].keys()


@pytest.mark.parametrize("row_mask", ["attention_mask", None])
def test_width_scores_with_the_mask_do_not_read_the_padding(row_mask: str | None) -> None:
    """`--target-macs` scores width candidates by output deviation: with the mask, on the real
    tokens' outputs only, so the same real tokens with other padding score the same; without
    it the padding's outputs count."""
    config = PruneConfig(method="id", row_mask=row_mask, recalibrate=False, sequential=False)
    method = InterpolativeDecomposition(intercept=True)
    scores = []
    for garbage in (50.0, 5.0):
        data, _ = padded(48, seed=5, garbage=garbage)
        graph = normalize(token_mlp())
        groups = find_groups(graph)
        counts = {g.name: g.channels // 2 for g in groups if g.prunable}
        dataset = Dataset(data)
        stats = gather(graph, groups, counts, frozenset({"gram"}), dataset, config).stats
        scores.append(output_deviation(graph, groups, stats, method, config, dataset)(counts))
    totals = [float(np.sum(s)) for s in scores]  # the squared relative L2 deviation
    assert totals[0] > 0
    if row_mask:
        scale = float(np.max(scores[0]))
        np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5, atol=1e-6 * scale)
    else:
        assert not np.isclose(totals[0], totals[1], rtol=1e-2)


def test_cli_row_mask_not_an_input(tmp_path) -> None:
    from onnxprune.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(token_mlp(), str(path))
    data, _ = padded(8, seed=4)
    np.savez(tmp_path / "d.npz", **data)
    before = path.read_bytes()
    code = main([str(path), "--method", "id", "--ratio", "0.5", "--data", str(tmp_path / "d.npz"),
                 "--row-mask", "mask", "-o", str(tmp_path / "out.onnx")])  # fmt: skip
    assert code != 0
    assert path.read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()
