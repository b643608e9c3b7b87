"""Inputs of the classification downstream stages (MSVCL v2 section IV-B): BI-RADS ROI crops and density
whole images, their labels, and the flip/scale augmentation shared by the views of a breast.

One place for each input, used by training, evaluation and export alike:

- BI-RADS: square crops of the *stored* image around each lesion box (:func:`mammodg.augment.matching.roi_crops`,
  long side x 1.2, resized), rounded back to uint16 (:func:`stored_roi_crops`), then turned into model inputs
  crop by crop (:func:`crop_model_inputs`, the outside-the-breast constant of each crop). The export takes such
  uint16 crops, so a client crops the stored image and nothing else.
- Density: the whole stored image -> model input -> resized to ``input_size`` (:func:`density_input`).
- Labels: :data:`BIRADS_CLASSES` (2-3, 4A, 4B, 4C, 5); other values (0, 1, an undivided 4, 6, empty) are not
  rated (-1) and their crops are left out. Density A/B -> 0 (non-dense), C/D -> 1 (dense), empty -> -1.
- Augmentation (:func:`flip_scale`): random flips and an isotropic zoom about the centre drawn from one
  stateless seed; every image given to one call gets the same draw (the CC and MLO of one breast).
"""
from __future__ import annotations

BIRADS_CLASSES = ("2-3", "4A", "4B", "4C", "5")
_BIRADS_INDEX = {"2": 0, "3": 0, "4A": 1, "4B": 2, "4C": 3, "5": 4}
DENSITY_CLASSES = ("non-dense (A/B)", "dense (C/D)")
_DENSITY_INDEX = {"A": 0, "B": 0, "C": 1, "D": 1}


def _lookup(values, table: dict):
    """int32 class index of each string in ``values`` (``table``), -1 for any other string."""
    import tensorflow as tf

    init = tf.lookup.KeyValueTensorInitializer(list(table), list(table.values()), tf.string, tf.int32)
    return tf.lookup.StaticHashTable(init, -1).lookup(tf.strings.upper(tf.strings.strip(values)))


def birads_index(values):
    """BI-RADS strings -> index into :data:`BIRADS_CLASSES` (-1: not one of the 5 rated classes)."""
    return _lookup(values, _BIRADS_INDEX)


def density_index(values):
    """Density letters -> 0 non-dense (A/B), 1 dense (C/D), -1 unknown."""
    return _lookup(values, _DENSITY_INDEX)


def lesion_labels(record, masses_only: bool = True):
    """(keep (n,) bool, label (n,) int32) of a parsed record's boxes: the box's own BI-RADS when the record
    carries one, else the image's; kept when rated (and, with ``masses_only``, a mass)."""
    import tensorflow as tf

    per_box = record["lesion_birads"]
    image = tf.fill(tf.shape(per_box), record["birads"])
    label = birads_index(tf.where(tf.strings.length(per_box) > 0, per_box, image))
    keep = label >= 0
    if masses_only:
        keep &= tf.strings.regex_full_match(record["lesion_class"], ".*mass.*")
    return keep, label


def stored_roi_crops(stored, boxes, size: int, enlarge: float):
    """uint16 (n, size, size, 1) crops of a stored image (h, w, 1) around ``boxes`` (0 outside the image)."""
    import tensorflow as tf

    from mammodg.augment.matching import roi_crops

    crops = roi_crops(tf.cast(stored, tf.float32), boxes, size=size, enlarge=enlarge)
    return tf.cast(tf.clip_by_value(tf.round(crops), 0, 65535), tf.uint16)


def crop_model_inputs(crops, target_mean: float):
    """uint16 crops (n, s, s, 1) -> float32 model inputs, each with its own outside constant."""
    import tensorflow as tf

    from mammodg.records.schema import model_input

    return tf.map_fn(lambda c: model_input(c, target_mean), crops, fn_output_signature=tf.float32)


def density_input(stored, input_size, target_mean: float):
    """A stored image (h, w, 1) -> the float32 (*input_size, 1) density model input."""
    import tensorflow as tf

    from mammodg.records.schema import model_input

    x = model_input(stored, target_mean)
    return tf.image.resize(x, list(input_size), method="bilinear", antialias=True)


def flip_scale(images, seed, *, flip: bool, scale_range, fill_value):
    """The same random flip (horizontal and vertical, each p = 0.5 when ``flip``) and zoom (uniform in
    ``scale_range``) applied to every image of ``images`` (k, h, w, c); ``fill_value`` outside."""
    import tensorflow as tf

    from mammodg.augment.geometry import random_flip_scale

    p = 0.5 if flip else 0.0
    empty = tf.zeros([0, 4], tf.float32)

    def one(image):
        out, _, _ = random_flip_scale(image, empty, (), seed, flip_h=p, flip_v=p, scale=tuple(scale_range),
                                      fill_value=fill_value)
        return out

    return tf.map_fn(one, images, fn_output_signature=tf.TensorSpec(images.shape[1:], images.dtype))
