"""Patch sampling of the periodic-sampling paper's patch stage (appendix A.3)."""
from __future__ import annotations

from mammodg.augment.crops import breast_point, randint, uniform


def patch_decoder(*, patch_size: int, target_mean: float, seed: int, jitter: float = 0.25):
    """A ``tf.data`` map function (sample index, serialized image record) -> (patch (s, s, 1) float32,
    class int32), ``s = patch_size``.

    The patch is centred on one of the record's lesion boxes, shifted by up to ``jitter * patch_size``
    per axis, class ``1 + LESION_CLASSES.index(lesion_class)``; or, for an image without lesions, on a
    random breast pixel (:func:`mammodg.augment.breast_point`), class 0 (healthy tissue). Past the image
    edge is the outside-breast value. Draws are seeded by (``seed``, sample index)."""
    import tensorflow as tf

    from mammodg.io.manifest import LESION_CLASSES
    from mammodg.records.schema import model_input, parse

    names = tf.constant(LESION_CLASSES)

    def decode(i, raw):
        r = parse(raw)
        s = tf.random.experimental.stateless_split(tf.stack([tf.cast(seed, tf.int64), i]), 3)
        img = model_input(r["image"], target_mean)
        boxes = r["boxes"]  # x_min, y_min, x_max, y_max
        n = tf.shape(boxes)[0]
        h, w = tf.shape(img)[0], tf.shape(img)[1]

        def lesion():
            k = randint(s[0], n)
            b = boxes[k]
            shift = uniform(s[1], [2], -jitter, jitter) * patch_size
            cls = tf.argmax(tf.cast(tf.equal(names, r["lesion_class"][k]), tf.int32), output_type=tf.int32) + 1
            return tf.stack([(b[1] + b[3]) / 2, (b[0] + b[2]) / 2]) + shift, cls

        def healthy():
            return breast_point(r["image"], s[2]) * tf.cast(tf.stack([h, w]), tf.float32), tf.constant(0, tf.int32)

        centre, cls = tf.cond(n > 0, lesion, healthy)
        half = patch_size // 2
        fill = img[0, w - 1, 0]  # a corner on the nipple side: outside the breast
        padded = tf.pad(img - fill, [[half, half], [half, half], [0, 0]]) + fill
        top = tf.clip_by_value(tf.cast(tf.round(centre[0]), tf.int32), 0, h - 1)
        left = tf.clip_by_value(tf.cast(tf.round(centre[1]), tf.int32), 0, w - 1)
        patch = padded[top:top + patch_size, left:left + patch_size]
        return tf.ensure_shape(patch, [patch_size, patch_size, 1]), cls

    return decode
