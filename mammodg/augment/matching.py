"""Building blocks of CC/MLO mass matching (MSVCL v2, section III-C-2 and IV-B).

Pure functions: detections marked TP/FP against the ground truth (:func:`mark_detections`), CC x MLO
pairs with their matching label Y (:func:`matching_pairs`), square ROI crops as tf ops usable in
``Dataset.map`` (:func:`roi_crops`) and the geometric features of an ROI (:func:`geometric_features`).

Choices where the paper is silent (documented here, the one place):

- **Lesion identity across views.** The manifest lists boxes per image, not per lesion. The k-th box
  of a breast's CC image and the k-th box of its MLO image are taken as the same lesion when both
  list the same number of boxes (the phantoms write a breast's lesions in one order in both views;
  CBIS-DDSM numbers abnormalities per lesion). When the counts differ (a lesion seen in one view
  only, or a box dropped by preprocessing) identity is unknown: :func:`lesion_ids_by_order` gives
  each view its own ids, so no positive pair is made from that breast (its FP pairs remain).
- **TP pairs of different lesions** are negatives (Y = 0): they are true non-matches, the hardest
  negatives a matcher meets in a breast with several masses. ``tp_mismatch_negative=False`` leaves
  them out.
- **Duplicates.** A detection on an already-matched ground truth is an FP (each ground truth is
  matched at most once per image, highest score first, as in detection AP), so, as the paper says,
  every pair involving it is negative.
- **Geometric features** are in image heights (divide pixels by the image height), so CC and MLO of
  one breast, preprocessed to the same height, share a unit whatever the pixel spacing.
"""
from __future__ import annotations

import numpy as np

from mammodg.preprocess.landmarks import box_centres, distance_to_line, distance_to_point


def box_iou(a, b) -> np.ndarray:
    """(n, m) IoU of boxes ``(x_min, y_min, x_max, y_max)`` in continuous pixel coordinates."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mark_detections(boxes, scores, gt_boxes, iou_threshold: float = 0.5) -> np.ndarray:
    """Index of the ground truth each detection is a TP of, -1 for an FP; shape (n,).

    Detections are taken by decreasing score (ties: input order); each takes the unmatched ground
    truth of highest IoU if that IoU is >= ``iou_threshold``; a ground truth is matched at most once.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError(f"mark_detections: {len(boxes)} boxes but {len(scores)} scores")
    iou = box_iou(boxes, gt_boxes)
    gt_of = np.full(len(boxes), -1, np.int64)
    taken = np.zeros(iou.shape[1], bool)
    for i in np.argsort(-scores, kind="stable"):
        if iou.shape[1] == 0:
            break
        cand = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(cand))
        if cand[j] >= iou_threshold:
            gt_of[i] = j
            taken[j] = True
    return gt_of


def lesion_ids_by_order(n_cc: int, n_mlo: int) -> tuple[np.ndarray, np.ndarray]:
    """Lesion ids of a breast's CC and MLO ground-truth boxes (see the module docstring):
    ``(arange(n), arange(n))`` when the counts agree, else disjoint ids (no shared lesion)."""
    if n_cc == n_mlo:
        return np.arange(n_cc), np.arange(n_mlo)
    return np.arange(n_cc), n_cc + np.arange(n_mlo)


def matching_pairs(cc_gt_of, mlo_gt_of, cc_lesion_ids, mlo_lesion_ids, *, tp_mismatch_negative: bool = True):
    """Every CC x MLO detection pair of one breast with its matching label Y.

    ``*_gt_of``: per detection, the ground-truth index (:func:`mark_detections`, -1 = FP);
    ``*_lesion_ids``: per ground-truth box, its lesion id. Y = 1 for two TPs of the same lesion;
    Y = 0 for any pair with an FP, and for TPs of different lesions (unless
    ``tp_mismatch_negative=False``, which drops those). Returns int arrays ``(cc_index, mlo_index, y)``.
    """
    cc_gt_of, mlo_gt_of = np.asarray(cc_gt_of, np.int64), np.asarray(mlo_gt_of, np.int64)
    cc_ids, mlo_ids = np.asarray(cc_lesion_ids, np.int64), np.asarray(mlo_lesion_ids, np.int64)
    ci, mj = (g.ravel() for g in np.meshgrid(np.arange(len(cc_gt_of)), np.arange(len(mlo_gt_of)), indexing="ij"))
    cc_tp, mlo_tp = cc_gt_of[ci] >= 0, mlo_gt_of[mj] >= 0
    lesion_cc = np.where(cc_tp, cc_ids[np.maximum(cc_gt_of[ci], 0)] if len(cc_ids) else -1, -1)
    lesion_mlo = np.where(mlo_tp, mlo_ids[np.maximum(mlo_gt_of[mj], 0)] if len(mlo_ids) else -1, -1)
    both = cc_tp & mlo_tp
    y = (both & (lesion_cc == lesion_mlo)).astype(np.int64)
    keep = np.ones(len(ci), bool) if tp_mismatch_negative else ~(both & (y == 0))
    return ci[keep], mj[keep], y[keep]


def crop_windows(boxes, enlarge: float = 0.2) -> np.ndarray:
    """(n, 4) tf square windows ``(x_min, y_min, x_max, y_max)`` centred on each box, of side
    ``(1 + enlarge) x`` its long side (section IV-B: squares, the long side enlarged by 20%)."""
    import tensorflow as tf

    b = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    half = (1.0 + enlarge) * tf.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) / 2
    return tf.stack([cx - half, cy - half, cx + half, cy + half], axis=1)


def roi_crops(image, boxes, size: int = 224, enlarge: float = 0.2):
    """Square ROI crops of ``image`` (h, w, c) around ``boxes`` (n, 4), resized to (n, size, size, c).

    The window is :func:`crop_windows`; output pixel k samples the window at its k-th of ``size``
    equal cells' centre (bilinear, continuous coordinates: pixel i spans [i, i + 1)); outside the
    image the value is 0 (the stored "outside the breast" value). Graph-safe: use in ``Dataset.map``.
    """
    import tensorflow as tf

    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    win = crop_windows(boxes, enlarge)
    step_x = (win[:, 2] - win[:, 0]) / size
    step_y = (win[:, 3] - win[:, 1]) / size
    # pixel-centre index coordinates of the first and last samples, normalised as crop_and_resize wants
    x1 = (win[:, 0] + 0.5 * step_x - 0.5) / tf.maximum(w - 1, 1)
    x2 = (win[:, 2] - 0.5 * step_x - 0.5) / tf.maximum(w - 1, 1)
    y1 = (win[:, 1] + 0.5 * step_y - 0.5) / tf.maximum(h - 1, 1)
    y2 = (win[:, 3] - 0.5 * step_y - 0.5) / tf.maximum(h - 1, 1)
    n = tf.shape(win)[0]
    crops = tf.image.crop_and_resize(tf.cast(image, tf.float32)[None], tf.stack([y1, x1, y2, x2], axis=1),
                                     tf.zeros([n], tf.int32), [size, size], method="bilinear", extrapolation_value=0.0)
    return crops


def geometric_features(boxes, nipple, chest_wall, image_height: float) -> np.ndarray:
    """(n, 3) float32 per ROI: distance of its centre to the nipple, to the chest-wall line, and its
    size sqrt(width x height), all in image heights (see the module docstring)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    c = box_centres(b)
    size = np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None))
    feats = np.stack([distance_to_point(c, nipple), distance_to_line(c, chest_wall), size], axis=1)
    return (feats / float(image_height)).astype(np.float32)
