"""Positive retrieval in a batch of contrastive pairs (the contrastive stage's validation accuracy)."""
from __future__ import annotations

import numpy as np


def _candidates(n: int, groups=None) -> np.ndarray:
    """(2N, 2N) bools: which embeddings each anchor's retrieval ranks: all others but those of its group
    (``groups`` (N,) ids, as NT-Xent's), its positive always kept."""
    pos = (np.arange(2 * n) + n) % (2 * n)
    ok = ~np.eye(2 * n, dtype=bool)
    if groups is not None:
        g = np.concatenate([np.asarray(groups).ravel()] * 2)
        ok &= g[:, None] != g[None, :]
        ok[np.arange(2 * n), pos] = True
    return ok


def positive_top1_hits(z1: np.ndarray, z2: np.ndarray, groups=None) -> np.ndarray:
    """For each of the 2N embeddings of N positive pairs (``z1[i]``, ``z2[i]``): is its most cosine-similar
    other embedding its positive? (2N,) bools, ``z1``'s first. With ``groups`` the other embeddings of the
    anchor's group (the other breast of the patient) are not candidates, as they are not negatives."""
    n = len(z1)
    flat = np.concatenate([z1, z2])
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    sim = np.where(_candidates(n, groups), flat @ flat.T, -np.inf)
    return sim.argmax(1) == (np.arange(2 * n) + n) % (2 * n)


def positive_top1_chance(n: int, groups=None) -> np.ndarray:
    """(2N,) chance of :func:`positive_top1_hits` per anchor for embeddings that carry no information:
    1 / its number of candidates (2N - 1 less the masked same-group ones)."""
    return 1.0 / _candidates(n, groups).sum(axis=1)
