"""The stored 16-bit pixel encoding of the records, in one place (numpy and TensorFlow forms).

A stored image is uint16: 0 outside the breast mask, ``1 + round(v * 65534)`` inside, where ``v`` in
[0, 1] is the pixel renormalised over the mask (:mod:`mammodg.preprocess.breast`). Records stay integer
and exact; the model input is made from them when they are read (:func:`mammodg.records.schema.model_input`).
"""
from __future__ import annotations

import numpy as np

STORED_MAX = 65535  # value of v = 1 inside the mask; 0 means "outside the mask"
_STEPS = float(STORED_MAX - 1)  # levels between v = 0 (stored 1) and v = 1 (stored STORED_MAX)


def to_stored(v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[0, 1] values + mask -> the stored uint16 encoding (0 outside, 1 + round(v * 65534) inside)."""
    return np.where(mask, 1 + np.round(np.clip(v, 0, 1) * _STEPS), 0).astype(np.uint16)


def from_stored(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored encoding -> (v float32 in [0, 1], 0 outside; mask bool)."""
    mask = stored > 0
    return np.where(mask, (stored.astype(np.float32) - 1) / _STEPS, 0).astype(np.float32), mask


def to_stored_tf(values, mask):
    """Graph form of :func:`to_stored` (same rounding: half to even): float values + bool mask -> uint16."""
    import tensorflow as tf

    v = 1.0 + tf.round(tf.clip_by_value(values, 0.0, 1.0) * _STEPS)
    return tf.cast(tf.where(mask, v, 0.0), tf.uint16)


def unit_values_tf(stored, fill=0.0):
    """Graph form of :func:`from_stored`'s values: stored -> float32 ``v`` in [0, 1] inside, ``fill`` outside."""
    import tensorflow as tf

    x = tf.cast(stored, tf.float32)
    return tf.where(x > 0, (x - 1.0) / _STEPS, fill)
