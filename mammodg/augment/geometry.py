"""Geometric augmentation that moves lesion boxes with the image: flips, rotation, zoom, shear.

The periodic-sampling paper (appendix A.3.1) trains patches and the classifier with "random rotation,
zoom, shearing" and flips; FCOS (MSVCL v2, section IV-B) trains with random flip and scale. All of them
are one affine transform here, applied to the image with a single resampling
(``tf.raw_ops.ImageProjectiveTransformV3``) and to the boxes through their four corners (the new box is
the corners' bounding box), so that a lesion patch keeps its lesion.

Conventions, as the records store them (:mod:`mammodg.records.schema`, :mod:`mammodg.preprocess.breast`):
boxes are ``(x_min, y_min, x_max, y_max)`` in continuous pixel coordinates, pixel ``i`` spanning
``[i, i + 1)``; images are ``(height, width, channels)``. The forward matrix ``A`` maps an input point
``(x, y, 1)`` to the output; it is composed about the image centres as

    A = T(c_out) . V . H . R(rotation) . S(shear) . Z(zoom) . T(-c_in)

with ``H`` / ``V`` the horizontal / vertical flips (``x -> -x`` / ``y -> -y``), ``R`` a rotation from +x
towards +y (clockwise on screen, y points down), ``S`` the shear ``x -> x + tan(shear) y`` and ``Z`` an
isotropic scale (zoom > 1 enlarges). Angles are in radians in :func:`affine_matrix` and in degrees in the
random ranges.

Everything is a pure tf function of explicit arguments with stateless seeds (``tf.random.stateless_*``):
the same seed gives the same output eagerly and inside ``tf.data.Dataset.map``.

The fill value outside the input image is an argument. Stored uint16 images use 0 for "outside the
breast", so ``fill_value=0`` keeps that meaning; use ``interpolation="nearest"`` there if the breast mask
must stay exact (bilinear blends the mask edge with 0), or transform the float model input
(:func:`mammodg.records.schema.model_input`) with its outside constant as ``fill_value``.
"""
from __future__ import annotations

import math

import tensorflow as tf

__all__ = ["affine_matrix", "random_affine_params", "apply_affine", "random_affine", "random_flip_scale"]

_INTERPOLATION = {"bilinear": "BILINEAR", "nearest": "NEAREST"}


def _f32(x):
    return tf.cast(x, tf.float32)


def _mat(rows):
    return tf.stack([tf.stack([_f32(v) for v in row]) for row in rows])


def affine_matrix(*, height, width, flip_h=False, flip_v=False, rotation=0.0, zoom=1.0, shear=0.0,
                  out_height=None, out_width=None):
    """Forward 3x3 float32 matrix (input -> output continuous pixel coordinates), see the module docstring.

    ``rotation`` and ``shear`` are in radians; ``out_height``/``out_width`` default to the input size.
    """
    out_height = height if out_height is None else out_height
    out_width = width if out_width is None else out_width
    h_sign = tf.where(tf.cast(flip_h, tf.bool), -1.0, 1.0)
    v_sign = tf.where(tf.cast(flip_v, tf.bool), -1.0, 1.0)
    cos, sin = tf.cos(_f32(rotation)), tf.sin(_f32(rotation))
    zoom = _f32(zoom)
    steps = [
        _mat([[1, 0, _f32(out_width) / 2], [0, 1, _f32(out_height) / 2], [0, 0, 1]]),
        _mat([[h_sign, 0, 0], [0, v_sign, 0], [0, 0, 1]]),
        _mat([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]]),
        _mat([[1, tf.tan(_f32(shear)), 0], [0, 1, 0], [0, 0, 1]]),
        _mat([[zoom, 0, 0], [0, zoom, 0], [0, 0, 1]]),
        _mat([[1, 0, -_f32(width) / 2], [0, 1, -_f32(height) / 2], [0, 0, 1]]),
    ]
    out = steps[0]
    for m in steps[1:]:
        out = tf.matmul(out, m)
    return out


def _affine_inverse(a):
    """Inverse of an affine 3x3 matrix in closed form (exact for the identity, unlike a general solver)."""
    det = a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]
    i00, i01, i10, i11 = a[1, 1] / det, -a[0, 1] / det, -a[1, 0] / det, a[0, 0] / det
    tx = -(i00 * a[0, 2] + i01 * a[1, 2])
    ty = -(i10 * a[0, 2] + i11 * a[1, 2])
    return _mat([[i00, i01, tx], [i10, i11, ty], [0, 0, 1]])


def random_affine_params(seed, *, flip_h=0.0, flip_v=0.0, rotation=0.0, zoom=(1.0, 1.0), shear=0.0):
    """Draw one transform's parameters from a stateless ``seed`` (shape [2] int).

    ``flip_h``/``flip_v``: probabilities; ``rotation``/``shear``: maximum absolute angle in degrees (uniform
    in [-max, max]); ``zoom``: (low, high), uniform. Returns keyword arguments of :func:`affine_matrix`.
    A zero range gives exactly the identity value.
    """
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    u = lambda i, lo=0.0, hi=1.0: tf.random.stateless_uniform([], s[i], minval=lo, maxval=hi)  # noqa: E731
    rad = math.pi / 180.0
    return {
        "flip_h": u(0) < flip_h,
        "flip_v": u(1) < flip_v,
        "rotation": u(2, -float(rotation), float(rotation)) * rad,
        "zoom": u(3, float(zoom[0]), float(zoom[1])),
        "shear": u(4, -float(shear), float(shear)) * rad,
    }


