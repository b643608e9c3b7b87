"""A breast-level pair record -> the augmented views of one contrastive sample (MSVCL v2 III-B, IV-B)."""
from __future__ import annotations

from mammodg.augment.crops import augment, breast_point
from mammodg.augment.styles import METHODS, choose, styled, view_sides, views_per_sample


def pair_decoder(method: str, seed: int, *, input_size, crop_scale, rotation_deg, jitter, target_mean,
                 crop_overlap: bool = True, view_crop_scale=None, overlap_shift: float = 1.0):
    """A ``tf.data`` map function (sample index, serialized pair record) -> ({"view1", "view2", ..}, group id):
    the views and styles :func:`choose` picks for ``method``, each augmented (:func:`augment`), and the
    patient's :func:`mammodg.records.pairs.patient_group_id` (NT-Xent's ``groups``: the other breast of the
    same patient is never a negative).

    Draws are seeded by (``seed``, sample index). The sides of a multi-view pair (:func:`view_sides`) are
    cropped at ``view_crop_scale`` (default ``crop_scale``): large crops, so the CC and the MLO share
    tissue. With ``crop_overlap`` the crops of the other sides showing the same view of the breast contain
    one common breast point, their centres within +/- ``overlap_shift`` / 2 crop sides of it (README,
    "Contrastive pre-training")."""
    import tensorflow as tf

    from mammodg.records.pairs import parse_pair, patient_group_id

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    h, w = input_size
    k = views_per_sample(method)
    crop = dict(input_size=input_size, rotation_deg=rotation_deg, jitter=jitter, target_mean=target_mean)
    multi_view = view_sides(method)

    def decode(i, raw):
        r = parse_pair(raw)
        n_styles = tf.size(r["styles"])
        seeds = tf.random.experimental.stateless_split(tf.stack([tf.cast(seed, tf.int64), i]), k + 2)
        c = choose(tf.size(r["views"]), n_styles, method, seeds[0])
        views = {}
        for side in range(1, k + 1):
            view = c[f"view{side}"]
            img = styled(r["images"], n_styles, view, c[f"style{side}_a"], c[f"style{side}_b"], c[f"alpha{side}"])
            point, scale = None, crop_scale
            if side in multi_view:
                scale = view_crop_scale or crop_scale
            elif crop_overlap:  # one point per view of the breast
                point = breast_point(img, tf.random.experimental.stateless_fold_in(seeds[1], tf.cast(view, tf.int64)))
            views[f"view{side}"] = tf.ensure_shape(augment(img, seeds[side + 1], point=point, shift=overlap_shift,
                                                           crop_scale=scale, **crop),
                                                   [h, w, 1])
        return views, patient_group_id(r["patient"])

    return decode
