"""The sampling pattern of periodic sampling (periodic-sampling paper, Algorithm 1).

Reading of the paper's ``pos <- linspace(0, N_min, n_i_min)``: the endpoint is excluded and positions
are floored, ``pos[j] = floor(j * N_min / n_i_min)``, so that all positions are valid slots and segment
``i`` is spread over the whole period (``numpy.linspace(0, N_min, n, endpoint=False)``). Segments are
placed in ascending order of ``n_min`` (ties by segment index); a taken slot moves the sample to the
next free slot, wrapping around to slot 0 past the end (the paper's ``p <- p + 1`` would otherwise run
off the array when the last slots are taken).

The direct slot-by-slot probe costs O(N_min x probe length); ``sampling_pattern`` gives the identical
array with one vectorised pass per segment (a bitset of taken slots while the pattern is sparse, the
sorted free slots once it is dense).
"""
from __future__ import annotations

import numpy as np


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
    s = np.full(total, -1, np.int32)
    for i in np.argsort(n, kind="stable"):
        for p in positions(int(n[i]), total):
            p = int(p)
            while s[p] != -1:
                p = (p + 1) % total
            s[p] = i
    return s


_ONE = np.uint64(1)
_FULL = ~np.uint64(0)
# switch from the bitset to the sorted free slots once fewer than _DENSE x (next segment) slots are free:
# from then on each segment costs O(free slots), and probes on the bitset would meet long taken runs
_DENSE = 32


def _trailing_zeros(y: np.ndarray) -> np.ndarray:
    """Number of trailing zero bits of each uint64 (64 for 0)."""
    return np.bitwise_count(~y & (y - _ONE))


class _Taken:
    """Bitset of taken slots, and a list of words that had a free slot when it was made (a superset of
    the open words, refreshed when it has gone stale)."""

    def __init__(self, total: int):
        self.words = np.zeros(-(-total // 64), np.uint64)
        if total % 64:  # slots past the end count as taken, so they are never chosen
            self.words[-1] = ~np.uint64((1 << (total % 64)) - 1)
        self.open = np.flatnonzero(self.words != _FULL)

    def next_free(self, x: np.ndarray) -> np.ndarray | None:
        """First free slot at or after each slot ``x``; None when one would wrap past the end."""
        w = x >> 6
        free_from_x = ~self.words[w] >> (x & 63).view(np.uint64)
        q = x + _trailing_zeros(free_from_x)
        miss = np.flatnonzero(free_from_x == 0)  # the rest of the word is taken: look in later words
        if miss.size == 0:
            return q
        w = w[miss] + 1
        if w.max() < len(self.words):  # most often the next word has a free slot
            y = ~self.words[w]
            q[miss] = (w << 6) + _trailing_zeros(y)
            keep = y == 0
            miss, w = miss[keep], w[keep]
            if miss.size == 0:
                return q
            w += 1
        for _ in range(2):
            at = np.searchsorted(self.open, w)
            for _ in range(4):
                if at.max() >= self.open.size:
                    break
                cand = self.open[at]
                full = self.words[cand] == _FULL
                if not full.any():
                    q[miss] = (cand << 6) + _trailing_zeros(~self.words[cand])
                    return q
                at += full
            self.open = np.flatnonzero(self.words != _FULL)
        return None

    def take(self, slots: np.ndarray) -> None:
        w = slots >> 6
        bits = _ONE << (slots & 63).view(np.uint64)
        if (w[1:] > w[:-1]).all():  # at most one new slot per word: a plain scatter
            self.words[w] |= bits
        else:
            np.bitwise_or.at(self.words, w, bits)


def _probe(taken: _Taken, d: np.ndarray, rounds: int = 16) -> np.ndarray | None:
    """Algorithm 1's probe for one segment on a sparse pattern: p_j = next_free(max(d_j, p_(j-1) + 1)).

    Starts from p_j = next_free(d_j) and moves every p_j that does not exceed p_(j-1) on, until the
    slots increase (each round only raises slots that are at most the exact ones, so the fixed point is
    the sequential probe). None when a probe wraps past the end or a pile-up needs more rounds.
    """
    q = taken.next_free(d)
    for _ in range(rounds):
        if q is None:
            return None
        bad = np.flatnonzero(q[1:] <= q[:-1]) + 1
        if bad.size == 0:
            return q
        moved = taken.next_free(q[bad - 1] + 1)
        if moved is None:
            return None
        q[bad] = moved
    return None


def _ranked(free: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Ranks in ``free`` (sorted free slots) that one segment's samples take.

    The j-th sample, wanting slot ``d[j]``, gets the free slot of rank ``k_j = j + cummax(r - j)_j``
    where ``r_j`` is the number of free slots before ``d[j]``: the sequential probe, including the
    pile-up of the segment's own samples. Samples pushed past the end take the lowest ranks left (the
    wrap-around).
    """
    r = np.searchsorted(free, d)
    j = np.arange(len(d), dtype=np.int64)
    k = j + np.maximum.accumulate(r - j)
    over = k >= len(free)
    if over.any():
        inside = k[~over]
        n_over = int(over.sum())
        cand = np.arange(n_over + inside.size, dtype=np.int64)
        k = np.concatenate([inside, np.setdiff1d(cand, inside, assume_unique=True)[:n_over]])
    return k


def sampling_pattern(n_min) -> np.ndarray:
    """Sampling pattern S of length N_min = sum(n_min): segment i appears n_min[i] times, evenly spaced.

    Identical to :func:`sampling_pattern_reference`. While the pattern is sparse, each segment probes a
    bitset of taken slots (:func:`_probe`); once few slots are left, the sorted list of free slots is
    kept and each segment takes ranks in it (:func:`_ranked`), which also resolves any probe that wraps.
    """
    n = _check(n_min)
    total = int(n.sum())
    out = np.full(total, -1, np.int32)
    taken = _Taken(total)
    free = None  # sorted free slots, once the pattern is dense
    left = total
    for i in np.argsort(n, kind="stable"):
        m = int(n[i])
        d = positions(m, total)
        if free is None and left <= _DENSE * m:
            free = np.flatnonzero(out < 0)
        if free is None:
            slot = _probe(taken, d)
            if slot is None:
                free_now = np.flatnonzero(out < 0)
                slot = free_now[_ranked(free_now, d)]
            taken.take(slot)
        else:
            k = _ranked(free, d)
            slot = free[k]
            free = np.delete(free, k)
        out[slot] = i
        left -= m
    return out


def pattern_proportions(pattern: np.ndarray, n_segments: int) -> np.ndarray:
    return np.bincount(pattern, minlength=n_segments) / len(pattern)
