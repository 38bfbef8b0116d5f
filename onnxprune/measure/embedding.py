"""Scores for sentence-embedding models: how well a pruned encoder keeps the original's geometry.

An encoder's first output holds token states (samples, sequence, hidden); a sentence embedding
is their mean over the real tokens (`attention_mask` = 1), as sentence-transformers pools. Three
scores compare the pruned model's embeddings with the original's on the same sentences:

- `cosine`: mean over sentences of the cosine between the two embeddings of one sentence;
- `retrieval`: nearest-neighbour agreement — the share of sentences whose most similar other
  sentence (cosine) is the same under both models, what a search index built on the pruned
  model would return;
- `spearman`: Spearman's rank correlation of all pairwise cosine similarities, the quantity
  semantic-similarity benchmarks score.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onnxprune.errors import DataError

MASK = "attention_mask"  # the input name Hugging Face exports give the padding mask


@dataclass(frozen=True)
class EmbeddingScores:
    """Mean cosine, nearest-neighbour agreement and Spearman ρ of pairwise similarities."""

    cosine: float
    retrieval: float
    spearman: float


def embedding_scores(
    reference: np.ndarray, got: np.ndarray, mask: np.ndarray | None = None
) -> EmbeddingScores:
    """Compare token states `got` with `reference` (both (N, S, H)) after mean pooling over
    `mask` (N, S; all tokens when None), or already pooled (N, H) embeddings (`mask` None)."""
    ref, new = _pooled(reference, mask), _pooled(got, mask)
    if len(ref) < 3:
        raise DataError(f"embedding scores need at least 3 sentences, got {len(ref)}")
    ref_sim, new_sim = cosine_matrix(ref), cosine_matrix(new)
    return EmbeddingScores(
        cosine=float(np.mean(_row_cosines(ref, new))),
        retrieval=nearest_neighbour_agreement(ref_sim, new_sim),
        spearman=pairwise_spearman(ref_sim, new_sim),
    )


def token_state_mask(output: np.ndarray, feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The padding mask when `output` is token states of the sentences in `feeds`: a 3-D float
    output and an `attention_mask` input of its first two dims; None otherwise (so a detector's
    3-D output is never read as token states)."""
    mask = feeds.get(MASK)
    if output.ndim != 3 or not np.issubdtype(output.dtype, np.floating) or mask is None:
        return None
    return mask if mask.shape == output.shape[:2] else None


def mean_pool(states: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean of the token states over the tokens whose mask is nonzero (float64, (N, H)).

    A sentence with no real token pools to zeros, as sentence-transformers' clamp leaves it.
    """
    states = states.astype(np.float64)
    if mask is None:
        return states.mean(axis=1)
    weights = (mask != 0).astype(np.float64)
    return np.einsum("nsh,ns->nh", states, weights) / np.maximum(weights.sum(1), 1.0)[:, None]


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities of the rows (a zero row has similarity 0 to everything)."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def nearest_neighbour_agreement(ref_sim: np.ndarray, got_sim: np.ndarray) -> float:
    """Share of rows whose most similar other row is the same in both similarity matrices."""
    return float(np.mean(_nearest(ref_sim) == _nearest(got_sim)))


def pairwise_spearman(ref_sim: np.ndarray, got_sim: np.ndarray) -> float:
    """Spearman ρ between the off-diagonal pair similarities of the two matrices."""
    from scipy.stats import spearmanr

    upper = np.triu_indices(len(ref_sim), k=1)
    return float(spearmanr(ref_sim[upper], got_sim[upper]).statistic)


def _pooled(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if array.ndim == 2 and mask is None:
        return array.astype(np.float64)
    if array.ndim != 3:
        raise DataError(f"token states must be (samples, sequence, hidden); got {array.shape}")
    return mean_pool(array, mask)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("nh,nh->n", a, b) / np.where(norms > 0, norms, 1.0)


def _nearest(similarity: np.ndarray) -> np.ndarray:
    """Index of each row's most similar other row (itself excluded)."""
    masked = similarity.copy()
    np.fill_diagonal(masked, -np.inf)
    return masked.argmax(axis=1)
