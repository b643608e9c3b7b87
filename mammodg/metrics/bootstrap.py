"""Efron bootstrap of the AUC and of the paired difference of AUC between two models (periodic-sampling
paper, section 3.1.2: 2000 resamples, uniform with replacement over the evaluated set, 95 % percentile CIs,
p-values), vectorised: one ``bincount`` per resample instead of a sort."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mammodg.metrics.classification import _labels, _scores, auc

__all__ = ["bootstrap_auc", "bootstrap_delta_auc"]

#: upper bound on the number of int64 cells a bootstrap chunk allocates (indices or counts): ~16 MiB each
_CHUNK_CELLS = 1 << 21


# ------------------------------------------------------------------------------ vectorised bootstrap
def _auc_keys(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, int]:
    """Bin key of every sample: ``rank of its distinct score + G * label`` (G = number of distinct scores)."""
    _, inv = np.unique(s, return_inverse=True)
    g = int(inv.max()) + 1 if inv.size else 0
    return inv.reshape(-1).astype(np.int64) + g * y, g


def _auc_rows(keys: np.ndarray, g: int, idx: np.ndarray) -> np.ndarray:
    """AUC of every resample ``idx[r]`` (rows of sample indices), vectorised over rows.

    Per row, a single ``bincount`` gives the multiplicity of each (label, distinct score) pair; the
    Mann-Whitney statistic with ties is then ``U = sum_v pos[v] * (neg[< v] + neg[v] / 2)`` computed
    with a cumulative sum over the sorted distinct scores. Work is O(rows * (n + G)), no per-row sort.
    Rows lacking a class give ``nan``.
    """
    b = idx.shape[0]
    if b == 0:
        return np.empty(0)
    flat = keys[idx] + (np.arange(b, dtype=np.int64) * (2 * g))[:, None]
    counts = np.bincount(flat.ravel(), minlength=b * 2 * g).reshape(b, 2, g)
    neg, pos = counts[:, 0], counts[:, 1]
    neg_below2 = 2 * (np.cumsum(neg, axis=1) - neg) + neg  # 2 * (#neg strictly below + #neg tied / 2)
    u2 = np.einsum("ij,ij->i", pos, neg_below2)  # 2 U, exact integers
    n1, n0 = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return u2 / (2.0 * n1 * n0)


def _auc_resamples(y_true, scores, idx) -> np.ndarray:
    """AUC of ``(y_true[idx[r]], scores[idx[r]])`` for every row ``r`` of ``idx`` (nan if one class)."""
    y = _labels(y_true)
    s = _scores(scores, y.size)
    idx = np.atleast_2d(np.asarray(idx, dtype=np.int64))
    keys, g = _auc_keys(y, s)
    return _auc_rows(keys, g, idx)


def _bootstrap_aucs(y: np.ndarray, score_list: Sequence[np.ndarray], n_boot: int, seed,
                    max_draw_factor: int = 20) -> tuple[np.ndarray, int]:
    """Paired bootstrap AUCs: ``(aucs[n_used, len(score_list)], n_redrawn)``.

    Every resample draws ``n`` indices uniformly with replacement (``np.random.default_rng(seed)``) and
    the *same* indices are used for every score vector. A resample with a single class (AUC undefined)
    is discarded and redrawn; ``n_redrawn`` counts them. Drawing stops after ``max_draw_factor * n_boot``
    resamples, so ``n_used < n_boot`` is possible only for tiny / extremely imbalanced sets.
    """
    n = y.size
    n1 = int(y.sum())
    k = len(score_list)
    if n1 == 0 or n1 == n or n_boot <= 0:
        return np.empty((0, k)), 0
    rng = np.random.default_rng(seed)
    keys = [_auc_keys(y, s) for s in score_list]
    width = max([n] + [2 * g for _, g in keys])
    chunk = max(1, _CHUNK_CELLS // width)
    parts, n_valid, n_drawn, n_redrawn = [], 0, 0, 0
    while n_valid < n_boot and n_drawn < max_draw_factor * n_boot:
        b = min(chunk, n_boot - n_valid)
        idx = rng.integers(0, n, size=(b, n))
        n_drawn += b
        aucs = np.stack([_auc_rows(kk, g, idx) for kk, g in keys], axis=1)
        ok = np.isfinite(aucs[:, 0])
        n_redrawn += int((~ok).sum())
        parts.append(aucs[ok])
        n_valid += int(ok.sum())
    return np.concatenate(parts, axis=0)[:n_boot], n_redrawn


def _ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [a, 100.0 - a])
    return float(lo), float(hi)


def _altman_bland_p(est: float, lo: float, hi: float) -> float:
    """P-value from a 95 % CI (Altman & Bland, BMJ 2011): SE = (hi - lo) / 3.92, z = |est| / SE,
    p = exp(-0.717 z - 0.416 z^2)."""
    if not all(np.isfinite([est, lo, hi])):
        return float("nan")
    se = (hi - lo) / (2 * 1.96)
    if se <= 0:
        return 1.0 if est == 0 else 0.0
    z = abs(est) / se
    return float(min(1.0, math.exp(-0.717 * z - 0.416 * z * z)))


def bootstrap_auc(y_true, scores, n_boot: int = 2000, seed=0) -> dict:
    """AUC with a 95 % percentile bootstrap CI.

    Returns ``{"auc", "ci_low", "ci_high", "n_boot_used", "n_redrawn"}``; ``auc`` is computed on the
    full set. Resampling as in :func:`bootstrap_delta_auc`. Everything is ``nan`` (and
    ``n_boot_used == 0``) when the set holds a single class.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    boots, n_redrawn = _bootstrap_aucs(y, [s], n_boot, seed)
    lo, hi = _ci(boots[:, 0])
    return {"auc": auc(y, s), "ci_low": lo, "ci_high": hi, "n_boot_used": int(boots.shape[0]),
            "n_redrawn": n_redrawn}


