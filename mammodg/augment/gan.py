"""CycleGAN inputs (MSVCL v2 section IV-B): stored images to [-1, 1], random breast crops, one style's batches.

Images are in [-1, 1]: ``2 v - 1`` inside the breast, -1 outside, as the generators' tanh output.
"""
from __future__ import annotations

import numpy as np


def to_unit_range(stored):
    """Stored uint16 image -> (float32 in [-1, 1], breast mask): ``2 v - 1`` inside the breast, -1 outside."""
    import tensorflow as tf

    from mammodg.preprocess.stored import unit_values_tf

    inside = stored > 0
    return tf.where(inside, unit_values_tf(stored) * 2.0 - 1.0, -1.0), inside


def breast_crop(stored, crop_size: int, seed):
    """A random ``crop_size`` square of a stored image, centred on a random breast pixel (clipped to the
    image, which is padded with -1 when smaller than the crop); ``seed`` is a stateless seed (2 ints)."""
    import tensorflow as tf

    from mammodg.augment.crops import breast_point

    img, _ = to_unit_range(stored)
    h0, w0 = tf.shape(img)[0], tf.shape(img)[1]
    centre = tf.cast(tf.round(breast_point(stored, seed) * tf.cast(tf.stack([h0, w0]), tf.float32)), tf.int32)
    img = tf.pad(img + 1.0, [[0, tf.maximum(crop_size - h0, 0)], [0, tf.maximum(crop_size - w0, 0)], [0, 0]]) - 1.0
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    top = tf.clip_by_value(centre[0] - crop_size // 2, 0, h - crop_size)
    left = tf.clip_by_value(centre[1] - crop_size // 2, 0, w - crop_size)
    return tf.ensure_shape(img[top:top + crop_size, left:left + crop_size], [crop_size, crop_size, 1])


def style_files(index: dict, data_dir, split: str, style: str) -> tuple[list[str], int]:
    """Shards and record count of one data segment (all labels) in a split."""
    from mammodg.records.reader import streams

    by_key = streams(index, data_dir, split)
    keys = sorted(k for k in by_key if k[0] == style)
    return [p for k in keys for p in by_key[k][0]], sum(by_key[k][1] for k in keys)


def style_batches(files: list[str], count: int, *, batch_size: int, crop_size: int, seed: int, start_step: int = 0,
                  shuffle_budget: int = 256):
    """Infinite, shuffled batches ``(batch_size, crop, crop, 1)`` in [-1, 1] of one style's shards (``count``
    records), from step ``start_step``; crop ``i`` of the stream is drawn with the stateless seed (seed, i)."""
    import tensorflow as tf

    from mammodg.records.schema import parse
    from mammodg.sampling.streams import Plan, serialized_stream

    plan = Plan(keys=[("style", "*")], files=[files], counts=[count], choices=np.zeros(1, np.int32))
    start = start_step * batch_size
    ds = serialized_stream(plan, seed=seed, start=start, shuffle_budget=max(2, shuffle_budget))
    ds = ds.enumerate(start).map(
        lambda i, raw: breast_crop(parse(raw)["image"], crop_size, tf.stack([tf.constant(seed, tf.int64), i])),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True)


def first_image(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The first record of ``files``: (image (h, w, 1) float32 in [0, 1], 0 outside the breast; mask (h, w, 1) bool)."""
    import tensorflow as tf

    from mammodg.records.schema import parse

    from mammodg.preprocess.stored import from_stored

    return from_stored(parse(next(iter(tf.data.TFRecordDataset(files[:1]))))["image"].numpy())
