"""A diffusion–sorption-like 1-D PDE dataset and MLP regressors on it (``python -m models.pde``).

The equation (after PDEBench's diffusion–sorption problem, simplified and dimensionless):

    ∂u/∂t = D / R(u) · ∂²u/∂x²,   R(u) = 1 + k·n·(u + ε)^(n − 1)   (Freundlich retardation)

on x ∈ [0, 1] with u(0, t) = 1 (a source at the left), zero flux at x = 1, and an initial bump
u(x, 0) = a·exp(−((x − c)/0.1)²). Inputs are the five parameters (D, k, n, a, c), standardised;
outputs are the solution on 32 grid points at t = T/2 and t = T (64 values). An explicit finite-
difference solver (stable step dt ≤ 0.4·dx²/D) computes every sample; everything is seeded.

One MLP (5 → 64 → 64 → 64, ReLU) is trained per noise level 0, 1 % and 5 %: Gaussian noise of that
fraction of the targets' standard deviation is added to the training targets only, and the
calibration and test targets stay clean. Files written to ``models/diffsorp/`` (apart from the
digits models, which other tests glob): ``pde_mlp_n{0,1,5}.onnx`` (legacy exporter, opset 17,
input ``input``, output ``output``), ``pde_calib.npz`` and ``pde_test.npz`` (keys ``input``,
``labels``; 512 and 500 samples, disjoint from each other and from training).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from models.build import export_legacy, seed_everything

OUT_DIR = Path(__file__).resolve().parent / "diffsorp"  # apart from the digits models
GRID, T_END, EPS = 32, 0.1, 1e-3
RANGES = {"D": (0.05, 0.5), "k": (0.0, 2.0), "n": (0.5, 1.0), "a": (0.0, 1.0), "c": (0.2, 0.8)}
SIZES = {"train": 2000, "calib": 512, "test": 500}
NOISE = (0, 1, 5)  # percent of the targets' standard deviation
SEED = 0


def solve(params: np.ndarray) -> np.ndarray:
    """Solutions (samples, 2·GRID) at T/2 and T for parameter rows (D, k, n, a, c)."""
    d, k, n, a, c = (params[:, i : i + 1] for i in range(5))
    x = np.linspace(0.0, 1.0, GRID)[None]
    dx = x[0, 1]
    steps = int(np.ceil(T_END / (0.4 * dx**2 / RANGES["D"][1])))
    dt = T_END / steps
    u = a * np.exp(-(((x - c) / 0.1) ** 2))
    u[:, 0] = 1.0
    snapshots = []
    for step in range(1, steps + 1):
        padded = np.concatenate([u[:, :1], u, u[:, -2:-1]], axis=1)  # mirror: zero flux at x=1
        laplace = (padded[:, 2:] - 2 * u + padded[:, :-2]) / dx**2
        retardation = 1.0 + k * n * (np.maximum(u, 0.0) + EPS) ** (n - 1.0)
        u = u + dt * d / retardation * laplace
        u[:, 0] = 1.0
        if step in (steps // 2, steps):
            snapshots.append(u.copy())
    return np.concatenate(snapshots, axis=1)


def sample(count: int, rng: np.random.Generator) -> np.ndarray:
    """Parameter rows drawn uniformly from RANGES."""
    low, high = (np.array([r[i] for r in RANGES.values()]) for i in (0, 1))
    return low + (high - low) * rng.random((count, len(RANGES)))


def dataset() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Standardised inputs and clean solutions per split (train statistics for the scaling)."""
    rng = np.random.default_rng(SEED)
    raw = {name: sample(size, rng) for name, size in SIZES.items()}
    mean, std = raw["train"].mean(axis=0), raw["train"].std(axis=0)
    return {
        name: (((p - mean) / std).astype(np.float32), solve(p).astype(np.float32))
        for name, p in raw.items()
    }


def noisy(targets: np.ndarray, percent: float, seed: int = SEED) -> np.ndarray:
    """Targets plus Gaussian noise of `percent` % of their standard deviation (seeded)."""
    rng = np.random.default_rng(seed + 1000 + int(percent))
    noise = rng.standard_normal(targets.shape) * (percent / 100.0) * targets.std()
    return (targets + noise).astype(np.float32)


def regressor() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2 * GRID)
    )


def train(x: np.ndarray, y: np.ndarray, *, epochs: int = 400, batch: int = 100) -> nn.Module:
    """Adam with cosine decay on mean squared error; seeded and deterministic on CPU."""
    seed_everything(SEED)
    model = regressor()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        for index in torch.randperm(len(xs), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.mse_loss(model(xs[index]), ys[index]).backward()
            opt.step()
        sched.step()
    return model.eval()


def export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The reference models' legacy export (opset 17, dynamic batch), output renamed `output`."""
    export_legacy(model, example, path)
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        node.output[:] = ["output" if o == "logits" else o for o in node.output]
    proto.graph.output[0].name = "output"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(proto, str(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    OUT_DIR.mkdir(exist_ok=True)
    data = dataset()
    for split in ("calib", "test"):
        x, y = data[split]
        np.savez_compressed(OUT_DIR / f"pde_{split}.npz", input=x, labels=y)
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    for level in NOISE:
        model = train(x_train, noisy(y_train, level), epochs=args.epochs)
        path = OUT_DIR / f"pde_mlp_n{level}.onnx"
        export(model, torch.from_numpy(x_test[:2]), path)
        with torch.no_grad():
            mse = float(
                nn.functional.mse_loss(model(torch.from_numpy(x_test)), torch.from_numpy(y_test))
            )
        print(f"{path.name}: test MSE {mse:.3g} (target variance {y_test.var():.3g})")


if __name__ == "__main__":
    main()
