"""Image-level classification metrics of the periodic-sampling paper (section 3.1.2, "Metrics").

Everything here is plain numpy (no TensorFlow, no scikit-learn at run time), so it can be used from a
training loop, a notebook or an evaluation script alike.

* :func:`weighted_log_loss` -- "Weighted Logloss per image" (WLL / image): cross-entropy with sample
  weights estimated on the evaluated set so that every class weighs equally (binary, or multi-class
  for the 5 patch classes of appendix A.3).
* :func:`auc`, :func:`roc`, :func:`operating_points` -- ROC curve, its area and the operating points
  (OPs) at fixed probability thresholds (the paper uses 0.2, 0.4, 0.6, 0.8).
* :func:`bootstrap_auc`, :func:`bootstrap_delta_auc` -- AUC and paired difference of AUC between two
  models with 95 % percentile confidence intervals from Efron bootstraps (2000 resamples, uniform
  sampling with replacement over the evaluated set) and a bootstrap p-value
  (in :mod:`mammodg.metrics.bootstrap`, re-exported here).
* :func:`classification_report` -- all of the above, globally and per data segment (DS), as a
  JSON-serialisable dict (``nan`` is written as ``None``, :func:`none_if_nan`).

Labels are binary: 0 = benign / negative, 1 = malignant / positive (bool arrays are accepted).
Scores are probabilities of malignancy (any real score works for the AUC / ROC functions).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "DEFAULT_THRESHOLDS",
    "none_if_nan",
    "weighted_log_loss",
    "auc",
    "roc",
    "operating_points",
    "bootstrap_auc",
    "bootstrap_delta_auc",
    "classification_report",
    "downsample_curve",
]

DEFAULT_THRESHOLDS = (0.2, 0.4, 0.6, 0.8)

# --------------------------------------------------------------------------------------------- inputs
def _labels(y_true) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        y = y.reshape(-1)
    if y.dtype == bool:
        return y.astype(np.int64)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"labels must be binary 0/1, got values such as {bad.tolist()}")
    return y.astype(np.int64)


def _scores(scores, n: int, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size != n:
        raise ValueError(f"{name} has {s.size} values but y_true has {n}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


def none_if_nan(x) -> float | None:
    """A Python float, or None for None, NaN and infinities (JSON has neither; an undefined metric is null)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------- log loss
def weighted_log_loss(y_true, p, eps: float = 1e-7) -> float:
    """Weighted Logloss per image (WLL / image): class-balanced cross-entropy.

    Binary (``p`` of shape (n,): probabilities of class 1): ``l_i = -[y_i log p_i + (1 - y_i) log(1 - p_i)]``
    with ``p`` clipped to ``[eps, 1 - eps]``. Multi-class (``p`` of shape (n, k), rows of class
    probabilities, labels in 0..k-1): ``l_i = -log p_i[y_i]`` with the probability clipped to ``[eps, 1]``.
    The losses are averaged with the sample weights ``w_i = N / (C N_{y_i})`` estimated on the evaluated
    set itself (``N_c`` samples of class ``c``, ``C`` classes present)::

        WLL = sum_i w_i l_i / sum_i w_i = mean over present classes c of (mean_{y=c} l)

    insensitive to the label proportions of the set. The binary case equals
    ``sklearn.metrics.log_loss(y, p, sample_weight=compute_sample_weight("balanced", y))``.
    A set of a single class gives that class's plain mean log loss. Raises ``ValueError`` on an empty set.
    """
    probs = np.asarray(p, dtype=np.float64)
    if probs.ndim == 2:
        y = np.asarray(y_true).reshape(-1)
        if y.size != len(probs):
            raise ValueError(f"p has {len(probs)} rows but y_true has {y.size} labels")
        if y.size and not np.isin(y, np.arange(probs.shape[1])).all():
            raise ValueError(f"labels must be class indices 0..{probs.shape[1] - 1} for {probs.shape[1]} columns of p")
        if not np.isfinite(probs).all():
            raise ValueError("p contains NaN or infinite values")
        y = y.astype(np.int64)
        losses = -np.log(np.clip(probs[np.arange(y.size), y], eps, 1.0))
    else:
        y = _labels(y_true)
        q = np.clip(_scores(p, y.size, "p"), eps, 1.0 - eps)
        losses = np.where(y == 1, -np.log(q), -np.log1p(-q))
    if y.size == 0:
        raise ValueError("weighted_log_loss of an empty set")
    return float(np.mean([losses[y == c].mean() for c in np.unique(y)]))


