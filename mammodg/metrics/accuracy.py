"""Accuracy per domain (data segment) with seen / unseen averages and bootstrap CIs (MSVCL v2, Table III).

The bootstrap resamples each domain's samples with replacement, independently per domain (a stratified
bootstrap: each domain keeps its size). For a 0/1 "correct" variable the number of correct samples in a
resample of n from a set with k correct is exactly Binomial(n, k / n), so the resampled accuracies are drawn
from that distribution (no index arrays; the same distribution as resampling indices). The seen / unseen
averages are the unweighted means of their domains' accuracies (every domain counts once, as a table
averaging vendors does), their CIs the percentiles of the same means over the resamples.

Beside each accuracy: the majority-class rate, the accuracy of always answering the evaluated set's most
frequent class (the best constant answer in hindsight: a model must beat it to have learnt anything).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from mammodg.metrics.bootstrap import _ci
from mammodg.metrics.classification import none_if_nan


def majority_rate(y_true) -> float:
    """Share of the most frequent label (nan for an empty set)."""
    y = np.asarray(y_true).ravel()
    return float(np.unique(y, return_counts=True)[1].max() / y.size) if y.size else float("nan")


def accuracy_report(y_true, y_pred, segments, seen: Iterable[str] = (), *, n_boot: int = 2000, seed=0,
                    level: float = 0.95) -> dict:
    """Accuracy globally, per domain, and averaged over the ``seen`` and the other (unseen) domains, each with
    a ``level`` percentile bootstrap CI and the majority-class rate. JSON-serialisable (nan -> None)."""
    y, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    segs = np.asarray(segments).astype(str).ravel()
    if not (y.size == p.size == segs.size):
        raise ValueError(f"accuracy_report: {y.size} labels, {p.size} predictions, {segs.size} segments")
    rng = np.random.default_rng(seed)
    seen = {str(s) for s in seen}
    correct = y == p
    domains, boots = {}, {}
    for s in sorted(np.unique(segs)):
        m = segs == s
        acc = float(correct[m].mean())
        boots[s] = rng.binomial(int(m.sum()), acc, size=n_boot) / m.sum()
        lo, hi = _ci(boots[s], level)
        domains[s] = {"n": int(m.sum()), "accuracy": acc, "ci_low": lo, "ci_high": hi,
                      "majority_rate": majority_rate(y[m]), "seen": s in seen}

    def average(names):
        if not names:
            return None
        est = float(np.mean([domains[s]["accuracy"] for s in names]))
        lo, hi = _ci(np.mean([boots[s] for s in names], axis=0), level)
        return {"domains": names, "accuracy": est, "ci_low": lo, "ci_high": hi,
                "majority_rate": float(np.mean([domains[s]["majority_rate"] for s in names]))}

    acc = float(correct.mean()) if y.size else float("nan")
    lo, hi = _ci(rng.binomial(y.size, acc, size=n_boot) / y.size, level) if y.size else (float("nan"),) * 2
    out = {"n": int(y.size), "n_boot": n_boot, "level": level,
           "global": {"accuracy": acc, "ci_low": lo, "ci_high": hi, "majority_rate": majority_rate(y)},
           "domains": domains,
           "seen_average": average([s for s in domains if domains[s]["seen"]]),
           "unseen_average": average([s for s in domains if not domains[s]["seen"]])}
    return _clean(out)


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return none_if_nan(x) if isinstance(x, float) else x


def format_accuracy_table(report: dict, title: str) -> str:
    """Markdown: one row per domain, then the seen / unseen averages and the global accuracy."""
    def cell(v):
        return "n/a" if v is None else f"{v:.3f}"

    def row(name, r, n=""):
        return (f"| {name} | {n} | {cell(r['accuracy'])} | [{cell(r['ci_low'])}, {cell(r['ci_high'])}] "
                f"| {cell(r['majority_rate'])} |")

    lines = [f"# {title}", "", f"Accuracy with {round(100 * report['level'])} % bootstrap CIs ({report['n_boot']} "
             "resamples, per domain); majority: the rate of the most frequent class.", "",
             "| domain | n | accuracy | CI | majority |", "|---|---|---|---|---|"]
    for name, r in report["domains"].items():
        lines.append(row(f"{name} ({'seen' if r['seen'] else 'unseen'})", r, r["n"]))
    for key in ("seen_average", "unseen_average"):
        if report[key]:
            lines.append(row(f"**{key.replace('_', ' ')}** ({len(report[key]['domains'])} domains)", report[key]))
    lines.append(row("**all samples**", report["global"], report["n"]))
    return "\n".join(lines) + "\n"
