"""``--stage matching``: CC/MLO mass matching with a siamese embedding and the max-margin contrastive loss
(MSVCL v2 section III-C-2, eq. (3); README "Mass matching"). Inputs: :mod:`mammodg.augment.matching_pairs`.

The embedding of an ROI (:func:`mammodg.augment.matching_pairs.build_matcher`) is the (contrastive)
backbone's pooled features of its 224x224 crop joined with its geometric features (ROI-to-nipple and
ROI-to-chest-wall distance, ROI size), through a two-layer head. A pair
matches when ``D < margin / 2``, i.e. ``match_score = clip(1 - D / margin, 0, 1) > 0.5`` (a fixed threshold:
eq. (3) pulls matches to D = 0 and pushes the rest past ``margin``). Validation: eq. (3) on the validation
pairs (the monitor) and the matching accuracy at that threshold.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from mammodg.augment.matching_pairs import build_matcher, pair_outputs
from mammodg.config import ConfigError, TrainConfig
from mammodg.losses import max_margin_contrastive
from mammodg.train import Task

@keras.saving.register_keras_serializable("mammodg")
class MaxMarginLoss(keras.losses.Loss):
    """Eq. (3) on a siamese output (b, 2, d): the CC and the MLO embedding of each pair; ``y_true`` is Y."""

    def __init__(self, margin: float = 10.0, name: str = "max_margin_contrastive", **kwargs):
        super().__init__(name=name, **kwargs)
        self.margin = margin

    def call(self, y_true, y_pred):
        return max_margin_contrastive(y_pred[:, 0], y_pred[:, 1], y_true, self.margin)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


def check(cfg: TrainConfig) -> None:
    m = cfg.matching
    if m.roi_size < 32 or m.margin <= 0 or not 0 < m.iou_threshold <= 1 or m.enlarge < 0:
        raise ConfigError("matching: roi_size must be >= 32, margin > 0, iou_threshold in (0, 1], enlarge >= 0")
    if m.backbone == "tiny" and m.backbone_from:
        raise ConfigError("matching: the tiny backbone takes no backbone_from")
    if m.backbone_from:
        from mammodg.models.resnet import run_encoder

        try:
            run_encoder(m.backbone_from)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"matching.{e}") from None


def matching_data(cfg: TrainConfig, split: str, run_dir=None) -> dict:
    """The candidate set of a split (:func:`mammodg.augment.matching_pairs.candidate_set`): a detection run's
    cached detections, or the stand-in candidates seeded by (seed, split)."""
    import zlib

    from mammodg.augment import matching_pairs as mp

    m = cfg.matching
    found = mp.breasts(cfg.data_dir, split, m.lesion_classes)
    if split == cfg.train_split and cfg.label_fraction < 1.0:
        found = kept_breasts(found, cfg.data_dir, split, cfg.label_fraction)
    views = [b[v] for b in found for v in mp.VIEWS]
    if m.detection_run:
        cache = Path(run_dir or cfg.resolved_run_dir()) / f"detections_{split}.json"
        cands = mp.detection_candidates(m.detection_run, views, cache, m.max_candidates)
    else:
        rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode())])
        cands = [mp.standin_candidates(v["image"], v["gt_boxes"], rng, m.standin_false_positives) for v in views]
    return mp.candidate_set(found, cands, m)


def kept_breasts(found: list[dict], data_dir, split: str, fraction: float) -> list[dict]:
    """The breasts of ``found`` whose patient ``label_fraction`` keeps (the records' ``patient`` field, matched
    through the CC image's ``image_id``)."""
    import tensorflow as tf

    from mammodg.records.reader import all_shards, load_index
    from mammodg.records.schema import parse
    from mammodg.sampling.label_fraction import kept_patients

    owner = {}
    for raw in tf.data.TFRecordDataset(sorted(all_shards(load_index(data_dir), data_dir, split))):
        r = parse(raw, decode_image=False)
        owner[r["image_id"].numpy().decode()] = r["patient"].numpy().decode()
    kept = kept_patients(owner.values(), fraction)
    out = [b for b in found if owner[b["CC"]["image_id"]] in kept]
    print(f"matching: label_fraction {fraction} keeps {len(out)}/{len(found)} breasts of "
          f"{len(kept)}/{len(set(owner.values()))} patients", flush=True)
    return out


def pair_distances(model, cfg: TrainConfig, data: dict, batch: int = 64) -> np.ndarray:
    """Embedding distance of every pair of ``data``."""
    out = [pair_outputs(model, cfg, data["rois"][data["a"][i:i + batch]], data["geom"][data["a"][i:i + batch]],
                        data["rois"][data["b"][i:i + batch]], data["geom"][data["b"][i:i + batch]])["distance"]
           for i in range(0, len(data["y"]), batch)]
    return np.concatenate([keras.ops.convert_to_numpy(d) for d in out]) if out else np.zeros(0)


def pair_scores(d: np.ndarray, y: np.ndarray, margin: float) -> dict:
    """Eq. (3) from distances (as :func:`max_margin_contrastive` computes it) and the accuracy at D < m / 2."""
    y = y.astype(bool)
    pred = d < margin / 2
    per = np.where(y, d ** 2, np.maximum(margin - d, 0) ** 2)
    recall = lambda sel: float((pred[sel] == y[sel]).mean()) if sel.any() else None  # noqa: E731
    return {"loss": float(per.sum() / (2 * max(len(d), 1))), "accuracy": float((pred == y).mean()) if len(d) else None,
            "positive_accuracy": recall(y), "negative_accuracy": recall(~y), "pairs": int(len(d)),
            "positives": int(y.sum())}


def domain_scores(d: np.ndarray, data: dict, margin: float) -> dict:
    """:func:`pair_scores` per domain of a candidate set's pairs (a pair's domain: its CC image's data segment)."""
    owner = np.empty(len(data["rois"]), object)
    for im in data["images"]:
        owner[im["rois"]] = im["domain"]
    doms = owner[data["a"]].astype(str)
    return {str(x): pair_scores(d[doms == x], data["y"][doms == x], margin) for x in np.unique(doms)}


def _validate(cfg: TrainConfig):
    data = matching_data(cfg, cfg.val_split)
    if not len(data["y"]):
        raise ValueError(f"validation split {cfg.val_split!r} of {cfg.data_dir} has no CC/MLO candidate pair")

    def validate(model):
        s = pair_scores(pair_distances(model, cfg, data), data["y"], cfg.matching.margin)
        return {"global": {k: v for k, v in s.items() if k not in ("pairs", "positives")}, "monitor": s["loss"]}

    return validate


def matching_task(cfg: TrainConfig) -> Task:
    from mammodg.augment.matching_pairs import pair_dataset

    m = cfg.matching
    data = matching_data(cfg, cfg.train_split)
    if not len(data["y"]):
        kept = f" at label_fraction {cfg.label_fraction}" if cfg.label_fraction < 1 else ""
        raise ValueError(f"train split {cfg.train_split!r} of {cfg.data_dir} has no CC/MLO candidate pair{kept}")
    print(f"matching: {len(data['y'])} training pairs ({int(data['y'].sum())} matches) from "
          f"{len(data['images']) // 2} breasts", flush=True)
    return Task(
        build_model=lambda: build_matcher(cfg), loss=MaxMarginLoss(m.margin),
        batches=lambda start: pair_dataset(data, cfg.seed + start, cfg.batch_size, m.flip),
        validate=_validate(cfg), learning_rate=cfg.learning_rate,
        optimizer=lambda **kw: keras.optimizers.SGD(cfg.learning_rate, momentum=m.momentum, weight_decay=m.weight_decay,
                                                    global_clipnorm=m.clipnorm or None, **kw))


def run(cfg: TrainConfig):
    from mammodg.stages import train_and_export

    check(cfg)
    return train_and_export(cfg, matching_task(cfg))
