"""Inputs of ``--stage matching`` (MSVCL v2 III-C-2): the CC/MLO breasts of the image records, their candidate
ROIs, crops, geometric features and labelled CC x MLO pairs, built once in memory (ROIs are small).

Candidates are a detection run's detections (``detection_candidates``) or, without a detector, the
**stand-in** (``standin_candidates``): the ground-truth boxes plus false-positive boxes of a ground-truth
size centred on random breast pixels, overlapping no ground truth; every stand-in candidate gets a uniform
random score, so detection AP before/after matching-based rescoring stays meaningful. The pair records of
``build-pairs`` hold no boxes, so breasts are grouped here from the image records (patient + laterality),
as ``build-pairs`` groups them. The siamese matcher and its pair outputs (the ``serve_pairs`` export) sit here
too, below the stage, as the detector's do in :mod:`mammodg.augment.detection`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mammodg.augment.matching import (box_iou, geometric_features, lesion_ids_by_order, mark_detections,
                                      matching_pairs, roi_crops)

VIEWS = ("CC", "MLO")
INPUTS = ("roi_cc", "geom_cc", "roi_mlo", "geom_mlo")  # the matcher's inputs


def breasts(data_dir, split: str, lesion_classes) -> list[dict]:
    """Breasts of ``split`` with a CC and an MLO image: ``[{"CC": view, "MLO": view}]``, each view holding its
    stored ``image`` (h, w, 1), ``gt_boxes`` of ``lesion_classes``, ``domain`` and ``image_id``."""
    import tensorflow as tf

    from mammodg.records.reader import all_shards, load_index
    from mammodg.records.schema import parse

    index = load_index(data_dir)
    if split not in index["splits"]:
        return []
    groups: dict[tuple, dict] = {}
    for raw in tf.data.TFRecordDataset(sorted(all_shards(index, data_dir, split))):
        r = parse(raw)
        view, lat = r["view"].numpy().decode(), r["laterality"].numpy().decode()
        if view not in VIEWS or not lat:
            continue
        keep = np.isin([c.decode() for c in r["lesion_class"].numpy()], list(lesion_classes))
        groups.setdefault((r["patient"].numpy().decode(), lat), {}).setdefault(view, {
            "image": r["image"].numpy(), "gt_boxes": r["boxes"].numpy().reshape(-1, 4)[keep],
            "domain": r["data_segment"].numpy().decode(), "image_id": r["image_id"].numpy().decode()})
    return [g for _, g in sorted(groups.items()) if len(g) == len(VIEWS)]


def standin_candidates(image, gt_boxes, rng, n_false: int = 2, max_iou: float = 0.1):
    """(boxes, scores): the ground truth plus up to ``n_false`` boxes on breast tissue (centre on a pixel > 0)
    of a ground-truth side (x0.7-1.3; none: a tenth of the height) with IoU < ``max_iou`` to every ground truth."""
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    img = np.asarray(image)[..., 0] if np.ndim(image) == 3 else np.asarray(image)
    sides = np.sqrt((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])) if len(gt) else np.array([img.shape[0] / 10])
    ys, xs = np.nonzero(img > 0)
    fps = []
    for _ in range(20 * n_false):
        if len(fps) == n_false or not len(xs):
            break
        k, s = rng.integers(len(xs)), rng.choice(sides) * rng.uniform(0.7, 1.3)
        box = np.array([xs[k] + 0.5 - s / 2, ys[k] + 0.5 - s / 2, xs[k] + 0.5 + s / 2, ys[k] + 0.5 + s / 2])
        if not len(gt) or box_iou(box, gt).max() < max_iou:
            fps.append(box)
    boxes = np.concatenate([gt, np.reshape(fps, (-1, 4))])
    return boxes, rng.uniform(size=len(boxes))


def detection_candidates(detection_run, views: list[dict], cache: Path, max_candidates: int) -> list[tuple]:
    """(boxes, scores) of each view from a detection run's SavedModel ``serve_images``, run once: the
    detections are cached by image id in ``cache`` (JSON) and read from there afterwards."""
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [v for v in views if v["image_id"] not in saved]
    if missing:
        import tensorflow as tf

        path = Path(detection_run) / "saved_model"
        if not path.is_dir():
            raise FileNotFoundError(f"matching.detection_run: {path} not found; train and export a detection run")
        serve = tf.saved_model.load(str(path)).signatures["serve_images"]
        want = serve.structured_input_signature[1]["images"].shape[1:3]
        if not want.is_compatible_with(missing[0]["image"].shape[:2]):
            raise ValueError(f"matching.detection_run: {path} takes {want.as_list()} images, the records hold "
                             f"{list(missing[0]['image'].shape[:2])}; use the records it was trained on")
        for v in missing:
            out = {k: t.numpy()[0] for k, t in serve(images=tf.constant(v["image"][None])).items()}
            n = int(out["num_detections"])
            saved[v["image_id"]] = {"boxes": out["boxes"][:n].tolist(), "scores": out["scores"][:n].tolist()}
        from mammodg.io.atomic import atomic_write_json

        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, saved)
    out = []
    for v in views:
        d = saved[v["image_id"]]
        top = np.argsort(-np.asarray(d["scores"]), kind="stable")[:max_candidates]
        out.append((np.asarray(d["boxes"], np.float64).reshape(-1, 4)[top], np.asarray(d["scores"])[top]))
    return out


def view_rois(view: dict, boxes, name: str, size: int, enlarge: float):
    """Stored uint16 ROI crops (n, size, size, 1) of a view's ``boxes`` and their geometric features (n, 3)."""
    from mammodg.preprocess.landmarks import estimate_landmarks

    img = view["image"]
    crops = roi_crops(img, boxes, size, enlarge).numpy() if len(boxes) else np.zeros((0, size, size, img.shape[-1]))
    lm = estimate_landmarks(img, name, mask=img[..., 0] > 0)
    geom = geometric_features(boxes, lm.nipple, lm.chest_wall, img.shape[0])
    return np.clip(np.round(crops), 0, 65535).astype(np.uint16), geom


