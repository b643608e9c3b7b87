"""Periodic-sampling paper stages: ``patch`` (A.3: 5-class patch pre-training) and ``classifier``
(section 3.1.2: full-image fine-tuning from the patch backbone). Each is a short recipe over the
shared trainer.

Patch classes (A.2): 0 healthy tissue, 1 benign soft tissue lesion (mass), 2 malignant soft tissue
lesion, 3 benign calcification, 4 malignant calcification. A training record gives one patch: centred
(with jitter) on one of its lesion boxes, or, for an image without lesions, on a random breast pixel.
Patches are sampled with balanced image labels (A.3.2 balances labels within a batch).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mammodg.config import TrainConfig
from mammodg.train import Task, Trainer

PATCH_CLASSES = ("healthy", "benign_mass", "malignant_mass", "benign_calc", "malignant_calc")


def patch_decoder(patch_size: int, target_mean: float, seed: int, jitter: float = 0.25):
    """Record -> (patch (s, s, 1) float32, class int32), as a tf.data map function."""
    import tensorflow as tf

    from mammodg.records.schema import model_input, parse

    names = tf.constant(PATCH_CLASSES[1:])
    gen = tf.random.Generator.from_seed(seed)

    def decode(raw):
        r = parse(raw)
        img = model_input(r["image"], target_mean)
        boxes = r["boxes"]
        n = tf.shape(boxes)[0]
        h, w = tf.shape(img)[0], tf.shape(img)[1]

        def lesion():
            i = gen.uniform([], 0, n, dtype=tf.int32)
            b = boxes[i]
            c = tf.stack([(b[1] + b[3]) / 2, (b[0] + b[2]) / 2])
            shift = gen.uniform([2], -jitter, jitter) * patch_size
            cls = tf.argmax(tf.cast(tf.equal(names, r["lesion_class"][i]), tf.int32), output_type=tf.int32) + 1
            return c + shift, cls

        def healthy():
            inside = tf.where(r["image"][..., 0] > 0)
            j = gen.uniform([], 0, tf.maximum(tf.shape(inside)[0], 1), dtype=tf.int32)
            c = tf.cast(inside[tf.minimum(j, tf.shape(inside)[0] - 1)], tf.float32)
            return c, tf.constant(0, tf.int32)

        centre, cls = tf.cond(n > 0, lesion, healthy)
        half = patch_size // 2
        fill = img[0, w - 1, 0]  # a corner on the nipple side: outside the breast
        padded = tf.pad(img - fill, [[half, half], [half, half], [0, 0]]) + fill
        top = tf.clip_by_value(tf.cast(tf.round(centre[0]), tf.int32), 0, h - 1)
        left = tf.clip_by_value(tf.cast(tf.round(centre[1]), tf.int32), 0, w - 1)
        patch = padded[top:top + patch_size, left:left + patch_size]
        return tf.ensure_shape(patch, [patch_size, patch_size, 1]), cls

    return decode


def _predict(model, ds, max_batches: int):
    """Softmax outputs, labels and segments over an evaluation dataset."""
    import keras

    probs, ys, segs = [], [], []
    for i, (x, y, seg) in enumerate(ds):
        if max_batches and i >= max_batches:
            break
        probs.append(keras.ops.convert_to_numpy(keras.ops.softmax(model(x, training=False), axis=-1)))
        ys.append(y.numpy())
        segs.append(np.array([s.decode() for s in seg.numpy()]))
    return np.concatenate(probs), np.concatenate(ys), np.concatenate(segs)


def weighted_log_loss_multiclass(y: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Log loss with sample weights estimated on the set: the mean over present classes of their mean loss."""
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], eps, 1.0))
    return float(np.mean([nll[y == c].mean() for c in np.unique(y)]))


def image_scores(model, cfg: TrainConfig, split: str):
    """Malignancy probabilities of every image of a split: (p, y, segments)."""
    from mammodg.sampling.streams import evaluation_records

    ds = evaluation_records(cfg.data_dir, split, target_mean=cfg.target_mean, batch_size=cfg.batch_size)
    probs, y, segs = _predict(model, ds, cfg.val_max_batches)
    return probs[:, 1], y, segs


