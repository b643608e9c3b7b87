"""``--stage density``: non-dense (A/B) vs dense (C/D) on whole images resized to ``density.input_size``,
on the pre-trained ResNet-50 (MSVCL v2 sections III-C, IV-B). README, "BI-RADS and density".

"The same augmentation is applied to the CC and MLO of one breast": training reads the breast-level pair
records (``mammodg build-pairs``, ``density.pairs_dir``), which hold both views of a breast in one record;
both views (own style) get one flip/zoom draw, seeded by (seed, sample number), and go into the same batch
as two samples (``batch_size / 2`` breasts per batch). A breast with one view gives it once (the second
slot has sample weight 0). Evaluation and export are per image, on the image records.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mammodg.augment.downstream import DENSITY_CLASSES
from mammodg.config import TrainConfig
from mammodg.stages.downstream import count_labels, downstream_model, init_backbone, labelled_stream, sgd, validator
from mammodg.train import Task

CLASSES = len(DENSITY_CLASSES)


def pairs_dir(cfg: TrainConfig) -> Path:
    """The breast pair records, or an error naming the command that builds them."""
    from mammodg.records.writer import INDEX_NAME

    out = Path(cfg.density.pairs_dir or Path(cfg.resolved_run_dir()).parent / "pairs")
    if not (out / INDEX_NAME).is_file():
        raise FileNotFoundError(f"density.pairs_dir: {out / INDEX_NAME} not found; build it with "
                                f"`mammodg build-pairs --data {cfg.data_dir} --out {out}`")
    return out


def breast_views(raw, cfg: TrainConfig):
    """A serialized pair record -> ``{"views": uint16 (2, h, w, 1) CC and MLO in their own style (a single view
    repeated), "weight": (2,), "label", "patient"}``."""
    import tensorflow as tf

    from mammodg.augment.downstream import density_index
    from mammodg.records.pairs import parse_pair

    r = parse_pair(raw)
    n_styles, n_views = tf.size(r["styles"]), tf.size(r["views"])
    second = tf.minimum(n_views - 1, 1) * n_styles  # the MLO's own style, or the only view again
    decode = lambda k: tf.io.decode_png(r["images"][k], channels=1, dtype=tf.uint16)  # noqa: E731
    h, w = r["height"], r["width"]
    views = tf.stack([tf.reshape(decode(0), [h, w, 1]), tf.reshape(decode(second), [h, w, 1])])
    weight = tf.stack([1.0, tf.cast(n_views > 1, tf.float32)])
    return {"views": views, "weight": weight, "label": density_index(r["density"]), "patient": r["patient"]}


def augment_breast(i, b, cfg: TrainConfig):
    """Sample ``i`` of the stream: both views of breast ``b`` (:func:`breast_views`) as density inputs with
    one flip/zoom draw seeded by (seed, i)."""
    import tensorflow as tf

    from mammodg.augment.downstream import density_input, flip_scale

    c = cfg.density
    x = tf.map_fn(lambda v: density_input(v, c.input_size, cfg.target_mean), b["views"],
                  fn_output_signature=tf.TensorSpec([*c.input_size, 1], tf.float32))
    x = flip_scale(x, tf.stack([tf.cast(cfg.seed, tf.int64), i]), flip=c.flip, scale_range=c.scale_range,
                   fill_value=cfg.target_mean)
    return {"x": x, "y": tf.fill([2], b["label"]), "weight": b["weight"], "patient": b["patient"]}


def density_samples(cfg: TrainConfig, start: int = 0):
    """Infinite augmented breasts ``{"x": (2, *input_size, 1), "y": (2,), "weight": (2,), "patient"}`` of
    the labelled pair records, numbered from ``start`` (:func:`augment_breast`)."""
    import tensorflow as tf

    ds = labelled_stream(cfg, pairs_dir(cfg), start).map(lambda raw: breast_views(raw, cfg),
                                                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(start, np.iinfo(np.int64).max), ds.filter(lambda b: b["label"] >= 0))
    return ds.map(lambda i, b: augment_breast(i, b, cfg), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def density_batches(cfg: TrainConfig, start_step: int = 0):
    """Training batches ``(x, y, sample_weight)`` of ``batch_size`` images: ``batch_size / 2`` breasts."""
    import tensorflow as tf

    breasts = max(1, cfg.batch_size // 2)
    ds = density_samples(cfg, start_step * breasts).batch(breasts, drop_remainder=True)
    flat = lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))  # noqa: E731  (b, 2, ...) -> (2b, ...)
    return ds.map(lambda s: (flat(s["x"]), flat(s["y"]), flat(s["weight"]))).prefetch(tf.data.AUTOTUNE)


def density_predictions(model, cfg: TrainConfig, split: str, data_dir=None, max_batches: int = 0):
    """(probabilities (n, 2), labels (n,), segments (n,)) of every image of a split with a known density."""
    import tensorflow as tf

    from mammodg.augment.downstream import density_index, density_input
    from mammodg.models.predict import class_probabilities
    from mammodg.records.reader import all_shards, load_index
    from mammodg.records.schema import parse

    data_dir = data_dir or cfg.data_dir
    files = sorted(all_shards(load_index(data_dir), data_dir, split))

    def decode(raw):
        r = parse(raw)
        return density_input(r["image"], cfg.density.input_size, cfg.target_mean), density_index(r["density"]), r["data_segment"]

    ds = tf.data.TFRecordDataset(files).map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda x, y, s: y >= 0).batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)
    try:
        return class_probabilities(model, ds, max_batches)
    except ValueError:  # no image with a known density
        return np.zeros((0, CLASSES)), np.zeros(0, int), np.zeros(0, str)


def build_density_model(cfg: TrainConfig):
    return downstream_model(cfg.density, (*cfg.density.input_size, 1), CLASSES, "density_classifier")


def _density_labels(raw):
    """raw pair record -> (patient, density class (1,)), without decoding the images."""
    import tensorflow as tf

    from mammodg.augment.downstream import density_index
    from mammodg.records.pairs import parse_pair

    r = parse_pair(raw)
    return r["patient"], tf.reshape(density_index(r["density"]), [1])


def density_task(cfg: TrainConfig) -> Task:
    import keras

    from mammodg.records.reader import all_shards, load_index

    c, pairs = cfg.density, pairs_dir(cfg)
    summary = count_labels(_density_labels, sorted(all_shards(load_index(pairs), pairs, cfg.train_split)),
                           cfg.label_fraction, CLASSES, "breasts with a known density")
    print(f"density training breasts per class {dict(zip(DENSITY_CLASSES, summary['samples_per_class']))} from "
          f"{summary['kept_patients']}/{summary['patients']} patients (label_fraction {cfg.label_fraction})", flush=True)
    return Task(
        build_model=lambda: build_density_model(cfg),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batches=lambda start: density_batches(cfg, start),
        validate=validator(lambda m: density_predictions(m, cfg, cfg.val_split, max_batches=cfg.val_max_batches)),
        learning_rate=cfg.learning_rate, after_build=init_backbone(c, (*c.input_size, 1)), optimizer=sgd(c, cfg.learning_rate))


def run(cfg: TrainConfig):
    from mammodg.stages import train_and_export

    return train_and_export(cfg, density_task(cfg))
