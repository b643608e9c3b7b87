"""What the contrastive stage reports at each validation and at the end of a run: per pair type NT-Xent and
positive top-1 with its chance level (:func:`pair_scores`, :func:`format_scores`) and the verdict whether each
pair type learned, top-1 clearly above chance in the last validations (:func:`learning_summary`)."""
from __future__ import annotations

import numpy as np


def pair_scores(z: np.ndarray, groups, method: str, temperature: float) -> dict:
    """Per pair type of ``method`` (multi-style, multi-view, same-image): NT-Xent, positive top-1 and its
    chance level, each as (2N,) values per anchor, from projections ``z`` (N, views, d) of one batch and
    the samples' ``groups``. Same-group candidates other than the positive are masked in both."""
    from keras import ops

    from mammodg.augment import pair_types, positive_pairs
    from mammodg.losses import nt_xent_per_anchor
    from mammodg.metrics import positive_top1_chance, positive_top1_hits

    out = {}
    for (i, j), kind in zip(positive_pairs(method), pair_types(method)):
        out[kind] = {"nt_xent": ops.convert_to_numpy(nt_xent_per_anchor(z[:, i], z[:, j], temperature, groups)),
                     "top1": positive_top1_hits(z[:, i], z[:, j], groups).astype(float),
                     "top1_chance": positive_top1_chance(len(z), groups)}
    return out


def format_scores(scores: dict, method: str) -> str:
    """One line: NT-Xent and top-1 of each pair type, its chance level beside it."""
    from mammodg.augment import pair_types

    def p(kind):  # the binomial test of top-1 against chance (histories before it lack it)
        return f", {scores[f'{kind}_anchors']} anchors, p {scores[f'{kind}_top1_p']:.1e}" if f"{kind}_top1_p" in scores else ""

    return "  ".join(f"{kind}: NT-Xent {scores[f'{kind}_nt_xent']:.3f} top-1 {scores[f'{kind}_top1']:.3f} "
                     f"(chance {scores[f'{kind}_top1_chance']:.3f}{p(kind)})" for kind in pair_types(method))


CLEAR_P = 0.01  # "clearly above chance": one-sided test of the top-1 hits against chance below this


def learning_summary(history: list[dict], method: str, last: int = 2) -> str:
    """Whether each pair type's top-1 was clearly above chance (p < CLEAR_P) in each of the ``last``
    validations of ``history`` (history.json's entries): the end-of-run verdict."""
    from mammodg.augment import pair_types

    tail = [h["global"] for h in history[-last:]]
    if len(tail) < last or any(f"{kind}_top1_p" not in g for g in tail for kind in pair_types(method)):
        return f"top-1 vs chance: fewer than {last} validations with the binomial test"
    verdict = {kind: all(g[f"{kind}_top1_p"] < CLEAR_P for g in tail) for kind in pair_types(method)}
    return (f"top-1 clearly above chance (one-sided binomial p < {CLEAR_P}) in each of the last {last} validations: "
            + ", ".join(f"{kind} {'yes' if ok else 'NO'}" for kind, ok in verdict.items()))
