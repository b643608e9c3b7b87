"""FCOS geometry and per-location training targets (Tian et al. 2019; MSVCL v2 section III-C), in ``keras.ops``.

Geometry: pyramid level ``l`` has stride ``2**l``; for an (H, W) input its feature map is
(ceil(H / 2**l), ceil(W / 2**l)) (ResNet's padded stride-2 layers and 'same' stride-2 convolutions both
round up), and cell (i, j) sits at pixel (x, y) = (j * s + s // 2, i * s + s // 2), as in FCOS.
Locations of all levels are concatenated level by level, row-major inside a level.

Regression ranges (:func:`regression_ranges`): level ``l`` takes locations whose largest distance
``max(l, t, r, b)`` to a box edge lies in (2**(l+2), 2**(l+3)], except that the first level starts at 0
and the last ends at infinity. For levels 3-7 (FCOS) that is

    P3 (0, 64], P4 (64, 128], P5 (128, 256], P6 (256, 512], P7 (512, inf);

with P2 on (levels 2-7) it is P2 (0, 32], P3 (32, 64], then P4-P7 as above: P2 takes the smallest
boxes and P3 keeps its FCOS upper bound, so nothing changes for boxes above 64 pixels.
"""
from __future__ import annotations

import math

import numpy as np
from keras import ops

DEFAULT_LEVELS = (3, 4, 5, 6, 7)
CENTER_RADIUS = 1.5  # centre sampling radius in strides (FCOS "center sampling")
_EPS = 1e-6


def check_levels(levels) -> tuple[int, ...]:
    """``levels`` as a tuple of consecutive ints starting at 2 or 3 and ending at most at 7."""
    levels = tuple(int(v) for v in levels)
    if not levels or levels[0] not in (2, 3) or not 5 <= levels[-1] <= 7 or levels != tuple(range(levels[0], levels[-1] + 1)):
        raise ValueError(f"detection.levels must be consecutive, start at 2 or 3 and end at 5, 6 or 7, got {levels}")
    return levels


def level_shapes(image_shape, levels=DEFAULT_LEVELS) -> list[tuple[int, int]]:
    """Feature-map (h, w) of each level for an (H, W) input."""
    h, w = int(image_shape[0]), int(image_shape[1])
    return [(math.ceil(h / 2 ** lv), math.ceil(w / 2 ** lv)) for lv in check_levels(levels)]


def strides_of(levels=DEFAULT_LEVELS) -> list[int]:
    return [2 ** lv for lv in check_levels(levels)]


def regression_ranges(levels=DEFAULT_LEVELS) -> list[tuple[float, float]]:
    """(lo, hi] of ``max(l, t, r, b)`` for each level (table in the module docstring)."""
    levels = check_levels(levels)
    return [(0.0 if lv == levels[0] else float(2 ** (lv + 2)), math.inf if lv == levels[-1] else float(2 ** (lv + 3)))
            for lv in levels]


def locations(shapes, strides) -> np.ndarray:
    """(N, 2) pixel (x, y) of every location, level by level (row-major), float32."""
    out = []
    for (h, w), s in zip(shapes, strides):
        ys, xs = np.meshgrid(np.arange(h) * s + s // 2, np.arange(w) * s + s // 2, indexing="ij")
        out.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
    return np.concatenate(out).astype(np.float32)


def per_location(shapes, values) -> np.ndarray:
    """(N, ...) array repeating ``values[k]`` over the h * w locations of level k."""
    return np.concatenate([np.repeat(np.asarray(v, np.float32)[None], h * w, axis=0) for (h, w), v in zip(shapes, values)])


def centerness(ltrb):
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of (..., 4) distances; 0 where a distance is 0."""
    l, t, r, b = (ltrb[..., k] for k in range(4))
    lr = ops.minimum(l, r) / ops.maximum(ops.maximum(l, r), _EPS)
    tb = ops.minimum(t, b) / ops.maximum(ops.maximum(t, b), _EPS)
    return ops.sqrt(ops.maximum(lr * tb, 0.0))


def fcos_targets(boxes, classes, shapes, strides, ranges, center_radius: float = CENTER_RADIUS):
    """Targets of every location for a padded batch of boxes.

    ``boxes`` (B, M, 4) are x0, y0, x1, y1 in input pixels; ``classes`` (B, M) ints, -1 for padding.
    Boxes with a negative class or zero width or height are ignored. A location is positive for a box when
    it lies strictly inside the box shrunk to a square of ``center_radius`` strides around its centre
    (clipped to the box) and ``max(l, t, r, b)`` lies in its level's (lo, hi]; among several such boxes the
    one with the smallest area wins (lowest index on ties). Returns a dict of

    * ``labels`` (B, N) int32: class of the matched box, -1 for background;
    * ``ltrb`` (B, N, 4) float32: distances to the matched box's left, top, right, bottom edges (0 if none);
    * ``centerness`` (B, N) float32: :func:`centerness` of ``ltrb`` for positives, 0 otherwise.
    """
    boxes = ops.cast(boxes, "float32")
    classes = ops.cast(classes, "int32")
    if boxes.shape[1] == 0:  # no box slot at all: one padding slot keeps argmin defined
        boxes = ops.zeros((ops.shape(boxes)[0], 1, 4), "float32")
        classes = -ops.ones((ops.shape(boxes)[0], 1), "int32")
    loc = ops.convert_to_tensor(locations(shapes, strides))  # (N, 2)
    radius = ops.convert_to_tensor(per_location(shapes, [center_radius * s for s in strides]))  # (N,)
    rng = ops.convert_to_tensor(per_location(shapes, [[lo, hi] for lo, hi in ranges]))  # (N, 2)
    x = loc[None, :, None, 0]  # (1, N, 1)
    y = loc[None, :, None, 1]
    x0, y0, x1, y1 = (boxes[:, None, :, k] for k in range(4))  # (B, 1, M)
    ltrb = ops.stack([x - x0, y - y0, x1 - x, y1 - y], axis=-1)  # (B, N, M, 4)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = radius[None, :, None]
    inner = ops.stack([x - ops.maximum(cx - r, x0), y - ops.maximum(cy - r, y0),
                       ops.minimum(cx + r, x1) - x, ops.minimum(cy + r, y1) - y], axis=-1)
    max_dist = ops.max(ltrb, axis=-1)
    valid = ops.logical_and(classes >= 0, ops.logical_and(boxes[..., 2] > boxes[..., 0], boxes[..., 3] > boxes[..., 1]))
    candidate = (ops.min(inner, axis=-1) > 0) & (max_dist > rng[None, :, None, 0]) & (max_dist <= rng[None, :, None, 1])
    candidate = candidate & valid[:, None, :]
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (B, M)
    masked_area = ops.where(candidate, area[:, None, :], np.float32(np.inf))
    match = ops.argmin(masked_area, axis=-1)  # (B, N)
    positive = ops.any(candidate, axis=-1)
    onehot = ops.one_hot(match, ops.shape(boxes)[1], dtype="float32")  # (B, N, M)
    matched = ops.sum(ltrb * onehot[..., None], axis=2)
    matched = ops.where(positive[..., None], matched, 0.0)
    label = ops.cast(ops.sum(ops.cast(classes, "float32")[:, None, :] * onehot, axis=-1), "int32")
    return {
        "labels": ops.where(positive, label, -1),
        "ltrb": matched,
        "centerness": ops.where(positive, centerness(matched), 0.0),
    }
