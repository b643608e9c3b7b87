"""Evaluation metrics (numpy only): WLL / image, ROC / AUC, operating points, bootstrap CIs and ΔAUC,
positive retrieval of contrastive pairs."""
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
from mammodg.metrics.retrieval import positive_top1_hits

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
    "positive_top1_hits",
]
