"""Patch sampling of the periodic-sampling paper's patch stage (appendix A.3), and the training augmentation
of the patch and classifier stages (A.3.1, section 3.1.1).

A patch sample is a (record, lesion index) pair: lesion index ``k >= 0`` is the record's box ``k`` (class
``1 + LESION_CLASSES.index(lesion_class)``), ``k = -1`` a healthy-tissue patch (class 0), which only records
labelled 0 give (patients without a malignant finding, A.3.1). A label-1 record without boxes gives no
patch. Patches are cut from the model input (:func:`mammodg.records.schema.model_input`); past the image
edge is the outside-breast constant.

Augmentation (``augment``: keyword ranges of :func:`mammodg.augment.geometry.random_affine`, or None) is
the paper's "surjective" scheme: a region larger than the patch, sized for the widest transform of the
ranges (:func:`region_size`), is cropped around the patch centre and warped onto the patch, centre to
centre, by one random affine transform (flips, rotation, zoom, shear). Every patch pixel then comes from
the region, and the lesion box moves with the image, so a lesion patch keeps its lesion.
"""
from __future__ import annotations

import math

from mammodg.augment.crops import breast_point, uniform

PATCH_CLASSES = ("healthy", "benign_mass", "malignant_mass", "benign_calc", "malignant_calc")  # class ids 0..4
HEALTHY = -1  # the lesion index of a healthy-tissue sample


def affine_ranges(aug) -> dict | None:
    """Keyword ranges of :func:`mammodg.augment.geometry.random_affine` from an ``AugmentConfig``; None
    when it is off."""
    if aug is None or not aug.enabled:
        return None
    return {"flip_h": aug.flip_h, "flip_v": aug.flip_v, "rotation": aug.rotation_deg, "zoom": tuple(aug.zoom),
            "shear": aug.shear_deg}


def region_size(patch_size: int, ranges: dict) -> int:
    """Side of the square region whose warp covers a ``patch_size`` patch for every transform of ``ranges``:
    the patch's corners pulled back through the inverse zoom, shear and rotation stay within
    ``patch_size / 2 * sqrt((1 + tan shear)^2 + 1) / zoom_min`` of the centre."""
    t = math.tan(math.radians(abs(ranges["shear"])))
    half = patch_size / 2 * math.sqrt((1 + t) ** 2 + 1) / min(ranges["zoom"])
    return 2 * math.ceil(half) + 2


def lesion_classes(names):
    """Class ids (1..4) of lesion class names (a string tensor)."""
    import tensorflow as tf

    from mammodg.io.manifest import LESION_CLASSES

    eq = tf.equal(names[:, None], tf.constant(LESION_CLASSES)[None, :])
    return tf.argmax(tf.cast(eq, tf.int32), axis=1, output_type=tf.int32) + 1


def _window(img, fill, centre, size: int):
    """The ``size`` x ``size`` window of ``img`` (h, w, 1) whose pixel ``size // 2`` is the image pixel at
    ``round(centre)`` (clipped into the image), padded with ``fill``; and its top-left in image pixels."""
    import tensorflow as tf

    h, w = tf.shape(img)[0], tf.shape(img)[1]
    half = size // 2
    padded = tf.pad(img - fill, [[half, size - half], [half, size - half], [0, 0]]) + fill
    top = tf.clip_by_value(tf.cast(tf.round(centre[0]), tf.int32), 0, h - 1)
    left = tf.clip_by_value(tf.cast(tf.round(centre[1]), tf.int32), 0, w - 1)
    return tf.ensure_shape(padded[top:top + size, left:left + size], [size, size, 1]), tf.stack([top - half, left - half])


def outside_boxes(stored, boxes):
    """``stored`` with the pixels inside any box (x_min, y_min, x_max, y_max) set to 0 (outside the breast),
    so that a healthy patch is never centred on an annotated lesion."""
    import tensorflow as tf

    h, w = tf.shape(stored)[0], tf.shape(stored)[1]
    ys = tf.cast(tf.range(h), tf.float32)[:, None, None] + 0.5
    xs = tf.cast(tf.range(w), tf.float32)[None, :, None] + 0.5
    inside = (xs >= boxes[:, 0]) & (xs < boxes[:, 2]) & (ys >= boxes[:, 1]) & (ys < boxes[:, 3])
    return tf.where(tf.reduce_any(inside, axis=-1)[..., None], tf.zeros_like(stored), stored)


