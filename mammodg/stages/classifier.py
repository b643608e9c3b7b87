"""``--stage classifier``: full-image fine-tuning of the VGG-like 2-level classifier (periodic-sampling
paper, section 3.1.2), from the patch stage's backbone (``init_from``), with segment-aware sampling
(``strategy``, Algorithms 1-2) and training augmentation (``classifier.augment``: rotation, zoom, shear,
flips; validation never augmented)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mammodg.config import TrainConfig
from mammodg.train import Task


def image_scores(model, cfg: TrainConfig, split: str):
    """Malignancy probabilities of every image of a split: (p, y, segments)."""
    from mammodg.models.predict import class_probabilities
    from mammodg.sampling.streams import evaluation_records

    ds = evaluation_records(cfg.data_dir, split, target_mean=cfg.target_mean, batch_size=cfg.batch_size)
    probs, y, segs = class_probabilities(model, ds, cfg.val_max_batches)
    return probs[:, 1], y, segs


def classifier_batches(cfg: TrainConfig, start_step: int = 0):
    """Infinite training batches (image, label) drawn by ``strategy``, augmented (``classifier.augment``) with
    draws seeded by (seed, sample index); logs the sampling proportions."""
    from mammodg.augment.patches import affine_ranges, image_decoder
    from mammodg.records.reader import load_index
    from mammodg.sampling.indexed import indexed_batches
    from mammodg.sampling.streams import make_plan

    plan = make_plan(load_index(cfg.data_dir), cfg.data_dir, cfg.train_split, cfg.strategy, cfg.seed)
    print("sampling proportions per period:", {k: round(v, 4) for k, v in plan.proportions().items()}, flush=True)
    decode = image_decoder(target_mean=cfg.target_mean, seed=cfg.seed, augment=affine_ranges(cfg.classifier.augment))
    return indexed_batches(cfg.data_dir, decode, split=cfg.train_split, strategy=cfg.strategy, seed=cfg.seed,
                           batch_size=cfg.batch_size, start_step=start_step, shuffle_budget=cfg.shuffle_budget)


def _validate(cfg: TrainConfig):
    """WLL and AUC on the validation split, globally and per data segment (monitor: global WLL)."""
    from mammodg.metrics import auc, none_if_nan, weighted_log_loss

    def scores(y, p):
        return {"wll": weighted_log_loss(y, p), "auc": none_if_nan(auc(y, p))}

    def validate(model):
        p, y, segs = image_scores(model, cfg, cfg.val_split)
        out = {"global": scores(y, p), "segments": {str(s): scores(y[segs == s], p[segs == s]) for s in np.unique(segs)}}
        out["monitor"] = out["global"]["wll"]
        return out

    return validate


def _init_from_patch_run(cfg: TrainConfig):
    """``after_build``: copy the backbone of the patch run ``classifier.init_from`` (its best weights; the
    patch model is rebuilt from that run's own config.yaml) into the model."""
    from mammodg import models
    from mammodg.config import load
    from mammodg.stages.patch import build_patch_model

    def init(model):
        if cfg.classifier.init_from:
            src = Path(cfg.classifier.init_from) / "best.weights.h5"
            if not src.is_file():
                raise FileNotFoundError(f"classifier.init_from: {src} not found; train it with "
                                        "`mammodg train --stage patch`")
            patch = build_patch_model(load(TrainConfig, src.parent / "config.yaml"))
            patch.load_weights(src)
            models.load_backbone_weights(model, patch)
            print(f"backbone initialised from {src}", flush=True)

    return init


def classifier_task(cfg: TrainConfig) -> Task:
    import keras

    from mammodg import models
    from mammodg.records.reader import load_index

    h, w = load_index(cfg.data_dir)["image_shape"]

    def batches(start):
        return classifier_batches(cfg, start)

    return Task(
        build_model=lambda: models.build("vgg_classifier", input_shape=(h, w, 1), width=cfg.vgg.width, filters=tuple(cfg.vgg.filters)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batches=batches, validate=_validate(cfg), learning_rate=cfg.learning_rate, after_build=_init_from_patch_run(cfg))


def run(cfg: TrainConfig):
    from mammodg.stages import train_and_export

    return train_and_export(cfg, classifier_task(cfg))
