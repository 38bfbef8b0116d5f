"""Output-Jacobian-weighted input statistics for elimination–compensation (METHODS.md §2).

For a linear layer z = W a + b inside f, removing weight w_ij and shifting b_i by δ changes the
output by g_i(x)(δ − w_ij a_j) to first order, with g_i = ∂f/∂z_i. Everything the closed forms need
is, per layer, G_{n,i} = ‖∂f/∂z_i(x_n)‖² and three sums over samples:

    S0_i = Σ_n G_{n,i},   S1_ij = Σ_n G_{n,i} a_{n,j},   S2_ij = Σ_n G_{n,i} a_{n,j}²

G comes from the ONNX→torch interpreter: exactly (one backward per output component) or as an
unbiased estimate from N Gaussian probes r (E[(rᵀJ)²] = ‖J‖²). Per channel, Conv consumers use
per-sample position means of a and G summed over positions (exact for 1×1 maps, an approximation
otherwise); per weight, every Conv output position is a sample with its input patch as features.
With `joint`, also M = Σ_n J_nᵀJ_n and T = Σ_n J_nᵀJ_n ⊗ a_n for the exact joint bias solve.
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
from onnxprune.graph.sparsify import WeightLayer
from onnxprune.options import parse_jacobian

EXACT_LIMIT = 4096  # output components per sample for --jacobian exact


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
class JointStats:
    """What the exact joint bias solve M δ = c needs (METHODS.md §2.4), with J_n = ∂f/∂b (m, out):

    M = Σ_n J_nᵀJ_n (out, out) and T = Σ_n J_nᵀJ_n ⊗ a_n (out, out, *features), so that for
    removed weights R (out, *features) the right-hand side is c_i = Σ_kf T_ikf R_kf.
    """

    m: np.ndarray
    t: np.ndarray


@dataclass(frozen=True)
class SiteStats:
    """S0 (n_out,), S1 and S2 (n_out, *features), the plain feature mean (*features), and the
    joint statistics when asked for. Per channel, features are (channels, features per channel)."""

    s0: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    mean: np.ndarray
    joint: JointStats | None = None


def collect_jacobian_stats(
    model: onnx.ModelProto,
    sites: Sequence[Site],
    batches: Iterable[Batch],
    *,
    jacobian: str = "exact",
    joint: bool = False,
    seed: int = 0,
) -> dict[Site, SiteStats]:
    """Sum S0, S1, S2 and the feature means of every site (and M, T with `joint`) over batches."""
    sums: dict = {}
    axes = {s.z: s.z_axis for s in sites}
    inputs = {s.a.tensor for s in sites}
    for values, energy, bias in _passes(model, axes, inputs, batches, jacobian, joint, seed):
        for site in sites:
            a = _features(values[site.a.tensor].detach().numpy(), site)
            g = energy[site.z].sum(axis=1)
            _accumulate(sums, site, g[:, None], a.reshape(len(a), 1, -1), bias.get(site.z))
    return {s: _finish(v, (len(v[0]), s.channels, -1)) for s, v in sums.items()}


def collect_weight_stats(
    model: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    batches: Iterable[Batch],
    *,
    jacobian: str = "exact",
    joint: bool = False,
    seed: int = 0,
) -> dict[str, SiteStats]:
    """Per weight layer: S0 (out,), S1 and S2 in the weight's (out, in, …) shape, the input mean.

    Dense layers are exact; Conv treats every output position as a sample, with the input patch
    (im2col) as its features, and ignores the coupling of positions through the Jacobian.
    """
    sums: dict = {}
    axes = {layer.output: layer.out_axis for layer in layers}
    inputs = {layer.input for layer in layers}
    for values, energy, bias in _passes(model, axes, inputs, batches, jacobian, joint, seed):
        for layer in layers:
            a = _patches(values[layer.input].detach(), layer)
            _accumulate(sums, layer.name, energy[layer.output], a, bias.get(layer.output))
    shapes = {layer.name: layer.shape for layer in layers}
    return {name: _finish(v, shapes[name]) for name, v in sums.items()}


def _passes(model, axes, inputs, batches, jacobian, joint, seed):
    """Per batch: the kept values, G as (samples, positions, out) per z, and with `joint` the
    per-sample J_nᵀJ_n (samples, out, out) of the bias Jacobian (z summed over positions)."""
    kind, probes = parse_jacobian(jacobian)
    rng = np.random.default_rng(seed)
    graph, zs = None, sorted(axes)
    for batch in batches:
        graph = graph or checked_graph(model, batch)
        values = graph.run(batch.feeds, keep=sorted(set(zs) | set(inputs)))
        energy = {z: np.zeros(_positions(values[z].detach().numpy(), axes[z]).shape) for z in zs}
        bias: dict[str, np.ndarray] = {}
        for scale, grads in backward_passes(values, graph.output_names, zs, kind, probes, rng):
            for z, grad in grads.items():
                per = _positions(grad, axes[z])
                energy[z] += scale * per**2
                if joint:
                    b = per.sum(axis=1)
                    bias[z] = bias.get(z, 0.0) + scale * np.einsum("ni,nk->nik", b, b)
        yield values, energy, bias


def backward_passes(values, outputs, names, kind, probes, rng):
    """Yield (weight, {z name: ∂⟨r, f⟩/∂z}) per backward pass: r = e_k for every output
    component k (exact, weight 1) or N Gaussian probes (weight 1/N), so that the weighted sum
    of gradient products over the passes is (an unbiased estimate of) JᵀJ. f is every float
    output with the samples on its axis 0, flattened side by side (a detector head's levels).

    Exact is refused above EXACT_LIMIT components per sample: a sentence encoder's token states
    (64 × 384) would take 24,576 backward passes per batch, hours where probes take seconds."""
    import torch

    first = values[outputs[0]]
    differentiable = [
        values[n].reshape(len(first), -1)
        for n in outputs
        if values[n].is_floating_point() and values[n].dim() and len(values[n]) == len(first)
    ]
    flat = torch.cat(differentiable, dim=1)
    if kind == "exact" and flat.shape[1] > EXACT_LIMIT:
        raise UsageError(
            f"--jacobian exact needs one backward pass per output component, {flat.shape[1]} "
            f"for the outputs (limit {EXACT_LIMIT}); use --jacobian probe:N, e.g. probe:32"
        )
    tensors = [values[n] for n in names]
    count = flat.shape[1] if kind == "exact" else probes
    for index in range(count):
        if kind == "exact":
            objective = flat[:, index].sum()
        else:
            probe = torch.as_tensor(rng.standard_normal(tuple(flat.shape)), dtype=flat.dtype)
            objective = (flat * probe).sum()
        grads = torch.autograd.grad(objective, tensors, retain_graph=True, allow_unused=True)
        found = {
            name: grad.detach().numpy().astype(np.float64)
            for name, grad in zip(names, grads, strict=True)
            if grad is not None
        }
        yield (1.0 if kind == "exact" else 1.0 / probes), found


def _positions(array: np.ndarray, axis: int) -> np.ndarray:
    """(samples, positions, units): the unit axis last, every other non-sample axis flattened."""
    moved = np.moveaxis(np.asarray(array, dtype=np.float64), axis, -1)
    return moved.reshape(moved.shape[0], -1, moved.shape[-1])


def _patches(tensor, layer: WeightLayer) -> np.ndarray:
    """(samples, positions, features) the layer multiplies by its weight: the input vector of a
    dense layer, the im2col patch (in, kh, kw flattened) of a Conv at every output position."""
    import torch

    if layer.conv is None:
        return _positions(tensor.numpy(), tensor.dim() - 1)
    kernel, strides, pads, dilations = layer.conv
    padded = torch.nn.functional.pad(tensor, (pads[1], pads[3], pads[0], pads[2]))
    cols = torch.nn.functional.unfold(padded, kernel, dilation=dilations, stride=strides)
    return np.moveaxis(cols.numpy().astype(np.float64), 1, 2)


def _features(array: np.ndarray, site: Site) -> np.ndarray:
    """(samples, channels, features): flattened features kept apart, other positions averaged."""
    view = channel_view(array, site.a, site.channels)  # (samples, positions, channels)
    n, positions, channels = view.shape
    spatial = site.a.spatial
    if spatial > 1 and positions % spatial == 0:
        view = view.reshape(n, positions // spatial, spatial, channels).mean(axis=1)
        return np.moveaxis(view, 1, 2).astype(np.float64)
    return view.mean(axis=1)[:, :, None].astype(np.float64)


def _accumulate(sums: dict, key, g: np.ndarray, a: np.ndarray, h: np.ndarray | None) -> None:
    """Add one batch: g (samples, positions, out), a (samples, positions, features)."""
    s1 = np.einsum("npi,npf->if", g, a)
    s2 = np.einsum("npi,npf->if", g, a * a)
    fresh = [g.sum(axis=(0, 1)), s1, s2, a.sum(axis=(0, 1)), a.shape[0] * a.shape[1]]
    if h is not None:
        fresh += [h.sum(axis=0), np.einsum("nik,nf->ikf", h, a.mean(axis=1))]
    current = sums.get(key)
    sums[key] = fresh if current is None else [c + f for c, f in zip(current, fresh, strict=True)]


def _finish(sums: list, shape: tuple[int, ...]) -> SiteStats:
    """SiteStats from the summed terms, S1 and S2 reshaped to `shape` = (out, *features)."""
    s0, s1, s2, total, count = sums[:5]
    s1 = s1.reshape(shape)
    mean = (total / max(count, 1)).reshape(s1.shape[1:])
    joint = JointStats(sums[5], sums[6].reshape(len(s0), *s1.shape)) if len(sums) > 5 else None
    return SiteStats(s0, s1, s2.reshape(s1.shape), mean, joint)
