"""Inference of a classifier over evaluation batches (shared by stage validation and ``mammodg evaluate``)."""
from __future__ import annotations

import numpy as np


def class_probabilities(model, batches, max_batches: int = 0):
    """Softmax of ``model``'s logits over ``(x, label, data segment)`` batches (the first ``max_batches``
    when not 0), in inference mode: (probabilities (n, k), labels (n,), segments (n,) str)."""
    import keras

    probs, ys, segs = [], [], []
    for i, (x, y, seg) in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        probs.append(keras.ops.convert_to_numpy(keras.ops.softmax(model(x, training=False), axis=-1)))
        ys.append(keras.ops.convert_to_numpy(y))
        segs.append(np.array([s.decode() for s in np.asarray(seg)]))
    return np.concatenate(probs), np.concatenate(ys), np.concatenate(segs)
