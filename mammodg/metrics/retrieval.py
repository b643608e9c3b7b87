"""Positive retrieval in a batch of contrastive pairs (the contrastive stage's validation accuracy)."""
from __future__ import annotations

import numpy as np


def positive_top1_hits(z1: np.ndarray, z2: np.ndarray) -> np.ndarray:
    """For each of the 2N embeddings of N positive pairs (``z1[i]``, ``z2[i]``): is its most cosine-similar
    other embedding its positive? (2N,) bools, ``z1``'s first."""
    n = len(z1)
    flat = np.concatenate([z1, z2])
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    sim = flat @ flat.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1) == (np.arange(2 * n) + n) % (2 * n)
