"""The sampling pattern of periodic sampling (periodic-sampling paper, Algorithm 1).

Reading of the paper's ``pos <- linspace(0, N_min, n_i_min)``: the endpoint is excluded and positions
are floored, ``pos[j] = floor(j * N_min / n_i_min)``, so that all positions are valid slots and segment
``i`` is spread over the whole period (``numpy.linspace(0, N_min, n, endpoint=False)``). Segments are
placed in ascending order of ``n_min`` (ties by segment index); a taken slot moves the sample to the
next free slot, wrapping around to slot 0 past the end (the paper's ``p <- p + 1`` would otherwise run
off the array when the last slots are taken).

The direct slot-by-slot probe costs O(N_min x probe length); ``sampling_pattern`` gives the identical
array with vectorised rank/select queries on a bitset of taken slots, O(N_min log N_min) overall.
"""
from __future__ import annotations

import numpy as np

_WORD = 64


def _check(n_min) -> np.ndarray:
    n = np.asarray(n_min)
    if n.ndim != 1 or n.size == 0:
        raise ValueError("n_min must be a non-empty 1-D sequence of counts, one per data segment")
    if not np.issubdtype(n.dtype, np.integer):
        if not np.all(np.equal(np.mod(n, 1), 0)):
            raise ValueError(f"n_min must hold integer counts, got {n_min!r}")
        n = n.astype(np.int64)
    if (n < 0).any():
        raise ValueError(f"n_min must be >= 0, got {n.tolist()}")
    zero = np.flatnonzero(n == 0)
    if zero.size:
        raise ValueError(
            f"data segment(s) {zero.tolist()} have no sample of their rarest label (n_min = 0): periodic sampling "
            "cannot alternate labels there; drop those segments or merge them with another")
    return n.astype(np.int64)


def positions(n: int, total: int) -> np.ndarray:
    """Evenly spaced starting slots of a segment: floor(j * total / n), j = 0..n-1."""
    return (np.arange(n, dtype=np.int64) * total) // n


def sampling_pattern_reference(n_min) -> np.ndarray:
    """Algorithm 1 exactly as written, slot by slot (slow; the reference the tests compare with)."""
    n = _check(n_min)
    total = int(n.sum())
    s = np.full(total, -1, np.int64)
    for i in np.argsort(n, kind="stable"):
        for p in positions(int(n[i]), total):
            p = int(p)
            while s[p] != -1:
                p = (p + 1) % total
            s[p] = i
    return s


def _popcount(words: np.ndarray) -> np.ndarray:
    return np.bitwise_count(words).astype(np.int64)


def _select_zero_in_word(words: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Bit index of the k-th (0-based) zero bit of each 64-bit word, vectorised by halving."""
    free = ~words
    pos = np.zeros(len(words), np.uint64)
    k = k.astype(np.uint8)
    for width in (32, 16, 8, 4, 2, 1):
        low = np.bitwise_count((free >> pos) & np.uint64((1 << width) - 1))
        go_high = k >= low
        k -= np.where(go_high, low, np.uint8(0))
        pos += np.where(go_high, np.uint64(width), np.uint64(0))
    return pos.astype(np.int64)


def sampling_pattern(n_min) -> np.ndarray:
    """Sampling pattern S of length N_min = sum(n_min): segment i appears n_min[i] times, evenly spaced.

    Identical to :func:`sampling_pattern_reference`. Each segment's slots are found in the free-slot
    rank space: the j-th sample, wanting slot ``pos[j]``, gets the free slot of rank
    ``k_j = j + cummax(r - arange)_j`` where ``r_j`` is the number of free slots before ``pos[j]``; this
    is the sequential probe, including the pile-up of one segment's own samples. Samples pushed past
    the end take the lowest free ranks left (the wrap-around). Rank and select queries use a bitset of
    taken slots with per-word counts.
    """
    n = _check(n_min)
    total = int(n.sum())
    n_words = -(-total // _WORD)
    words = np.zeros(n_words, np.uint64)
    counts = np.zeros(n_words, np.int64)  # taken slots per word
    if total % _WORD:  # slots past the end are marked taken so they are never selected
        words[-1] = ~np.uint64((1 << (total % _WORD)) - 1)
        counts[-1] = _WORD - total % _WORD
    slots_through_word = np.arange(1, n_words + 1, dtype=np.int64) * _WORD  # int64: N_min may exceed 2**31
    out = np.empty(total, np.int64)
    taken_total = 0
    for i in np.argsort(n, kind="stable"):
        m = int(n[i])
        d = positions(m, total)
        taken_through = np.cumsum(counts)
        w = d // _WORD
        bit = (d % _WORD).astype(np.uint64)
        below = words[w] & ((np.uint64(1) << bit) - np.uint64(1))
        r = d - (taken_through[w] - counts[w] + _popcount(below))  # free slots before each wanted slot
        j = np.arange(m, dtype=np.int64)
        k = j + np.maximum.accumulate(r - j)
        over = k >= total - taken_total
        if over.any():
            inside = k[~over]
            n_over = int(over.sum())
            cand = np.arange(n_over + inside.size, dtype=np.int64)
            k = np.concatenate([inside, np.setdiff1d(cand, inside, assume_unique=True)[:n_over]])
        # select the k-th free slot; when nothing pushed a sample (k == r) and its wanted slot is free,
        # that slot is the answer (most samples while the pattern is sparse)
        direct = np.zeros(m, bool)
        direct[: len(r)] = (k[: len(r)] == r) & (((words[w] >> bit) & np.uint64(1)) == 0)
        slot = np.where(direct, d, 0)
        if not direct.all():
            kk = k[~direct]
            free_through = slots_through_word - taken_through
            word = np.searchsorted(free_through, kk, side="right")
            free_before = free_through[word] - (_WORD - counts[word])
            slot[~direct] = word * _WORD + _select_zero_in_word(words[word], kk - free_before)
        word = slot // _WORD
        out[slot] = i
        np.bitwise_or.at(words, word, np.uint64(1) << (slot % _WORD).astype(np.uint64))
        np.add.at(counts, word, 1)
        taken_total += m
    return out


def pattern_proportions(pattern: np.ndarray, n_segments: int) -> np.ndarray:
    return np.bincount(pattern, minlength=n_segments) / len(pattern)
