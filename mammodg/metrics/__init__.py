"""Evaluation metrics (numpy only): WLL / image, ROC / AUC, operating points, bootstrap CIs and ΔAUC
(:mod:`~mammodg.metrics.classification`, :mod:`~mammodg.metrics.bootstrap`), positive retrieval of contrastive pairs (:mod:`~mammodg.metrics.retrieval`)."""
from mammodg.metrics import classification
from mammodg.metrics.classification import (
    DEFAULT_THRESHOLDS,
    auc,
    bootstrap_auc,
    bootstrap_delta_auc,
    classification_report,
    downsample_curve,
    none_if_nan,
    operating_points,
    roc,
    weighted_log_loss,
)
from mammodg.metrics.retrieval import positive_top1_chance, positive_top1_hits, top1_above_chance_p

__all__ = [*classification.__all__, "positive_top1_chance", "positive_top1_hits", "top1_above_chance_p"]