def _transform_boxes(boxes, matrix, out_h, out_w, min_side, min_visible):
    """Corners through ``matrix`` -> bounding box -> clip to the output; returns (boxes, keep mask)."""
    boxes = tf.reshape(_f32(boxes), [-1, 4])
    x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
    xs = tf.stack([x0, x1, x0, x1], axis=-1)
    ys = tf.stack([y0, y0, y1, y1], axis=-1)
    tx = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    ty = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
    nx0, nx1 = tf.reduce_min(tx, -1), tf.reduce_max(tx, -1)
    ny0, ny1 = tf.reduce_min(ty, -1), tf.reduce_max(ty, -1)
    cx0, cx1 = tf.clip_by_value(nx0, 0.0, out_w), tf.clip_by_value(nx1, 0.0, out_w)
    cy0, cy1 = tf.clip_by_value(ny0, 0.0, out_h), tf.clip_by_value(ny1, 0.0, out_h)
    full = (nx1 - nx0) * (ny1 - ny0)
    inside = (cx1 - cx0) * (cy1 - cy0)
    keep = (cx1 - cx0 >= min_side) & (cy1 - cy0 >= min_side) & (inside >= min_visible * full) & (full > 0)
    return tf.stack([cx0, cy0, cx1, cy1], axis=-1), keep


def apply_affine(image, boxes, classes, matrix, *, fill_value=0.0, interpolation="bilinear", output_size=None,
                 min_side=2.0, min_visible=0.25):
    """Warp ``image`` (h, w, c) by the forward ``matrix`` and move ``boxes`` (n, 4) with it.

    Boxes are clipped to the output; a box whose clipped side is below ``min_side`` pixels, or whose
    clipped area is below ``min_visible`` of its transformed area, is dropped with its entries of
    ``classes`` (a tensor or nest of tensors with leading dimension n). Integer images are rounded back
    to their dtype. Returns ``(image, boxes, classes)``.
    """
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
    image = tf.convert_to_tensor(image)
    if image.shape.rank != 3:
        raise ValueError(f"image must be (height, width, channels), got shape {image.shape}")
    shape = tf.shape(image)
    out_h, out_w = (shape[0], shape[1]) if output_size is None else output_size
    out_hw = tf.cast(tf.stack([out_h, out_w]), tf.int32)
    # output pixel index p has continuous centre p + 0.5; the op wants output index -> input index
    half = _mat([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    unhalf = _mat([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
    to_input = tf.matmul(unhalf, tf.matmul(_affine_inverse(matrix), half))
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=_f32(image)[None], transforms=tf.reshape(to_input, [-1])[None, :8], output_shape=out_hw,
        fill_value=_f32(fill_value), interpolation=_INTERPOLATION[interpolation], fill_mode="CONSTANT")[0]
    if image.dtype.is_integer:
        warped = tf.clip_by_value(tf.round(warped), image.dtype.min, image.dtype.max)
    static_hw = image.shape[:2] if output_size is None else [tf.get_static_value(v) for v in output_size]
    warped = tf.ensure_shape(tf.cast(warped, image.dtype), [*static_hw, image.shape[-1]])
    new_boxes, keep = _transform_boxes(boxes, matrix, _f32(out_hw[0]), _f32(out_hw[1]), min_side, min_visible)
    classes = tf.nest.map_structure(lambda t: tf.boolean_mask(t, keep), classes)
    return warped, tf.boolean_mask(new_boxes, keep), classes


def random_affine(image, boxes, classes, seed, *, flip_h=0.0, flip_v=0.0, rotation=0.0, zoom=(1.0, 1.0),
                  shear=0.0, fill_value=0.0, interpolation="bilinear", output_size=None, min_side=2.0,
                  min_visible=0.25):
    """Random flips, rotation, zoom and shear (ranges as :func:`random_affine_params`) as one resampling.

    ``output_size`` (h, w) lets a larger crop be warped onto a smaller canvas, centre to centre, so that
    every output pixel comes from the input (the paper's "surjective" patch augmentation). Returns
    ``(image, boxes, classes)`` as :func:`apply_affine`.
    """
    params = random_affine_params(seed, flip_h=flip_h, flip_v=flip_v, rotation=rotation, zoom=zoom, shear=shear)
    shape = tf.shape(image)
    out_h, out_w = (None, None) if output_size is None else output_size
    matrix = affine_matrix(height=shape[0], width=shape[1], out_height=out_h, out_width=out_w, **params)
    return apply_affine(image, boxes, classes, matrix, fill_value=fill_value, interpolation=interpolation,
                        output_size=output_size, min_side=min_side, min_visible=min_visible)


def random_flip_scale(image, boxes, classes, seed, *, flip_h=0.5, flip_v=0.0, scale=(0.8, 1.25), **kwargs):
    """FCOS training augmentation (issue 18): random flip and isotropic scale about the centre, boxes moved
    and dropped as in :func:`apply_affine`. ``kwargs`` go to :func:`random_affine` (fill value, ...)."""
    return random_affine(image, boxes, classes, seed, flip_h=flip_h, flip_v=flip_v, zoom=scale, **kwargs)
