"""``--stage patch``: 5-class patch pre-training of the VGG-like backbone (periodic-sampling paper, A.3).

Classes (A.2): 0 healthy tissue, then ``mammodg.io.manifest.LESION_CLASSES`` from 1 (benign / malignant
mass, benign / malignant calcification). A training record gives one patch (:func:`mammodg.augment.patch_decoder`);
records are drawn with balanced image labels (A.3.2 balances labels within a batch).
"""
from __future__ import annotations

from mammodg.config import TrainConfig
from mammodg.train import Task


def build_patch_model(cfg: TrainConfig):
    from mammodg import models

    size = cfg.patch.patch_size
    return models.build("patch_classifier", input_shape=(size, size, 1), width=cfg.vgg.width,
                        filters=tuple(cfg.vgg.filters))


def patch_batches(cfg: TrainConfig, start_step: int = 0):
    """Infinite training batches of (patch, class), records drawn with balanced image labels."""
    from mammodg.augment import patch_decoder
    from mammodg.sampling.indexed import indexed_batches

    decode = patch_decoder(patch_size=cfg.patch.patch_size, target_mean=cfg.target_mean, seed=cfg.seed)
    return indexed_batches(cfg.data_dir, decode, split=cfg.train_split, strategy="balanced_labels", seed=cfg.seed,
                           batch_size=cfg.batch_size, start_step=start_step, shuffle_budget=cfg.shuffle_budget)


def validation_patches(cfg: TrainConfig):
    """One unjittered patch of every validation image, the same at every validation: (patch, class, "")."""
    import tensorflow as tf

    from mammodg.augment import patch_decoder
    from mammodg.sampling.indexed import indexed_split

    decode = patch_decoder(patch_size=cfg.patch.patch_size, target_mean=cfg.target_mean, seed=cfg.seed + 99, jitter=0.0)
    ds, _ = indexed_split(cfg.data_dir, decode, split=cfg.val_split)
    return ds.map(lambda x, c: (x, c, tf.constant(""))).batch(cfg.batch_size)


def _validate(cfg: TrainConfig):
    from mammodg.metrics import weighted_log_loss
    from mammodg.models.predict import class_probabilities

    def validate(model):
        probs, y, _ = class_probabilities(model, validation_patches(cfg), cfg.val_max_batches)
        wll = weighted_log_loss(y, probs)
        return {"global": {"wll_lesion": wll, "accuracy": float((probs.argmax(-1) == y).mean())}, "monitor": wll}

    return validate


def patch_task(cfg: TrainConfig) -> Task:
    import keras

    return Task(build_model=lambda: build_patch_model(cfg),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                batches=lambda start: patch_batches(cfg, start), validate=_validate(cfg),
                learning_rate=cfg.learning_rate)


def run(cfg: TrainConfig):
    from mammodg.stages import train_and_export

    return train_and_export(cfg, patch_task(cfg))
