"""``--stage matching``: CC/MLO mass matching with a siamese embedding and the max-margin contrastive loss
(MSVCL v2 section III-C-2, eq. (3); README "Mass matching"). Inputs: :mod:`mammodg.augment.matching_pairs`.

The embedding of an ROI is the (contrastive) backbone's pooled features of its 224x224 crop joined with its
geometric features (ROI-to-nipple, ROI-to-chest-wall distance, ROI size), through a two-layer head. A pair
matches when ``D < margin / 2``, i.e. ``match_score = clip(1 - D / margin, 0, 1) > 0.5`` (a fixed threshold:
eq. (3) pulls matches to D = 0 and pushes the rest past ``margin``). Validation: eq. (3) on the validation
pairs (the monitor) and the matching accuracy at that threshold.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from mammodg.config import ConfigError, TrainConfig
from mammodg.losses import max_margin_contrastive
from mammodg.train import Task

INPUTS = ("roi_cc", "geom_cc", "roi_mlo", "geom_mlo")


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
    if m.backbone_from and not (Path(m.backbone_from) / "backbone.weights.h5").is_file():
        raise FileNotFoundError(f"matching.backbone_from: {Path(m.backbone_from) / 'backbone.weights.h5'} not found; "
                                "train it with `mammodg train --stage contrastive`")


def build_matcher(cfg: TrainConfig):
    """Siamese model ``{roi_cc, geom_cc, roi_mlo, geom_mlo}`` -> (b, 2, embedding_dim); one shared ``embedding``
    sub-model (backbone from ``matching.backbone_from`` through the FCOS feature loader, or random)."""
    from mammodg import models
    from mammodg.models import fcos  # noqa: F401  (registers the feature extractors)

    m, s = cfg.matching, cfg.matching.roi_size
    if m.backbone == "tiny":
        features = models.build("fcos_tiny_features", input_shape=(s, s, 1), width=m.backbone_width)
    else:
        weights = str(Path(m.backbone_from) / "backbone.weights.h5") if m.backbone_from else None
        features = models.build("fcos_resnet50_features", input_shape=(s, s, 1), backbone_weights=weights)
    roi, geom = keras.Input((s, s, 1), name="roi"), keras.Input((3,), name="geom")
    h = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(features(roi)["c5"]), geom])
    h = keras.layers.Dense(m.hidden_dim, activation="relu")(h)
    embed = keras.Model([roi, geom], keras.layers.Dense(m.embedding_dim)(h), name="embedding")
    x = {k: keras.Input((s, s, 1) if k.startswith("roi") else (3,), name=k) for k in INPUTS}
    pair = [embed([x["roi_cc"], x["geom_cc"]]), embed([x["roi_mlo"], x["geom_mlo"]])]
    return keras.Model(x, keras.ops.stack(pair, axis=1), name="matcher")


def load_matcher(run: Path, cfg: TrainConfig):
    model = build_matcher(cfg)
    best = Path(run) / "best.weights.h5"
    if not best.is_file():
        raise FileNotFoundError(f"{best} not found: train the run first (mammodg train --stage matching)")
    model.load_weights(best)
    return model


def match_score(distance, margin: float):
    """Match score in [0, 1] of an embedding distance: ``1 - D / margin`` clipped; > 0.5 means D < margin / 2."""
    return keras.ops.clip(1.0 - distance / margin, 0.0, 1.0)


def pair_outputs(model, cfg: TrainConfig, roi_cc, geom_cc, roi_mlo, geom_mlo) -> dict:
    """``distance`` and ``match_score`` of CC/MLO ROI pairs given as stored uint16 crops + geometric features."""
    from mammodg.augment.matching_pairs import roi_inputs

    embed, geom = model.get_layer("embedding"), lambda g: keras.ops.convert_to_tensor(g, "float32")
    f1 = embed([roi_inputs(roi_cc, cfg.target_mean), geom(geom_cc)], training=False)
    f2 = embed([roi_inputs(roi_mlo, cfg.target_mean), geom(geom_mlo)], training=False)
    d = keras.ops.sqrt(keras.ops.maximum(keras.ops.sum(keras.ops.square(f1 - f2), axis=-1), 1e-12))
    return {"distance": d, "match_score": match_score(d, cfg.matching.margin)}


def matching_data(cfg: TrainConfig, split: str, run_dir=None) -> dict:
    """The candidate set of a split (:func:`mammodg.augment.matching_pairs.candidate_set`): a detection run's
    cached detections, or the stand-in candidates seeded by (seed, split)."""
    import zlib

    from mammodg.augment import matching_pairs as mp

    m = cfg.matching
    found = mp.breasts(cfg.data_dir, split, m.lesion_classes)
    views = [b[v] for b in found for v in mp.VIEWS]
    if m.detection_run:
        cache = Path(run_dir or cfg.resolved_run_dir()) / f"detections_{split}.json"
        cands = mp.detection_candidates(m.detection_run, views, cache, m.max_candidates)
    else:
        rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode())])
        cands = [mp.standin_candidates(v["image"], v["gt_boxes"], rng, m.standin_false_positives) for v in views]
    return mp.candidate_set(found, cands, m)


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
            "positive_accuracy": recall(y), "negative_accuracy": recall(~y), "pairs": int(len(d)), "positives": int(y.sum())}


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
        raise ValueError(f"train split {cfg.train_split!r} of {cfg.data_dir} has no CC/MLO candidate pair")
    print(f"matching: {len(data['y'])} training pairs ({int(data['y'].sum())} matches) from "
          f"{len(data['images']) // 2} breasts", flush=True)
    return Task(
        build_model=lambda: build_matcher(cfg), loss=MaxMarginLoss(m.margin),
        batches=lambda start: pair_dataset(data, cfg.target_mean, cfg.seed + start, cfg.batch_size),
        validate=_validate(cfg), learning_rate=cfg.learning_rate,
        optimizer=lambda **kw: keras.optimizers.SGD(cfg.learning_rate, momentum=m.momentum,
                                                    weight_decay=m.weight_decay, **kw))


def run(cfg: TrainConfig):
    from mammodg.stages import train_and_export

    check(cfg)
    return train_and_export(cfg, matching_task(cfg))
