"""Detection metrics for mass detection (MSVCL v2, section IV and Table II; issue 18, deliverable 7).

* :func:`average_precision` -- AP at IoU 0.5 and COCO mAP (mean over IoU 0.50:0.05:0.95) through
  pycocotools. Images without findings are part of the evaluated set, so their detections count as false
  positives. The AP values are read from ``COCOeval.eval["precision"]`` (101-point interpolated precision,
  averaged over the classes that have ground truth), never from ``summarize()``.
* :func:`domain_table` -- one value per vendor domain (data segment), with the averages over the seen
  and over the unseen domains, one row per method, as in the paper's Table II.
* :func:`froc` -- lesion-level sensitivity against the mean number of false positives per image (over
  all images, with or without findings), read at 0.5, 1, 2 and 4 FPs per image.

Tables, figures (FROC curves, the paper's Figure 8 overlays) and report files: :mod:`mammodg.metrics.detection_report`.

Input: one mapping per image with ``gt_boxes`` (n, 4), ``boxes`` (m, 4), ``scores`` (m,), optionally
``gt_classes`` (n,), ``classes`` (m,) (strings, bytes or ints; absent = one class ``"lesion"``),
``domain`` (the data segment, e.g. ``"S1|VendorA"``) and ``image_id``. Boxes are
``(x_min, y_min, x_max, y_max)`` in stored-image pixels, continuous coordinates as the records store
them (:mod:`mammodg.records.schema`). A detection matches a ground-truth box when IoU >= the threshold,
greedily in decreasing score, each ground truth matched once (the COCO rule); FROC uses the same rule at
IoU 0.5 (not the centre-in-box hit some FROC papers use), and a second detection of an already found
lesion is a false positive.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "FROC_FPS_PER_IMAGE",
    "to_coco",
    "average_precision",
    "per_domain",
    "domain_table",
    "froc",
]

#: COCO's IoU thresholds 0.50:0.05:0.95 (the mean of AP over them is "COCO mAP")
COCO_IOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())
#: the false-positive rates per image at which FROC sensitivity is read
FROC_FPS_PER_IMAGE = (0.5, 1.0, 2.0, 4.0)
_DEFAULT_CLASS = "lesion"


# --------------------------------------------------------------------------------------------- inputs
def _class_names(values, n: int, where: str) -> list[str]:
    if values is None:
        return [_DEFAULT_CLASS] * n
    out = [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values, dtype=object).reshape(-1)]
    if len(out) != n:
        raise ValueError(f"{where}: {len(out)} classes for {n} boxes")
    return out


def as_boxes(values, where: str) -> np.ndarray:
    """``values`` as a float64 (n, 4) box array (None or empty: (0, 4)); ValueError naming ``where`` otherwise."""
    b = np.asarray(values if values is not None else np.zeros((0, 4)), dtype=np.float64)
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{where}: boxes have shape {b.shape}, expected (n, 4) as x_min, y_min, x_max, y_max")
    if not np.isfinite(b).all() or (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError(f"{where}: boxes must be finite with x_max >= x_min and y_max >= y_min")
    return b


def _images(images: Sequence[Mapping]) -> list[dict]:
    """Check and normalise the per-image input (see the module docstring); errors name the image."""
    out = []
    for i, im in enumerate(images):
        where = f"image {i}" + (f" ({im['image_id']!r})" if "image_id" in im else "")
        gt = as_boxes(im.get("gt_boxes"), f"{where} gt_boxes")
        det = as_boxes(im.get("boxes"), f"{where} boxes")
        scores = np.asarray(im.get("scores") if im.get("scores") is not None else [], np.float64).reshape(-1)
        if len(scores) != len(det):
            raise ValueError(f"{where}: {len(scores)} scores for {len(det)} boxes")
        if not np.isfinite(scores).all():
            raise ValueError(f"{where}: scores must be finite")
        domain = im.get("domain", "")
        out.append({
            "gt_boxes": gt, "gt_classes": _class_names(im.get("gt_classes"), len(gt), f"{where} gt_classes"),
            "boxes": det, "scores": scores, "classes": _class_names(im.get("classes"), len(det), f"{where} classes"),
            "domain": domain.decode() if isinstance(domain, bytes) else str(domain),
        })
    return out


# ----------------------------------------------------------------------------------------- pycocotools
def _xywh(b: np.ndarray) -> list[float]:
    return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]


def to_coco(images: Sequence[Mapping], class_agnostic: bool = False):
    """``(coco_gt, coco_dt, class_names)``: pycocotools ``COCO`` objects holding every image (also those
    without findings). Category ids are 1.. over the sorted class names; image and annotation ids start at
    1 (pycocotools treats id 0 as "no match"). ``class_agnostic`` puts every box in one class."""
    from pycocotools.coco import COCO

    ims = _images(images)
    cls = (lambda c: _DEFAULT_CLASS) if class_agnostic else (lambda c: c)  # noqa: E731
    names = sorted({cls(c) for im in ims for c in im["gt_classes"] + im["classes"]}) or [_DEFAULT_CLASS]
    cat = {n: k + 1 for k, n in enumerate(names)}
    gts, dts = [], []
    for img_id, im in enumerate(ims, start=1):
        for b, c in zip(im["gt_boxes"], im["gt_classes"]):
            xywh = _xywh(b)
            gts.append({"id": len(gts) + 1, "image_id": img_id, "category_id": cat[cls(c)], "bbox": xywh,
                        "area": xywh[2] * xywh[3], "iscrowd": 0, "ignore": 0})
        for b, s, c in zip(im["boxes"], im["scores"], im["classes"]):
            xywh = _xywh(b)
            dts.append({"id": len(dts) + 1, "image_id": img_id, "category_id": cat[cls(c)], "bbox": xywh,
                        "area": xywh[2] * xywh[3], "iscrowd": 0, "score": float(s)})
    base = {"images": [{"id": k} for k in range(1, len(ims) + 1)],
            "categories": [{"id": cat[n], "name": n} for n in names]}
    cocos = []
    for anns in (gts, dts):
        c = COCO()
        c.dataset = {**base, "annotations": anns}
        with contextlib.redirect_stdout(io.StringIO()):
            c.createIndex()
        cocos.append(c)
    return cocos[0], cocos[1], names


def average_precision(images: Sequence[Mapping], *, iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
                      class_agnostic: bool = False, max_dets: int = 100) -> dict:
    """AP per IoU threshold through pycocotools, over all images (those without findings included).

    Returns ``{"ap_per_iou": {iou: AP}, "ap50": AP at 0.5 (None if 0.5 is not a threshold), "map": mean
    over the thresholds (COCO mAP with the default ones), "ap50_per_class": {class: AP}, "n_images",
    "n_lesions", "n_detections"}``. AP is ``nan`` when there is no ground-truth box. At most ``max_dets``
    detections per image (highest scores) count.
    """
    from pycocotools.cocoeval import COCOeval

    ims = _images(images)
    thrs = np.asarray(sorted(float(t) for t in iou_thresholds), np.float64)
    n_gt = sum(len(im["gt_boxes"]) for im in ims)
    counts = {"n_images": len(ims), "n_lesions": n_gt, "n_detections": sum(len(im["boxes"]) for im in ims)}
    names, valid, ap_tk = [], np.zeros((len(thrs), 0), bool), np.zeros((len(thrs), 0))  # (iou, class)
    if n_gt:
        gt, dt, names = to_coco(ims, class_agnostic=class_agnostic)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.iouThrs = thrs
        ev.params.maxDets = [int(max_dets)]
        ev.params.areaRng = [[0.0, 1e12]]
        ev.params.areaRngLbl = ["all"]
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
        prec = ev.eval["precision"][:, :, :, 0, 0]  # (iou, recall, class)
        valid = (prec > -1).all(axis=1)  # classes without ground truth are -1 throughout
        ap_tk = np.where(valid, np.where(prec > -1, prec, 0).mean(axis=1), np.nan)
    per_iou = {float(t): float(np.nanmean(ap_tk[i])) if valid[i].any() else math.nan for i, t in enumerate(thrs)}
    i50 = np.flatnonzero(np.isclose(thrs, 0.5))
    per_class = {names[k]: float(ap_tk[i50[0], k]) for k in range(len(names)) if len(i50) and valid[i50[0], k]}
    return {"ap_per_iou": per_iou, "ap50": per_iou[float(thrs[i50[0]])] if len(i50) else None,
            "map": float(np.mean(list(per_iou.values()))), "ap50_per_class": per_class, **counts}


# ------------------------------------------------------------------------------------- per domain
def by_domain(images: Sequence[Mapping]) -> dict[str, list]:
    """The checked images grouped by domain (data segment), in input order."""
    out: dict[str, list] = {}
    for im in _images(images):
        out.setdefault(im["domain"], []).append(im)
    return out


def per_domain(images: Sequence[Mapping], **kwargs) -> dict[str, dict]:
    """:func:`average_precision` of every domain (data segment) separately; ``kwargs`` go to it."""
    return {d: average_precision(ims, **kwargs) for d, ims in sorted(by_domain(images).items())}


def _mean(values) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def domain_table(methods: Mapping[str, Sequence[Mapping]], seen: Sequence[str], unseen: Sequence[str] = (),
                 *, metric: str = "ap50", **kwargs) -> list[dict]:
    """Rows of the paper's Table II: per method (name -> its detections on the test images), the value of
    ``metric`` (``"ap50"`` or ``"map"``) per seen and per unseen domain and the two averages.

    Each row: ``{"method", "seen": {domain: value}, "seen_avg", "unseen": {...}, "unseen_avg"}``. An
    average is the plain mean of the domain values (as in the paper), over domains whose value is defined
    (a domain without images or without lesions is ``nan``). A domain present in the images but in
    neither list is an error, so no data is silently left out.
    """
    if metric not in ("ap50", "map"):
        raise ValueError(f"metric must be 'ap50' or 'map', got {metric!r}")
    listed = set(seen) | set(unseen)
    rows = []
    for name, images in methods.items():
        by_dom = by_domain(images)
        stray = sorted(set(by_dom) - listed)
        if stray:
            raise ValueError(f"method {name!r}: domains {stray} are neither seen nor unseen")
        value = {d: (average_precision(by_dom[d], **kwargs)[metric] if d in by_dom else math.nan) for d in listed}
        row = {"method": name}
        for group, doms in (("seen", seen), ("unseen", unseen)):
            row[group] = {d: value[d] for d in doms}
            row[f"{group}_avg"] = _mean(row[group].values())
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- FROC
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of x_min, y_min, x_max, y_max boxes (continuous coordinates)."""
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _true_positives(im: dict, iou_threshold: float, class_agnostic: bool) -> np.ndarray:
    """Per detection (in input order): True if, taken in decreasing score, it matches a still unmatched
    ground truth (best IoU >= threshold, same class unless ``class_agnostic``)."""
    tp = np.zeros(len(im["boxes"]), bool)
    if not len(im["gt_boxes"]) or not len(im["boxes"]):
        return tp
    iou = _iou(im["boxes"], im["gt_boxes"])
    if not class_agnostic:
        iou = np.where(np.equal.outer(np.array(im["classes"], object), np.array(im["gt_classes"], object)), iou, -1)
    free = np.ones(len(im["gt_boxes"]), bool)
    for d in np.argsort(-im["scores"], kind="mergesort"):
        cand = np.where(free, iou[d], -1.0)
        g = int(np.argmax(cand))
        if cand[g] >= iou_threshold:
            tp[d], free[g] = True, False
    return tp