def candidate_set(breast_list: list[dict], candidates: list[tuple], m) -> dict:
    """Every breast's candidates (``candidates``: (boxes, scores) per view, CC then MLO per breast) marked
    TP/FP, cropped, with their pairs (config section ``m``): ``rois``, ``geom``, pair indices ``a`` (CC),
    ``b`` (MLO) and labels ``y``, and per image the :mod:`mammodg.metrics.detection` fields plus ``rois``
    (its ROI indices)."""
    rois, geom, a, b, y, images = [], [], [], [], [], []
    n = 0
    for k, breast in enumerate(breast_list):
        gt_of, first = [], []
        for j, name in enumerate(VIEWS):
            view, (boxes, scores) = breast[name], candidates[2 * k + j]
            crops, g = view_rois(view, boxes, name, m.roi_size, m.enlarge)
            rois.append(crops)
            geom.append(g)
            gt_of.append(mark_detections(boxes, scores, view["gt_boxes"], m.iou_threshold))
            first.append(n)
            images.append({"gt_boxes": view["gt_boxes"], "boxes": boxes, "scores": scores, "domain": view["domain"],
                           "rois": np.arange(n, n + len(boxes))})
            n += len(boxes)
        ids = lesion_ids_by_order(len(breast["CC"]["gt_boxes"]), len(breast["MLO"]["gt_boxes"]))
        ci, mj, yy = matching_pairs(*gt_of, *ids)
        a.append(ci + first[0])
        b.append(mj + first[1])
        y.append(yy)
    cat = lambda xs, shape, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(shape, dt)  # noqa: E731
    return {"rois": cat(rois, (0, m.roi_size, m.roi_size, 1), np.uint16), "geom": cat(geom, (0, 3), np.float32),
            "a": cat(a, (0,), np.int64), "b": cat(b, (0,), np.int64), "y": cat(y, (0,), np.int64), "images": images}


def roi_inputs(rois):
    """Stored uint16 ROI crops (n, s, s, 1) -> float32 model inputs: ``v`` in [0, 1] inside the breast, 0 outside.

    Not the whole-image outside constant that sets the mean to ``target_mean``: in a crop that is almost all
    breast that constant is huge (a few outside pixels carry the whole difference: about -350 for 1 outside
    pixel of 1024)."""
    from mammodg.preprocess.stored import unit_values_tf

    return unit_values_tf(rois, 0.0)


