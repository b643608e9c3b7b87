"""``--stage birads``: 5 BI-RADS classes (2-3, 4A, 4B, 4C, 5) of lesion ROI crops on the pre-trained
ResNet-50 (MSVCL v2 sections III-C, IV-B). README, "BI-RADS and density".

Samples: every rated mass box of the image records (:func:`mammodg.augment.downstream.lesion_labels`: the
box's own BI-RADS, else the image's), cropped square around the box (long side x 1.2) from the stored image
and resized to ``birads.crop_size``; random flips and zoom per crop. The labelled training patients are
subsampled by ``label_fraction`` (:func:`mammodg.sampling.label_fraction.filter_records`).

The helpers shared with ``--stage density`` live in :mod:`mammodg.stages.downstream`.
"""
from __future__ import annotations

import numpy as np

from mammodg.augment.downstream import BIRADS_CLASSES
from mammodg.config import TrainConfig
from mammodg.stages.downstream import count_labels, downstream_model, init_backbone, labelled_stream, sgd, validator
from mammodg.train import Task

CLASSES = len(BIRADS_CLASSES)


# --------------------------------------------------------------------------------------------- BI-RADS
def record_crops(raw, c, masses_only: bool = True):
    """A serialized image record -> its rated boxes' uint16 crops (n, s, s, 1), labels (n,), and the
    record's patient and data segment repeated (n,)."""
    import tensorflow as tf

    from mammodg.augment.downstream import lesion_labels, stored_roi_crops
    from mammodg.records.schema import parse

    r = parse(raw)
    keep, label = lesion_labels(r, masses_only)
    boxes = tf.boolean_mask(r["boxes"], keep)
    n = tf.shape(boxes)[0:1]
    return {"crops": stored_roi_crops(r["image"], boxes, c.crop_size, c.enlarge), "label": tf.boolean_mask(label, keep),
            "patient": tf.fill(n, r["patient"]), "segment": tf.fill(n, r["data_segment"])}


def birads_samples(cfg: TrainConfig, start: int = 0):
    """Infinite augmented training samples ``{"x": float32 (s, s, 1), "y", "patient"}``, one per rated crop,
    numbered from ``start`` (flip/zoom seeded by (seed, number))."""
    import tensorflow as tf

    from mammodg.augment.downstream import crop_model_inputs, flip_scale

    c = cfg.birads
    ds = labelled_stream(cfg, cfg.data_dir, start).map(lambda raw: record_crops(raw, c, c.masses_only),
                                                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(start, np.iinfo(np.int64).max), ds.unbatch())

    def augment(i, s):
        seed = tf.stack([tf.cast(cfg.seed, tf.int64), i])
        x = flip_scale(crop_model_inputs(s["crops"][None], cfg.target_mean), seed, flip=c.flip,
                       scale_range=c.scale_range, fill_value=cfg.target_mean)[0]
        return {"x": x, "y": s["label"], "patient": s["patient"]}

    return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def birads_batches(cfg: TrainConfig, start_step: int = 0):
    """Training batches ``(x, y)``; a resumed run starts a new, equally distributed sample sequence."""
    import tensorflow as tf

    ds = birads_samples(cfg, start_step * cfg.batch_size).map(lambda s: (s["x"], s["y"]))
    return ds.batch(cfg.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def birads_predictions(model, cfg: TrainConfig, split: str, data_dir=None, max_batches: int = 0):
    """(probabilities (n, 5), labels (n,), segments (n,)) of every rated crop of a split, no augmentation."""
    import tensorflow as tf

    from mammodg.augment.downstream import crop_model_inputs
    from mammodg.models.predict import class_probabilities
    from mammodg.records.reader import all_shards, load_index

    data_dir = data_dir or cfg.data_dir
    files = sorted(all_shards(load_index(data_dir), data_dir, split))
    c = cfg.birads
    ds = tf.data.TFRecordDataset(files).map(lambda raw: record_crops(raw, c, c.masses_only)).unbatch()
    ds = ds.batch(cfg.batch_size).map(lambda s: (crop_model_inputs(s["crops"], cfg.target_mean), s["label"], s["segment"]))
    try:
        return class_probabilities(model, ds.prefetch(tf.data.AUTOTUNE), max_batches)
    except ValueError:  # nothing to concatenate: no rated crop
        return np.zeros((0, CLASSES)), np.zeros(0, int), np.zeros(0, str)


def build_birads_model(cfg: TrainConfig):
    s = cfg.birads.crop_size
    return downstream_model(cfg.birads, (s, s, 1), CLASSES, "birads_classifier")


def birads_task(cfg: TrainConfig) -> Task:
    import keras

    from mammodg.records.reader import all_shards, load_index

    c = cfg.birads
    files = sorted(all_shards(load_index(cfg.data_dir), cfg.data_dir, cfg.train_split))

    summary = count_labels(_birads_labels(c.masses_only), files, cfg.label_fraction, CLASSES, "rated mass boxes")
    print(f"birads training crops per class {dict(zip(BIRADS_CLASSES, summary['samples_per_class']))} from {summary['kept_patients']}/{summary['patients']} patients (label_fraction {cfg.label_fraction})", flush=True)
    s = c.crop_size
    return Task(
        build_model=lambda: build_birads_model(cfg),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batches=lambda start: birads_batches(cfg, start),
        validate=validator(lambda m: birads_predictions(m, cfg, cfg.val_split, max_batches=cfg.val_max_batches)),
        learning_rate=cfg.learning_rate, after_build=init_backbone(c, (s, s, 1)), optimizer=sgd(c, cfg.learning_rate))


def _birads_labels(masses_only: bool):
    """raw record -> (patient, rated labels of its boxes), without decoding the image."""
    import tensorflow as tf

    from mammodg.augment.downstream import lesion_labels
    from mammodg.records.schema import parse

    def labels_of(raw):
        r = parse(raw, decode_image=False)
        keep, label = lesion_labels(r, masses_only)
        return r["patient"], tf.boolean_mask(label, keep)

    return labels_of


def run(cfg: TrainConfig):
    from mammodg.stages import train_and_export

    return train_and_export(cfg, birads_task(cfg))
