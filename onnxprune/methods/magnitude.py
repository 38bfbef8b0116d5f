"""Data-free selection: filter norms or BatchNorm scales (magnitude) and a seeded random baseline.

The loader folds BatchNorm into the filters before any method runs (graph/load.py), which
multiplies each filter by γ/σ: the folded norm then mixes the filter's size with the scale the
network learned for the channel. `criterion` chooses what magnitude ranks
(docs/METHODS.md, "Magnitude criteria"; measured in docs/RESULTS.md):

- "folded": the norm of the BN-folded filter (also the only choice without BatchNorm);
- "raw": the norm of the filter before the fold;
- "gamma": |γ| of the folded BatchNorm (network slimming), the raw norm where a producer had none;
- "bn-scale": |γ|/σ, the factor the fold applied, the raw norm where a producer had none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.graph.external import drop_pages
from onnxprune.graph.groups import ChannelGroup
from onnxprune.methods.base import Selection
from onnxprune.plan import GroupStats


@dataclass(frozen=True)
class Magnitude(Selection):
    """Keep the channels with the largest filter norm or BatchNorm scale (`criterion`).

    Coupled groups sum the per-producer scores, so a channel is judged by all filters that write
    it; except for "folded", each producer's scores are first scaled to unit sum, so that a
    producer with a BatchNorm (scores |γ|) and one without (filter norms) count alike.
    """

    norm: int = 1
    criterion: str = "folded"
    name: str = "magnitude"
    needs: frozenset[str] = frozenset({"weights"})

    def scores(self, group: ChannelGroup, stats: GroupStats, *, seed: int = 0) -> np.ndarray:
        """The criterion of every channel of the group (higher: kept first)."""
        folds = stats.batchnorms or (None,) * len(stats.weights)
        per_producer = [self._producer(w, f) for w, f in zip(stats.weights, folds, strict=True)]
        if self.criterion != "folded":
            per_producer = [s / max(float(s.sum()), 1e-300) for s in per_producer]
        return np.asarray(sum(per_producer))

    def _producer(self, filters: np.ndarray, fold) -> np.ndarray:
        """One producer's scores; `fold` is its FoldedBatchNorm or None."""
        folded = row_norms(filters, self.norm)
        if self.criterion == "folded" or fold is None:
            return folded
        if self.criterion == "raw":
            return fold.raw_l1 if self.norm == 1 else fold.raw_l2
        if self.criterion == "gamma":
            return np.abs(fold.gamma)
        return np.abs(fold.gamma) / fold.sigma


def row_norms(rows: np.ndarray, order: int, block_bytes: int = 64 << 20) -> np.ndarray:
    """The float64 `order`-norm of every row of `rows`, computed a block of rows at a time:
    the same bits as `np.linalg.norm` of the whole float64 matrix (each row is reduced alone)
    with at most `block_bytes` of float64 alive, not a copy of all the filters; the pages of
    weights read through a memory map are released block by block."""
    out = np.empty(len(rows))
    step = max(1, block_bytes // (8 * max(1, rows.shape[1])))
    for lo in range(0, len(rows), step):
        block = np.asarray(rows[lo : lo + step], dtype=np.float64)
        out[lo : lo + step] = np.linalg.norm(block, ord=order, axis=1)
        drop_pages(rows[lo : lo + step])
    return out


@dataclass(frozen=True)
class Random(Selection):
    """Keep a seeded random subset: the floor every method must beat."""

    name: str = "random"
    needs: frozenset[str] = frozenset()

    def scores(self, group: ChannelGroup, stats: GroupStats, *, seed: int = 0) -> np.ndarray:
        """Seeded uniform scores, different per group."""
        salt = sum(group.name.encode())
        return np.random.default_rng([seed, salt]).random(group.channels)