def pair_dataset(data: dict, seed: int, batch_size: int, flip: float = 0.0):
    """Infinite shuffled batches ``({"roi_cc", "geom_cc", "roi_mlo", "geom_mlo"}, y)``, positives and negatives
    drawn half and half (a breast has far more FP pairs than matches; one class only: as it comes). With
    probability ``flip`` both crops of a pair are flipped left-right together (section IV-B: augmentation
    synchronous for the paired views; the geometric features do not change under a flip)."""
    import tensorflow as tf

    rois, geom = tf.constant(data["rois"]), tf.constant(data["geom"])

    def gather(i, pair):
        a, b, y = pair
        draw = tf.random.stateless_uniform([tf.shape(a)[0], 1, 1, 1], tf.stack([tf.cast(seed, tf.int64), i]))

        def crops(idx):
            x = roi_inputs(tf.gather(rois, idx))
            return tf.where(draw < flip, tf.reverse(x, [2]), x)

        return {"roi_cc": crops(a), "geom_cc": tf.gather(geom, a), "roi_mlo": crops(b), "geom_mlo": tf.gather(geom, b)}, \
            tf.cast(y, tf.float32)

    parts = [tf.data.Dataset.from_tensor_slices((data["a"][sel], data["b"][sel], data["y"][sel])).repeat()
             .shuffle(1024, seed=seed) for sel in (data["y"] == 1, data["y"] == 0) if sel.any()]
    ds = parts[0] if len(parts) == 1 else tf.data.Dataset.sample_from_datasets(parts, [0.5, 0.5], seed=seed)
    return ds.batch(batch_size, drop_remainder=True).enumerate().map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def rescore(images: list[dict], best_match: np.ndarray, boost: float) -> list[dict]:
    """Copies of ``images`` whose detections with a strong match in the other view (``best_match`` per ROI
    > 0.5) get ``score + boost * match * (1 - score)`` (MSVCL v2 III-C-2: raise a mass's score on a match)."""
    out = []
    for im in images:
        s, mt = np.asarray(im["scores"], np.float64), best_match[im["rois"]]
        out.append({**im, "scores": np.where(mt > 0.5, s + boost * mt * (1 - s), s)})
    return out


# ---------------------------------------------------------------------------------- the siamese matcher
def build_matcher(cfg):
    """Siamese model ``{roi_cc, geom_cc, roi_mlo, geom_mlo}`` -> (b, 2, embedding_dim); one shared ``embedding``
    sub-model (backbone: the encoder of the contrastive run ``matching.backbone_from``, or random)."""
    import keras

    from mammodg.models.resnet import section_features

    m, s = cfg.matching, cfg.matching.roi_size
    features = section_features(m, (s, s, 1))
    roi, geom = keras.Input((s, s, 1), name="roi"), keras.Input((3,), name="geom")
    h = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(features(roi)["c5"]), geom])
    h = keras.layers.Dense(m.hidden_dim, activation="relu")(h)
    embed = keras.Model([roi, geom], keras.layers.Dense(m.embedding_dim)(h), name="embedding")
    x = {k: keras.Input((s, s, 1) if k.startswith("roi") else (3,), name=k) for k in INPUTS}
    pair = [embed([x["roi_cc"], x["geom_cc"]]), embed([x["roi_mlo"], x["geom_mlo"]])]
    return keras.Model(x, keras.ops.stack(pair, axis=1), name="matcher")


def load_matcher(run, cfg):
    """The matcher of a run with its best EMA weights."""
    model = build_matcher(cfg)
    best = Path(run) / "best.weights.h5"
    if not best.is_file():
        raise FileNotFoundError(f"{best} not found: train the run first (mammodg train --stage matching)")
    model.load_weights(best)
    return model


def match_score(distance, margin: float):
    """Match score in [0, 1] of an embedding distance: ``1 - D / margin`` clipped; > 0.5 means D < margin / 2."""
    import keras

    return keras.ops.clip(1.0 - distance / margin, 0.0, 1.0)


def pair_outputs(model, cfg, roi_cc, geom_cc, roi_mlo, geom_mlo) -> dict:
    """``distance`` and ``match_score`` of CC/MLO ROI pairs given as stored uint16 crops + geometric features
    (what the exported ``serve_pairs`` returns)."""
    import keras

    embed, geom = model.get_layer("embedding"), lambda g: keras.ops.convert_to_tensor(g, "float32")
    f1 = embed([roi_inputs(roi_cc), geom(geom_cc)], training=False)
    f2 = embed([roi_inputs(roi_mlo), geom(geom_mlo)], training=False)
    d = keras.ops.sqrt(keras.ops.maximum(keras.ops.sum(keras.ops.square(f1 - f2), axis=-1), 1e-12))
    return {"distance": d, "match_score": match_score(d, cfg.matching.margin)}
