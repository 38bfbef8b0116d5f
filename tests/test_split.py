"""Held-out verification: the split is disjoint, seeded and honest, and the fit never sees it."""

from __future__ import annotations

import graphs
import numpy as np
import pytest
from conftest import run_model

import onnxprune
from onnxprune.calib.data import Dataset
from onnxprune.calib.split import MIN_HELD_OUT, split_for_verification


def _data(n: int, *, synthetic: bool = False) -> Dataset:
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    return Dataset({"x": x}, labels=np.arange(n) % 10, synthetic=synthetic, source="d")


@pytest.mark.parametrize("n, samples, held", [(512, 64, 64), (200, 64, 25), (1000, 10, 10)])
def test_held_out_samples_are_disjoint_from_the_fit_and_cover_the_data(n, samples, held):
    split = split_for_verification(_data(n), share=0.125, samples=samples, seed=3, fitted=True)
    index = split.held_out
    assert len(index) == held == len(split.verify) and len(split.fit) == n - held
    fit_rows = split.fit.arrays["x"][:, 0].astype(int)  # each sample's value is its index
    verify_rows = split.verify.arrays["x"][:, 0].astype(int)
    np.testing.assert_array_equal(verify_rows, index)
    assert not set(fit_rows) & set(verify_rows)
    assert sorted([*fit_rows, *verify_rows]) == list(range(n))
    np.testing.assert_array_equal(split.fit.labels, fit_rows % 10)  # labels follow their samples
    assert split.independent and f"{held} of {n}" in split.how


def test_the_split_is_seeded():
    def held(seed: int) -> np.ndarray:
        return split_for_verification(
            _data(256), share=0.125, samples=64, seed=seed, fitted=True
        ).held_out

    np.testing.assert_array_equal(held(0), held(0))
    assert not np.array_equal(held(0), held(1))


@pytest.mark.parametrize(
    "data, share, says",
    [
        (_data(8 * MIN_HELD_OUT - 1), 0.125, "too few"),
        (_data(512), 0.0, "holdout 0"),
        (_data(512, synthetic=True), 0.125, "synthetic"),
    ],
)
def test_without_a_split_verification_is_marked_as_not_independent(data, share, says):
    split = split_for_verification(data, share=share, samples=64, seed=0, fitted=True)
    assert split.held_out is None and split.fit is data and not split.independent
    assert says in split.how and "optimistic" in split.how
    np.testing.assert_array_equal(split.verify.arrays["x"], data.arrays["x"][:64])
    unfitted = split_for_verification(data, share=share, samples=64, seed=0, fitted=False)
    assert unfitted.independent and "fitted nothing" in unfitted.how


def test_separate_verification_data_leaves_all_calibration_samples_to_the_fit():
    data, other = _data(512), _data(300)
    split = split_for_verification(data, share=0.125, samples=64, seed=0, fitted=True,
                                   verify_data=other)  # fmt: skip
    assert split.fit is data and split.independent and len(split.verify) == 64
    assert "separate verification data" in split.how


# --- the fit never sees the held-out samples ---------------------------------------------------


def _low_rank_on_the_fit_part(n: int = 64) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Inputs whose fit part lies on a 2-D plane and whose held-out part is generic."""
    model_in = 10
    held = split_for_verification(_data(n), share=0.125, samples=64, seed=0, fitted=True).held_out
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, 2)) @ rng.standard_normal((2, model_in))
    x[held] = 2 * rng.standard_normal((len(held), model_in))
    return {"x": x.astype(np.float32)}, held


def _rel_l2(model, reference, feeds) -> float:
    got, ref = run_model(model, feeds), run_model(reference, feeds)
    return float(
        np.sqrt(sum(np.sum((got[k] - v) ** 2) for k, v in ref.items()))
        / np.sqrt(sum(np.sum(v**2) for v in ref.values()))
    )


def test_the_correction_is_fitted_on_the_fit_part_only():
    """fc1's 16 outputs are affine in x, so on the fit part (x on a plane) two kept channels plus
    an intercept reconstruct all 16 exactly: fitted on the fit part alone, ID is exact there.
    Had the 8 generic held-out samples entered the statistics, the least-squares trade-off
    would leave a clear error on the fit part too, as holdout=0 shows."""
    b = graphs.Builder(5)
    model = b.model([b.gemm("fc2", b.gemm("fc1", "x", 10, 16), 16, 3)], shape=("N", 10))
    feeds, held = _low_rank_on_the_fit_part()
    fit = {"x": np.delete(feeds["x"], held, axis=0)}
    options = dict(method="id", compensate="bias", ratio=14 / 16, round_to=1, data=feeds)
    result = onnxprune.prune(model, **options)
    assert result.plans["fc1"].keep.size == 2
    assert _rel_l2(result.model, model, fit) < 1e-4
    held_out = _rel_l2(result.model, model, {"x": feeds["x"][held]})
    assert held_out > 0.05
    assert result.report.verification.rel_l2 == pytest.approx(held_out, rel=1e-5)
    assert result.report.verification.independent
    on_all = onnxprune.prune(model, holdout=0, **options)
    assert _rel_l2(on_all.model, model, fit) > 1e-2