def froc(images: Sequence[Mapping], *, fps_per_image: Sequence[float] = FROC_FPS_PER_IMAGE,
         iou_threshold: float = 0.5, class_agnostic: bool = True) -> dict:
    """FROC: lesion-level sensitivity against mean false positives per image, over all images.

    Every distinct score is a threshold; at each, sensitivity = found lesions / all lesions and FPs per
    image = unmatched detections / number of images. The sensitivity at a rate ``f`` is the highest one
    among thresholds with at most ``f`` FPs per image (the curve is a staircase; a rate beyond the curve's
    last point takes its last sensitivity, and ``max_fps_per_image`` says how far the curve goes).
    Returns ``{"fps_per_image", "sensitivity" (one per rate), "mean_sensitivity" (their mean, the
    CAMELYON-style summary), "curve": {"fps_per_image", "sensitivity", "threshold"}, "max_fps_per_image",
    "n_images", "n_lesions"}``. Sensitivities are ``nan`` without lesions.
    """
    ims = _images(images)
    n_img, n_les = len(ims), sum(len(im["gt_boxes"]) for im in ims)
    scores = np.concatenate([im["scores"] for im in ims] + [np.zeros(0)])
    tp = np.concatenate([_true_positives(im, iou_threshold, class_agnostic) for im in ims] + [np.zeros(0, bool)])
    order = np.argsort(-scores, kind="mergesort")
    scores, tp = scores[order], tp[order]
    last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)  # end of a tie group
    fpi = np.r_[0.0, np.cumsum(~tp)[last] / max(n_img, 1)]
    sens = np.r_[0.0, np.cumsum(tp)[last] / n_les] if n_les else np.full(int(last.sum()) + 1, math.nan)
    at = [float(sens[fpi <= f].max()) if n_les else math.nan for f in fps_per_image]
    return {"fps_per_image": [float(f) for f in fps_per_image], "sensitivity": at,
            "mean_sensitivity": float(np.mean(at)) if n_les else math.nan,
            "curve": {"fps_per_image": fpi.tolist(), "sensitivity": sens.tolist(),
                      "threshold": [math.inf] + scores[last].tolist()},
            "max_fps_per_image": float(fpi[-1]), "n_images": n_img, "n_lesions": n_les}
