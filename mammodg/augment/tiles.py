"""Deterministic encoder inputs of a whole image for evaluation: breast tiles at the training scale."""
from __future__ import annotations

import math

import numpy as np

from mammodg.augment.crops import crop_input


def evaluation_tiles(stored: np.ndarray, *, input_size, crop_scale, target_mean: float, pair_size=None,
                     min_breast: float = 0.5) -> np.ndarray:
    """Encoder inputs (k, *input_size, 1) of one stored image (h, w): the image resized to ``pair_size``
    (when given), cut into an even grid of square-fraction tiles of the mean training-crop area
    (``sqrt(mean(crop_scale))`` of each side), each resized to ``input_size`` as in
    :func:`mammodg.augment.augment` (no rotation, flip or jitter). Tiles less than ``min_breast`` inside
    the breast are dropped (the most-breast tile is always kept)."""
    import tensorflow as tf

    from mammodg.preprocess.breast import resize_stored

    if pair_size:
        stored = resize_stored(stored, *pair_size)
    h, w = stored.shape
    side = math.sqrt(float(np.mean(crop_scale)))
    starts = np.linspace(0.0, 1.0 - side, math.ceil(1.0 / side - 1e-6))
    boxes = [(y, x, y + side, x + side) for y in starts for x in starts]
    inside = stored > 0
    frac = np.array([inside[round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)].mean() for y0, x0, y1, x1 in boxes])
    keep = np.flatnonzero(frac >= min_breast) if (frac >= min_breast).any() else [int(frac.argmax())]
    return crop_input(tf.constant(stored[..., None], tf.float32), tf.constant([boxes[i] for i in keep], tf.float32),
                      input_size=input_size, target_mean=target_mean).numpy()
