"""Output-Jacobian-weighted input statistics for elimination–compensation (METHODS.md §2).

For a linear layer z = W a + b inside f, removing weight w_ij and shifting b_i by δ changes the
output by g_i(x)(δ − w_ij a_j) to first order, with g_i = ∂f/∂z_i. Everything the closed forms need
is, per layer, G_{n,i} = ‖∂f/∂z_i(x_n)‖² and three sums over samples:

    S0_i = Σ_n G_{n,i},   S1_ij = Σ_n G_{n,i} a_{n,j},   S2_ij = Σ_n G_{n,i} a_{n,j}²

G comes from the ONNX→torch interpreter: exactly (one backward per output component) or as an
unbiased estimate from N Gaussian probes r (E[(rᵀJ)²] = ‖J‖²). Conv layers use per-sample
position means of a and G summed over positions (exact for 1×1 maps, an approximation otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.calib.data import Batch
from onnxprune.calib.grads import checked_graph
from onnxprune.calib.stats import channel_view
from onnxprune.errors import UsageError
from onnxprune.graph.groups import Tap


@dataclass(frozen=True)
class Site:
    """A linear layer: its output tensor z (channel axis `z_axis`) and the input features it reads.

    `a` is the input tap and `channels` the number of channels read there; each channel gives
    `a.spatial` features (Flatten→Gemm), otherwise one (position-averaged) feature.
    """

    z: str
    z_axis: int
    a: Tap
    channels: int


@dataclass(frozen=True)
class SiteStats:
    """S0 (n_out,), S1 and S2 (n_out, channels, features), and the plain feature mean."""

    s0: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    mean: np.ndarray


def parse_jacobian(text: str) -> tuple[str, int]:
    """'exact' → ("exact", 0); 'probe:N' → ("probe", N)."""
    if text == "exact":
        return "exact", 0
    kind, _, count = text.partition(":")
    if kind == "probe" and count.isdigit() and int(count) > 0:
        return "probe", int(count)
    raise UsageError(f"--jacobian expects 'exact' or 'probe:N'; got '{text}'")


def collect_jacobian_stats(
    model: onnx.ModelProto,
    sites: Sequence[Site],
    batches: Iterable[Batch],
    *,
    jacobian: str = "exact",
    seed: int = 0,
) -> dict[Site, SiteStats]:
    """Sum S0, S1, S2 and the feature means of every site over all batches."""
    kind, probes = parse_jacobian(jacobian)
    rng = np.random.default_rng(seed)
    graph, sums = None, {}
    for batch in batches:
        graph = graph or checked_graph(model, batch)
        names = sorted({s.z for s in sites} | {s.a.tensor for s in sites})
        values = graph.run(batch.feeds, keep=names)
        squared = _jacobian_energy(
            values, graph.output_names, sorted({s.z for s in sites}), kind, probes, rng
        )
        for site in sites:
            g = _per_unit(squared[site.z], site.z_axis)
            a = _features(values[site.a.tensor].detach().numpy(), site)
            _accumulate(sums, site, g, a)
    return {s: SiteStats(v[0], v[1], v[2], v[3] / max(v[4], 1)) for s, v in sums.items()}


def _jacobian_energy(values, outputs, names, kind, probes, rng) -> dict[str, np.ndarray]:
    """Σ over output components (exact) or probe average of (∂f/∂z)², per z element."""
    import torch

    output = values[outputs[0]]
    flat = output.reshape(output.shape[0], -1)
    tensors = [values[n] for n in names]
    energy = {n: np.zeros(tuple(values[n].shape)) for n in names}
    count = flat.shape[1] if kind == "exact" else probes
    for index in range(count):
        if kind == "exact":
            objective = flat[:, index].sum()
        else:
            probe = torch.as_tensor(rng.standard_normal(tuple(flat.shape)), dtype=flat.dtype)
            objective = (flat * probe).sum()
        grads = torch.autograd.grad(objective, tensors, retain_graph=True, allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            if grad is not None:
                energy[name] += grad.detach().numpy().astype(np.float64) ** 2 / (
                    1 if kind == "exact" else probes
                )
    return energy


def _per_unit(energy: np.ndarray, axis: int) -> np.ndarray:
    """G (samples, units): the energy summed over every position of each output unit."""
    moved = np.moveaxis(energy, axis, -1)
    return moved.reshape(moved.shape[0], -1, moved.shape[-1]).sum(axis=1)


def _features(array: np.ndarray, site: Site) -> np.ndarray:
    """(samples, channels, features): flattened features kept apart, other positions averaged."""
    view = channel_view(array, site.a, site.channels)  # (samples, positions, channels)
    n, positions, channels = view.shape
    spatial = site.a.spatial
    if spatial > 1 and positions % spatial == 0:
        view = view.reshape(n, positions // spatial, spatial, channels).mean(axis=1)
        return np.moveaxis(view, 1, 2).astype(np.float64)
    return view.mean(axis=1)[:, :, None].astype(np.float64)


def _accumulate(sums: dict, site: Site, g: np.ndarray, a: np.ndarray) -> None:
    s1 = np.einsum("ni,njf->ijf", g, a)
    s2 = np.einsum("ni,njf->ijf", g, a * a)
    current = sums.get(site)
    fresh = [g.sum(axis=0), s1, s2, a.sum(axis=0), a.shape[0]]
    sums[site] = fresh if current is None else [c + f for c, f in zip(current, fresh, strict=True)]
