"""Random crops and augmentations of one stored-encoding image (MSVCL v2 section IV-B).

Every draw is stateless, from a seed of two integers, so the same seed gives the same crop eagerly, in
``tf.data.Dataset.map`` and in a resumed run.
"""
from __future__ import annotations

import math


def uniform(seed, shape=(), lo=0.0, hi=1.0):
    """Stateless uniform floats in [lo, hi)."""
    import tensorflow as tf

    return tf.random.stateless_uniform(shape, seed, lo, hi)


def randint(seed, n):
    """A stateless uniform integer in [0, max(n, 1))."""
    import tensorflow as tf

    return tf.random.stateless_uniform([], seed, 0, tf.maximum(n, 1), dtype=tf.int32)


def breast_point(stored, seed):
    """A random breast pixel (stored value >= 1) of a stored-encoding image (h, w, 1) as fractions (y, x)
    of its sides; anywhere when there is no breast. Every style of a view has the same mask, so one seed
    gives the same point in each."""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, 2)
    breast = tf.cast(tf.where(tf.cast(stored[..., 0], tf.float32) >= 1.0), tf.float32)
    return tf.cond(tf.shape(breast)[0] > 0,
                   lambda: tf.gather(breast, randint(s[0], tf.shape(breast)[0])) / tf.cast(tf.shape(stored)[:2], tf.float32),
                   lambda: uniform(s[1], (2,)))


def crop_box(stored, seed, *, crop_scale, rotation_deg, point=None, shift=1.0):
    """A random crop of a stored-encoding image (h, w, 1): box (y0, x0, y1, x1) as fractions of the sides
    (area in ``crop_scale``, aspect 3/4..4/3, kept inside the image) and its rotation in radians (within
    +/- ``rotation_deg``). Centred on a random breast pixel, or, given ``point``, placed at random among
    the crops of that size that contain it, its centre within +/- ``shift`` / 2 crop sides of the point
    (1: any crop that contains it)."""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, 5)
    area = uniform(s[1], (), *crop_scale)
    ratio = tf.clip_by_value(tf.exp(uniform(s[2], (), math.log(3 / 4), math.log(4 / 3))), area, 1 / area)  # crop fits
    size = tf.stack([tf.sqrt(area * ratio), tf.sqrt(area / ratio)])  # fractions of the image height and width
    if point is None:
        centre = breast_point(stored, s[3])
    else:  # the crop contains ``point`` (still so once shifted inside the image)
        centre = point + (uniform(s[4], (2,)) - 0.5) * size * shift
    y0, x0 = tf.unstack(tf.clip_by_value(centre - size / 2, 0.0, 1.0 - size))
    angle = uniform(s[0], (), -rotation_deg, rotation_deg) * math.pi / 180  # about the crop centre
    return tf.stack([y0, x0, y0 + size[0], x0 + size[1]]), angle


def crop_input(stored, boxes, *, input_size, target_mean, angles=None):
    """Model inputs (k, *input_size, 1) of a stored-encoding float image (h, w, 1): ``boxes`` (k, 4: y0, x0,
    y1, x1 as fractions of the sides, sampled like ``tf.image.crop_and_resize``) each rotated by ``angles``
    (k,) radians about its centre, in one bilinear resampling of the output pixels only. Outside the
    breast is the whole image's constant (:func:`mammodg.records.schema.outside_constant`): a crop's own
    would run far below 0 when the crop is nearly all breast."""
    import tensorflow as tf

    from mammodg.records.schema import model_input, outside_constant

    oh, ow = input_size
    h, w = tf.cast(tf.shape(stored)[0], tf.float32), tf.cast(tf.shape(stored)[1], tf.float32)
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    y0, x0, y1, x1 = tf.unstack(boxes, axis=1)
    angles = tf.zeros_like(y0) if angles is None else tf.convert_to_tensor(angles, tf.float32)
    sy, sx = (y1 - y0) * (h - 1) / max(oh - 1, 1), (x1 - x0) * (w - 1) / max(ow - 1, 1)  # input px per output px
    cy, cx = (y0 + y1) / 2 * (h - 1), (x0 + x1) / 2 * (w - 1)
    c, s = tf.cos(angles), tf.sin(angles)
    a0, a1, b0, b1 = c * sx, -s * sy, s * sx, c * sy  # output (x, y) -> input, about the box centre
    a2 = cx - a0 * (ow - 1) / 2 - a1 * (oh - 1) / 2
    b2 = cy - b0 * (ow - 1) / 2 - b1 * (oh - 1) / 2
    zero = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=1)
    k = tf.shape(boxes)[0]
    x = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.repeat(stored[None], k, axis=0), transforms=transforms, output_shape=[oh, ow], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")
    # interpolation blur across the breast edge stays outside
    return model_input(tf.where(x >= 1.0, x, 0.0), target_mean, fill=outside_constant(stored, target_mean))


def augment(stored, seed, *, input_size, crop_scale, rotation_deg, jitter, target_mean, point=None, shift=1.0):
    """Stored-encoding float image (h, w, 1) -> one augmented model input (*input_size, 1), section IV-B:
    :func:`crop_box` (containing ``point`` when given, within ``shift``), horizontal flip, and intensity jitter of strength
    ``jitter`` (brightness and contrast factors in [1 - 0.8 jitter, 1 + 0.8 jitter], as SimCLR's colour
    jitter)."""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, 3)
    box, angle = crop_box(stored, s[0], crop_scale=crop_scale, rotation_deg=rotation_deg, point=point, shift=shift)
    x = crop_input(stored, box[None], input_size=input_size, target_mean=target_mean, angles=angle[None])[0]
    x = tf.cond(uniform(s[1]) < 0.5, lambda: tf.image.flip_left_right(x), lambda: x)
    bc = uniform(s[2], (2,), 1 - 0.8 * jitter, 1 + 0.8 * jitter)
    x = x * bc[0]
    mean = tf.reduce_mean(x)
    return (x - mean) * bc[1] + mean  # not clipped: the outside constant of model_input may lie outside [0, 1]