# ------------------------------------------------------------------------------------------- ROC / AUC
def auc(y_true, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties count 1/2).

    Returns ``nan`` when the set does not contain both classes (the AUC is undefined).
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    # mid-ranks (1-based) with ties averaged
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ends = np.r_[starts[1:], ss.size]  # exclusive
    mid = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(mid, ends - starts)
    u = ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def roc(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: ``(fpr, tpr, thresholds)``, thresholds decreasing.

    Point ``k`` is obtained by predicting positive when ``score >= thresholds[k]``; one point per
    distinct score plus a first point ``(0, 0)`` at threshold ``+inf`` (same convention as
    ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``). When a class is missing, the
    corresponding rate is undefined and filled with ``nan``.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    order = np.argsort(-s, kind="mergesort")
    ss, yy = s[order], y[order]
    last = np.r_[np.flatnonzero(ss[1:] != ss[:-1]), ss.size - 1]  # last index of each tie group
    tps = np.r_[0, np.cumsum(yy)[last]]
    fps = np.r_[0, (last + 1) - tps[1:]]
    n1, n0 = tps[-1], fps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / n1 if n1 else np.full(tps.shape, np.nan)
        fpr = fps / n0 if n0 else np.full(fps.shape, np.nan)
    thresholds = np.r_[np.inf, ss[last]]
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


def downsample_curve(fpr, tpr, max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Thin a ROC curve for storage/plotting while keeping its shape.

    Collinear intermediate points are dropped first (as sklearn's ``drop_intermediate``); if more than
    ``max_points`` remain, points are picked evenly along the curve's length in ``|dfpr| + |dtpr|``
    (so steep and flat parts are both resolved); first and last points are always kept.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if fpr.size <= 2 or not (np.isfinite(fpr).all() and np.isfinite(tpr).all()):
        return fpr, tpr
    keep = np.r_[True, np.logical_or(np.diff(fpr, 2) != 0, np.diff(tpr, 2) != 0), True]
    fpr, tpr = fpr[keep], tpr[keep]
    if fpr.size > max_points:
        s = np.r_[0.0, np.cumsum(np.abs(np.diff(fpr)) + np.abs(np.diff(tpr)))]
        idx = np.searchsorted(s, np.linspace(0.0, s[-1], max_points))
        idx = np.unique(np.clip(np.r_[0, idx, fpr.size - 1], 0, fpr.size - 1))
        fpr, tpr = fpr[idx], tpr[idx]
    return fpr, tpr


def operating_points(y_true, scores, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[dict]:
    """Operating points of the ROC curve at fixed thresholds (predict positive when ``score >= t``).

    Returns one dict per threshold: ``threshold``, ``fpr`` (= mean(score >= t | y = 0)),
    ``tpr`` (= mean(score >= t | y = 1)), ``specificity`` (= 1 - fpr) and ``sensitivity`` (= tpr).
    Rates of a missing class are ``nan``.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    pos, neg = s[y == 1], s[y == 0]
    out = []
    for t in thresholds:
        t = float(t)
        tpr = float((pos >= t).mean()) if pos.size else float("nan")
        fpr = float((neg >= t).mean()) if neg.size else float("nan")
        out.append({"threshold": t, "fpr": fpr, "tpr": tpr, "specificity": 1.0 - fpr, "sensitivity": tpr})
    return out


# ----------------------------------------------------------------------------------------- report
# after _labels, _scores and auc: mammodg.metrics.bootstrap uses them (the package imports this module first)
from mammodg.metrics.bootstrap import bootstrap_auc, bootstrap_delta_auc  # noqa: E402  (re-exported)


def _group_metrics(y: np.ndarray, s: np.ndarray, thresholds, n_boot: int, seed, max_roc_points: int) -> dict:
    n, n_pos = int(y.size), int(y.sum())
    out = {"n": n, "n_pos": n_pos, "n_neg": n - n_pos, "wll": none_if_nan(weighted_log_loss(y, s)),
           "auc": None, "auc_ci": None, "n_boot_used": 0, "operating_points": None, "roc": None, "note": None}
    ops = operating_points(y, s, thresholds)
    out["operating_points"] = [{k: none_if_nan(v) for k, v in op.items()} for op in ops]
    if n_pos == 0 or n_pos == n:
        missing = "positives" if n_pos == 0 else "negatives"
        out["note"] = f"no {missing}: AUC, ROC curve and {'TPR' if n_pos == 0 else 'FPR'} are undefined"
        return out
    b = bootstrap_auc(y, s, n_boot=n_boot, seed=seed)
    out["auc"] = none_if_nan(b["auc"])
    out["auc_ci"] = [none_if_nan(b["ci_low"]), none_if_nan(b["ci_high"])]
    out["n_boot_used"] = b["n_boot_used"]
    fpr, tpr, _ = roc(y, s)
    fpr, tpr = downsample_curve(fpr, tpr, max_roc_points)
    out["roc"] = {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr]}
    return out


def classification_report(y_true, scores, segments: Iterable | None = None, *,
                          thresholds: Sequence[float] = DEFAULT_THRESHOLDS, n_boot: int = 2000, seed=0,
                          max_roc_points: int = 400) -> dict:
    """Global and per-data-segment metrics, as a JSON-serialisable dict (``nan`` -> ``None``).

    ``segments``: one label per sample (e.g. ``"S1|VendorA"``), or ``None`` for the global group only.
    Returns::

        {"thresholds": [...], "n_boot": int, "seed": seed,
         "global": GROUP, "segments": {segment: GROUP, ...}}   # segments sorted by name

    where ``GROUP`` is ``{"n", "n_pos", "n_neg", "wll", "auc", "auc_ci": [low, high], "n_boot_used",
    "operating_points": [{"threshold", "fpr", "tpr", "specificity", "sensitivity"}, ...],
    "roc": {"fpr": [...], "tpr": [...]}, "note"}``. The ROC curve is thinned to at most
    ``max_roc_points`` points (:func:`downsample_curve`); operating points are exact.
    A group lacking a class has ``auc``, ``auc_ci`` and ``roc`` set to ``None`` and a ``note``.
    Every group is bootstrapped with the same ``seed``.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    if y.size == 0:
        raise ValueError("classification_report of an empty set")
    thresholds = [float(t) for t in thresholds]
    rep = {"thresholds": thresholds, "n_boot": int(n_boot), "seed": seed,
           "global": _group_metrics(y, s, thresholds, n_boot, seed, max_roc_points), "segments": {}}
    if segments is not None:
        seg = np.asarray([str(v) for v in segments]) if not isinstance(segments, np.ndarray) else segments.astype(str)
        seg = seg.reshape(-1)
        if seg.size != y.size:
            raise ValueError(f"segments has {seg.size} values but y_true has {y.size}")
        for name in np.unique(seg):
            m = seg == name
            rep["segments"][str(name)] = _group_metrics(y[m], s[m], thresholds, n_boot, seed, max_roc_points)
    return rep
