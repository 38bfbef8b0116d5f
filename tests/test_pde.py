"""The diffusion–sorption data of models/pde.py: solver against the analytic solution, the
committed splits regenerate exactly, and the committed regressors fit them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODELS, run_model
from scipy.special import erfc

from models import pde


def test_without_sorption_the_solver_matches_the_analytic_erfc_front():
    """k = 0, no initial bump: u = erfc(x / 2√(Dt)) while the front is far from x = 1."""
    params = np.array([[0.05, 0.0, 1.0, 0.0, 0.5]])
    u = pde.solve(params)[0]
    x = np.linspace(0, 1, pde.GRID)
    for t, values in ((pde.T_END / 2, u[: pde.GRID]), (pde.T_END, u[pde.GRID :])):
        np.testing.assert_allclose(values, erfc(x / (2 * np.sqrt(0.05 * t))), atol=0.03)


def test_sorption_retards_the_front():
    free, sorbing = pde.solve(np.array([[0.2, 0.0, 0.7, 0.0, 0.5], [0.2, 2.0, 0.7, 0.0, 0.5]]))
    assert np.all(sorbing[1:] <= free[1:] + 1e-9) and sorbing[40] < 0.5 * free[40]


def test_committed_splits_regenerate_exactly():
    data = pde.dataset()
    for split in ("calib", "test"):
        with np.load(MODELS / "diffsorp" / f"pde_{split}.npz") as saved:
            np.testing.assert_array_equal(saved["input"], data[split][0])
            np.testing.assert_array_equal(saved["labels"], data[split][1])
    assert not {r.tobytes() for r in data["calib"][0]} & {r.tobytes() for r in data["test"][0]}


@pytest.mark.parametrize("level", pde.NOISE)
def test_committed_regressors_fit_the_clean_test_split(level):
    path = MODELS / "diffsorp" / f"pde_mlp_n{level}.onnx"
    assert path.stat().st_size < 1024 * 1024
    with np.load(MODELS / "diffsorp" / "pde_test.npz") as test:
        out = run_model(path, {"input": test["input"]})["output"]
        mse, variance = np.mean((out - test["labels"]) ** 2), test["labels"].var()
    assert mse < 0.01 * variance