def _classifier_validation(cfg: TrainConfig):
    from mammodg.metrics.classification import auc, weighted_log_loss

    def validate(model):
        p, y, segs = image_scores(model, cfg, cfg.val_split)
        out = {"global": {"wll": weighted_log_loss(y, p), "auc": _none_nan(auc(y, p))}, "segments": {}}
        for s in np.unique(segs):
            m = segs == s
            out["segments"][str(s)] = {"wll": weighted_log_loss(y[m], p[m]), "auc": _none_nan(auc(y[m], p[m]))}
        out["monitor"] = out["global"]["wll"]
        return out

    return validate


def _none_nan(v):
    return None if v is None or v != v else float(v)


def _patch_validation(cfg: TrainConfig):
    import tensorflow as tf

    from mammodg.records.reader import all_shards, load_index

    files = sorted(all_shards(load_index(cfg.data_dir), cfg.data_dir, cfg.val_split))
    decode = patch_decoder(cfg.patch_size, cfg.target_mean, seed=cfg.seed + 99, jitter=0.0)

    def validate(model):
        ds = tf.data.TFRecordDataset(files).map(decode).map(lambda x, c: (x, c, tf.constant(""))).batch(cfg.batch_size)
        probs, y, _ = _predict(model, ds, cfg.val_max_batches)
        acc = float((probs.argmax(-1) == y).mean())
        wll = weighted_log_loss_multiclass(y, probs)
        return {"global": {"wll_lesion": wll, "accuracy": acc}, "monitor": wll}

    return validate


def patch_task(cfg: TrainConfig) -> Task:
    import keras

    from mammodg import models
    from mammodg.sampling.streams import image_batches

    def batches(start):
        ds, plan = image_batches(cfg.data_dir, cfg.train_split, strategy="balanced_labels", batch_size=cfg.batch_size,
                                 seed=cfg.seed, start_step=start, target_mean=cfg.target_mean,
                                 decode=patch_decoder(cfg.patch_size, cfg.target_mean, cfg.seed + start),
                                 shuffle_budget=cfg.shuffle_budget)
        return ds

    return Task(
        build_model=lambda: models.build("patch_classifier", input_shape=(cfg.patch_size, cfg.patch_size, 1),
                                         width=cfg.width, filters=tuple(cfg.filters)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batches=batches, validate=_patch_validation(cfg), learning_rate=cfg.learning_rate)


def classifier_task(cfg: TrainConfig) -> Task:
    import keras

    from mammodg import models
    from mammodg.records.reader import load_index
    from mammodg.sampling.streams import image_batches

    index = load_index(cfg.data_dir)
    h, w = index["image_shape"]

    def batches(start):
        ds, plan = image_batches(cfg.data_dir, cfg.train_split, strategy=cfg.strategy, batch_size=cfg.batch_size,
                                 seed=cfg.seed, start_step=start, target_mean=cfg.target_mean,
                                 shuffle_budget=cfg.shuffle_budget)
        print("sampling proportions per period:", {k: round(v, 4) for k, v in plan.proportions().items()}, flush=True)
        return ds

    def init(model):
        if cfg.init_from:
            src = Path(cfg.init_from) / "best.weights.h5"
            if not src.is_file():
                raise FileNotFoundError(f"init_from: {src} not found (train the patch stage first)")
            patch = models.build("patch_classifier", input_shape=(cfg.patch_size, cfg.patch_size, 1),
                                 width=cfg.width, filters=tuple(cfg.filters))
            patch.load_weights(src)
            models.load_backbone_weights(model, patch)
            print(f"backbone initialised from {src}", flush=True)

    return Task(
        build_model=lambda: models.build("vgg_classifier", input_shape=(h, w, 1), width=cfg.width, filters=tuple(cfg.filters)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batches=batches, validate=_classifier_validation(cfg), learning_rate=cfg.learning_rate, after_build=init)


TASKS = {"patch": patch_task, "classifier": classifier_task}


def run(cfg: TrainConfig):
    model = Trainer(cfg, cfg.resolved_run_dir(), TASKS[cfg.stage](cfg)).run()
    if cfg.export:
        out = Path(cfg.resolved_run_dir()) / "saved_model"
        model.export(str(out), format="tf_saved_model", verbose=False)
        print(f"SavedModel (best EMA weights): {out}", flush=True)
    print(f"run folder: {cfg.resolved_run_dir()}", flush=True)
    return model
