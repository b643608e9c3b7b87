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


def top1_above_chance_p(hits, chance) -> float:
    """One-sided p-value that top-1 ``hits`` (one bool per anchor) are no better than chance: P(X >= hits)
    for X the number of hits of anchors that each hit with their own ``chance`` (a Poisson binomial, the
    exact binomial when the chances are equal), summed exactly over the distribution of X."""
    hits, chance = np.asarray(hits, bool).ravel(), np.asarray(chance, float).ravel()
    if hits.shape != chance.shape:
        raise ValueError(f"hits {hits.shape} and chance {chance.shape} differ in shape")
    dist = np.ones(1)  # P(X = k) over the anchors seen so far
    for p in chance:
        dist = np.concatenate([dist * (1 - p), [0.0]]) + np.concatenate([[0.0], dist * p])
    return float(min(1.0, dist[int(hits.sum()):].sum()))