def bootstrap_delta_auc(y_true, scores_a, scores_b, n_boot: int = 2000, seed=0) -> dict:
    """Paired bootstrap comparison of the AUCs of two models evaluated on the same images.

    ``delta = auc_b - auc_a``: **positive means model b is better** (in the paper, a = baseline,
    b = compared method). ``auc_a``, ``auc_b`` and ``delta`` are point estimates on the full data.

    Bootstrap (Efron): ``n_boot`` resamples of size ``n`` drawn uniformly with replacement over the set
    with ``np.random.default_rng(seed)``; the same indices are used for a and b (paired). A resample
    containing a single class (AUC undefined) is discarded and redrawn; how many were redrawn is
    returned as ``n_redrawn`` and the number of valid resamples as ``n_boot_used`` (== ``n_boot``
    except for pathological tiny sets, see ``_bootstrap_aucs``).

    Returned keys:

    * ``auc_a``, ``auc_b``, ``delta``: point estimates;
    * ``ci_low``, ``ci_high``: 95 % percentile CI (2.5th / 97.5th percentiles, linear interpolation)
      of the bootstrapped ``delta*``;
    * ``p_value``: two-sided bootstrap p-value for ``delta = 0``:
      ``min(1, 2 * min(P(delta* <= 0), P(delta* >= 0)))``. Its resolution is ``1 / n_boot_used``;
      0 means "< 1 / n_boot_used". If every ``delta*`` is 0 (identical models) it is 1;
    * ``p_value_altman_bland``: p-value derived from the CI by Altman & Bland (2011),
      ``z = |delta| / ((ci_high - ci_low) / 3.92)``, ``p = exp(-0.717 z - 0.416 z^2)`` -- the
      p-values of the paper's tables are consistent with this formula;
    * ``auc_a_ci``, ``auc_b_ci``: 95 % percentile CIs ``(low, high)`` of each AUC;
    * ``n_boot_used``, ``n_redrawn``.

    With a single-class set every value is ``nan`` and ``n_boot_used == 0``.
    """
    y = _labels(y_true)
    sa = _scores(scores_a, y.size, "scores_a")
    sb = _scores(scores_b, y.size, "scores_b")
    boots, n_redrawn = _bootstrap_aucs(y, [sa, sb], n_boot, seed)
    auc_a, auc_b = auc(y, sa), auc(y, sb)
    delta = auc_b - auc_a
    d = boots[:, 1] - boots[:, 0]
    lo, hi = _ci(d)
    if d.size:
        p = min(1.0, 2.0 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    else:
        p = float("nan")
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "delta": delta,
        "ci_low": lo,
        "ci_high": hi,
        "p_value": p,
        "p_value_altman_bland": _altman_bland_p(delta, lo, hi),
        "auc_a_ci": _ci(boots[:, 0]),
        "auc_b_ci": _ci(boots[:, 1]),
        "n_boot_used": int(boots.shape[0]),
        "n_redrawn": n_redrawn,
    }
