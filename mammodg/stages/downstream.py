"""Helpers the downstream stages share (``birads``, ``density``; ``count_labels`` also ``detection``; MSVCL v2
section IV-B): the model on the pre-trained backbone (:func:`downstream_model`, :func:`init_backbone`), SGD
(:func:`sgd`), the labelled record stream with ``label_fraction`` (:func:`labelled_stream`,
:func:`count_labels`) and validation (:func:`validator`)."""
from __future__ import annotations

import numpy as np

from mammodg.config import TrainConfig


def downstream_model(c, input_shape, classes: int, name: str):
    """image -> backbone (the contrastive run ``c.backbone_from``'s encoder, a ResNet-50, or the tiny test
    backbone; :func:`mammodg.models.resnet.section_features`) -> C5 global average pool -> class logits."""
    import keras

    from mammodg.models.resnet import section_features

    features = section_features(c, tuple(input_shape), load=False)  # weights: init_backbone, fresh runs only
    image = keras.Input(tuple(input_shape), name="image")
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features(image)["c5"])
    return keras.Model(image, keras.layers.Dense(classes, name="logits")(pooled), name=name)


def init_backbone(c, input_shape):
    """``after_build``: load the contrastive run ``backbone_from``'s ``backbone.weights.h5`` into the model's
    backbone, built as that run's encoder (ResNet-50 or ResNet-18 of its width); random without it."""
    def init(model):
        if not c.backbone_from:
            return
        from mammodg.models.resnet import FEATURES_NAME, section_features

        model.get_layer(FEATURES_NAME).set_weights(section_features(c, tuple(input_shape)).get_weights())
        print(f"backbone initialised from {c.backbone_from}/backbone.weights.h5", flush=True)

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
