"""``--stage birads``: 5 BI-RADS classes (2-3, 4A, 4B, 4C, 5) of lesion ROI crops on the pre-trained
ResNet-50 (MSVCL v2 sections III-C, IV-B). README, "BI-RADS and density".

Samples: every rated mass box of the image records (:func:`mammodg.augment.downstream.lesion_labels`: the
box's own BI-RADS, else the image's), cropped square around the box (long side x 1.2) from the stored image
and resized to ``birads.crop_size``; random flips and zoom per crop. The labelled training patients are
subsampled by ``label_fraction`` (:func:`mammodg.sampling.label_fraction.filter_records`).

The helpers shared with ``--stage density`` live here: the model (:func:`downstream_model`), SGD
(:func:`sgd`), the labelled record stream (:func:`labelled_stream`) and validation (:func:`validator`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mammodg.augment.downstream import BIRADS_CLASSES
from mammodg.config import TrainConfig
from mammodg.train import Task

CLASSES = len(BIRADS_CLASSES)


# ------------------------------------------------------------------------- shared with --stage density
def downstream_model(c, input_shape, classes: int, name: str):
    """image -> backbone (ResNet-50 C5, or the tiny test backbone) -> global average pool -> class logits."""
    import keras

    from mammodg import models
    from mammodg.models import fcos  # noqa: F401  (registers the feature backbones)

    features = models.build("fcos_tiny_features" if c.backbone == "tiny" else "fcos_resnet50_features",
                            input_shape=tuple(input_shape))
    image = keras.Input(tuple(input_shape), name="image")
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features(image)["c5"])
    return keras.Model(image, keras.layers.Dense(classes, name="logits")(pooled), name=name)


def init_backbone(c, input_shape):
    """``after_build``: load the contrastive run ``backbone_from``'s ``backbone.weights.h5`` into the model's
    backbone (through :func:`mammodg.models.fcos.resnet50_features`, as detection does); random without it."""
    def init(model):
        if not c.backbone_from:
            return
        if c.backbone != "resnet50":
            raise ValueError(f"backbone_from needs backbone: resnet50, got {c.backbone!r}")
        from mammodg.models.fcos import resnet50_features

        path = Path(c.backbone_from) / "backbone.weights.h5"
        if not path.is_file():
            raise FileNotFoundError(f"backbone_from: {path} not found (train it with `mammodg train --stage contrastive`)")
        loaded = resnet50_features(tuple(input_shape), backbone_weights=str(path))
        model.get_layer("backbone_features").set_weights(loaded.get_weights())
        print(f"backbone initialised from {path}", flush=True)

    return init


def sgd(c, learning_rate: float):
    """SGD with momentum and weight decay (section IV-B), taking the trainer's EMA keywords."""
    import keras

    return lambda **kw: keras.optimizers.SGD(learning_rate, momentum=c.momentum, weight_decay=c.weight_decay, **kw)


def labelled_stream(cfg: TrainConfig, data_dir, start: int = 0):
    """Infinite serialized records of the training split of ``data_dir`` sampled by ``cfg.strategy`` from
    record ``start``, keeping only the patients ``cfg.label_fraction`` keeps."""
    from mammodg.records.reader import load_index
    from mammodg.sampling.label_fraction import filter_records
    from mammodg.sampling.streams import make_plan, serialized_stream

    plan = make_plan(load_index(data_dir), data_dir, cfg.train_split, cfg.strategy, cfg.seed)
    ds = serialized_stream(plan, seed=cfg.seed, start=start, shuffle_budget=cfg.shuffle_budget)
    return filter_records(ds, cfg.label_fraction)


def count_labels(labels_of, files, fraction: float, classes: int, what: str) -> dict:
    """Class counts of the training samples the kept patients give (``labels_of(raw) -> (patient, labels)``);
    refuses a stream left without any sample (it would wait forever)."""
    import tensorflow as tf

    from mammodg.sampling.label_fraction import kept_patients

    rows = [(p.numpy().decode(), y.numpy()) for p, y in tf.data.TFRecordDataset(files).map(labels_of)]
    kept = kept_patients([p for p, _ in rows], fraction)
    counts = np.bincount(np.concatenate([y[y >= 0] for p, y in rows if p in kept] or [np.zeros(0, int)]),
                         minlength=classes).tolist()
    if not sum(counts):
        raise ValueError(f"no {what} to train on in {len(files)} shard(s) at label_fraction {fraction} "
                         f"({len(kept)} of {len({p for p, _ in rows})} patients kept)")
    return {"patients": len({p for p, _ in rows}), "kept_patients": len(kept), "samples_per_class": counts}


def validator(predict, monitor_name: str = "cross_entropy"):
    """Validation: accuracy and cross-entropy of ``predict(model) -> (probs, y, segments)``, globally and per
    data segment; monitor: the global cross-entropy."""
    def scores(p, y):
        return {"accuracy": float((p.argmax(1) == y).mean()),
                "cross_entropy": float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1.0)).mean())}

    def validate(model):
        p, y, segs = predict(model)
        if not len(y):
            raise ValueError("the validation split has no labelled sample")
        out = {"global": scores(p, y), "segments": {str(s): scores(p[segs == s], y[segs == s]) for s in np.unique(segs)}}
        out["monitor"] = out["global"][monitor_name]
        return out

    return validate


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
