"""``--stage patch``: 5-class patch pre-training of the VGG-like backbone (periodic-sampling paper, A.3).

Classes (A.2, :data:`mammodg.augment.patches.PATCH_CLASSES`): 0 healthy tissue, then benign / malignant
mass, benign / malignant calcification. Samples are (record, lesion index) pairs: a record gives one per
lesion box and, when labelled 0, one healthy patch (:mod:`mammodg.augment.patches`); batches take the
classes in turn (A.3.2 balances labels within a batch; :func:`mammodg.sampling.indexed.patch_batches`).
Training patches are jittered and augmented (``patch.augment``); validation is one fixed, centred set.
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
    """Infinite training batches of (patch, class), balanced over the 5 patch classes, jittered and augmented
    (``patch.augment``); logs the class counts and the label-1 images without boxes (no patch from them)."""
    from mammodg.augment.patches import PATCH_CLASSES, affine_ranges, patch_decoder
    from mammodg.sampling.indexed import patch_batches as balanced

    decode = patch_decoder(patch_size=cfg.patch.patch_size, target_mean=cfg.target_mean, seed=cfg.seed,
                           jitter=cfg.patch.jitter, augment=affine_ranges(cfg.patch.augment))
    ds, census = balanced(cfg.data_dir, decode, split=cfg.train_split, seed=cfg.seed, batch_size=cfg.batch_size,
                          start_step=start_step, shuffle_budget=cfg.shuffle_budget)
    missing = [name for name, n in census["counts"].items() if n == 0]
    print(f"patch samples of split {cfg.train_split!r}: {census['counts']}; {census['unboxed_malignant']} label-1 "
          "image(s) without boxes give no patch (classifier only)", flush=True)
    if missing:
        print(f"no {', '.join(missing)} sample in split {cfg.train_split!r}: batches balance over the "
              f"{len(PATCH_CLASSES) - len(missing)} classes present", flush=True)
    return ds


def validation_patches(cfg: TrainConfig):
    """The fixed validation set: every patch sample of the validation split once (one per lesion box, one
    healthy per label-0 image), centred, never augmented, seeded per sample: (patch, class, "")."""
    import tensorflow as tf

    from mammodg.augment.patches import patch_decoder
    from mammodg.sampling.indexed import patch_split

    decode = patch_decoder(patch_size=cfg.patch.patch_size, target_mean=cfg.target_mean, seed=cfg.seed + 99, jitter=0.0)
    ds = patch_split(cfg.data_dir, decode, split=cfg.val_split)
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
