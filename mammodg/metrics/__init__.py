"""Evaluation metrics (numpy only): WLL / image, ROC / AUC, operating points, bootstrap CIs and ΔAUC."""
from mammodg.metrics.classification import (
    DEFAULT_THRESHOLDS,
    auc,
    bootstrap_auc,
    bootstrap_delta_auc,
    classification_report,
    downsample_curve,
    operating_points,
    roc,
    weighted_log_loss,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "weighted_log_loss",
    "auc",
    "roc",
    "operating_points",
    "bootstrap_auc",
    "bootstrap_delta_auc",
    "classification_report",
    "downsample_curve",
]
