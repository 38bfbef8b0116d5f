"""TapAccumulator: the streamed sums equal those of all rows at once, however they arrive."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.calib.stats import TapAccumulator


def _direct(rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    rows = rows.astype(np.float64)
    return rows.shape[0], rows.sum(axis=0), np.abs(rows).sum(axis=0), rows.T @ rows


@pytest.mark.parametrize("per_add", [1, 3, 7, 40])  # rows per add: below and above channels/4
def test_sums_equal_those_of_all_rows(per_add: int) -> None:
    rng = np.random.default_rng(per_add)
    rows = (rng.standard_normal((83, 24)) + 0.5).astype(np.float32)
    acc = TapAccumulator(24, qr=True)
    for start in range(0, len(rows), per_add):
        acc.add(rows[start : start + per_add])
    stats = acc.result()
    n, total, absolute, gram = _direct(rows)
    assert stats.n == n
    scale = np.abs(gram).max()
    np.testing.assert_allclose(stats.sum, total, rtol=1e-12, atol=1e-12 * np.abs(total).max())
    np.testing.assert_allclose(stats.abs_sum, absolute, rtol=1e-12)
    np.testing.assert_allclose(stats.gram, gram, rtol=1e-12, atol=1e-12 * scale)
    r = stats.r_factor
    np.testing.assert_allclose(r.T @ r, gram, rtol=0, atol=1e-10 * scale)


def test_rows_held_between_updates_are_copies() -> None:
    """The run's arrays are reused or freed after a run: rows waiting for the next update must
    not change with them."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((2, 16)).astype(np.float32)  # 2 < 16/4: held, not yet summed
    expected = _direct(rows)
    acc = TapAccumulator(16)
    acc.add(rows)
    rows[:] = 0.0
    stats = acc.result()
    np.testing.assert_allclose(stats.gram, expected[3], rtol=1e-12)
    np.testing.assert_allclose(stats.sum, expected[1], rtol=1e-12)


def test_result_twice_and_more_rows_after() -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((10, 32)).astype(np.float32)
    acc = TapAccumulator(32)
    acc.add(rows[:3])
    first = acc.result()
    assert first.n == 3
    np.testing.assert_allclose(acc.result().gram, first.gram)
    acc.add(rows[3:])
    np.testing.assert_allclose(acc.result().gram, _direct(rows)[3], rtol=1e-12)