def augmented_window(img, fill, centre, box, seed, *, patch_size: int, ranges: dict):
    """A ``patch_size`` patch warped from the region around ``centre`` by one random affine transform of
    ``ranges`` (centre to centre), and ``box`` (4,) moved with it: (patch, boxes (0 or 1, 4))."""
    import tensorflow as tf

    from mammodg.augment.geometry import random_affine

    region, corner = _window(img, fill, centre, region_size(patch_size, ranges))
    offset = tf.cast(tf.stack([corner[1], corner[0], corner[1], corner[0]]), tf.float32)
    patch, boxes, _ = random_affine(region, (box - offset)[None], tf.zeros([1], tf.int32), seed, fill_value=fill,
                                    output_size=(patch_size, patch_size), **ranges)
    return patch, boxes


def patch_decoder(*, patch_size: int, target_mean: float, seed: int, jitter: float = 0.25, augment: dict | None = None):
    """A ``tf.data`` map function (sample index, serialized record, lesion index) -> (patch (s, s, 1) float32,
    class int32), ``s = patch_size``.

    Lesion index ``k >= 0``: the patch is centred on box ``k``, shifted by up to ``jitter * patch_size`` per
    axis. ``k = -1``: centred on a random breast pixel outside every box (:func:`outside_boxes`), class 0.
    ``augment``: affine ranges (:func:`affine_ranges`) or None. Draws are seeded by (``seed``, sample index)."""
    import tensorflow as tf

    from mammodg.records.schema import model_input, outside_constant, parse

    def decode(i, raw, k):
        r = parse(raw)
        s = tf.random.experimental.stateless_split(tf.stack([tf.cast(seed, tf.int64), tf.cast(i, tf.int64)]), 4)
        img = model_input(r["image"], target_mean)
        fill = outside_constant(r["image"], target_mean)
        boxes = r["boxes"]  # x_min, y_min, x_max, y_max
        size = tf.cast(tf.shape(img)[:2], tf.float32)

        def lesion():
            b = boxes[k]
            shift = uniform(s[1], [2], -jitter, jitter) * patch_size
            return tf.stack([(b[1] + b[3]) / 2, (b[0] + b[2]) / 2]) + shift, b, lesion_classes(r["lesion_class"])[k]

        def healthy():
            point = breast_point(outside_boxes(r["image"], boxes), s[2]) * size
            return point, tf.concat([point[::-1], point[::-1]], 0), tf.constant(0, tf.int32)

        centre, box, cls = tf.cond(k >= 0, lesion, healthy)
        if augment is None:
            patch = _window(img, fill, centre, patch_size)[0]
        else:
            patch = augmented_window(img, fill, centre, box, s[3], patch_size=patch_size, ranges=augment)[0]
        return patch, cls

    return decode


def image_decoder(*, target_mean: float, seed: int, augment: dict | None = None):
    """A ``tf.data`` map function (sample index, serialized record) -> (whole-image model input, label) for
    the classifier. ``augment``: one random affine transform of the image (same size, outside filled with
    the outside-breast constant); when it would push a lesion box out of the image (dropped, see
    :func:`mammodg.augment.geometry.apply_affine`) the image is kept as it is, so that the malignant lesion
    stays visible (section 3.1.1)."""
    import tensorflow as tf

    from mammodg.augment.geometry import random_affine
    from mammodg.records.schema import model_input, outside_constant, parse

    def decode(i, raw):
        r = parse(raw)
        img = model_input(r["image"], target_mean)
        label = tf.cast(r["label"], tf.int32)
        if augment is None:
            return img, label
        seed2 = tf.stack([tf.cast(seed, tf.int64), tf.cast(i, tf.int64)])
        warped, kept, _ = random_affine(img, r["boxes"], tf.zeros([tf.shape(r["boxes"])[0]], tf.int32), seed2,
                                        fill_value=outside_constant(r["image"], target_mean), **augment)
        return tf.cond(tf.shape(kept)[0] == tf.shape(r["boxes"])[0], lambda: warped, lambda: img), label

    return decode
