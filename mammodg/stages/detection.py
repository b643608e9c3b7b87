"""``--stage detection``: FCOS mass detection on the contrastive backbone (MSVCL v2 sections III-C, IV-B;
issue 18). Model, losses and decoding: :mod:`mammodg.models.fcos`; inputs and augmentation:
:mod:`mammodg.augment.detection`; README "Detection".

Validation: AP at IoU 0.5 (pycocotools) of the validation split in stored-image pixels; the monitor is
``1 - AP50`` (lower is better), or, when the validation split holds no detected lesion, the mean number of
detections per image (all of them false positives).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mammodg.config import ConfigError, TrainConfig
from mammodg.train import Task


def backbone_file(cfg: TrainConfig) -> Path | None:
    """The contrastive run's ``backbone.weights.h5`` (``detection.backbone_from``), or None."""
    if not cfg.detection.backbone_from:
        return None
    from mammodg.models.resnet import run_encoder

    try:
        return run_encoder(cfg.detection.backbone_from)["weights"]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"detection.{e}") from None


def check(cfg: TrainConfig) -> None:
    """Config errors before any data work."""
    from mammodg.models.fcos_targets import check_levels

    d = cfg.detection
    try:
        check_levels(d.levels)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(d.input_size) != 2 or min(d.input_size) < 32:
        raise ConfigError(f"detection.input_size must be [h, w] of at least 32 pixels, got {d.input_size}")
    if d.backbone_from and d.weights:
        raise ConfigError("detection: give backbone_from (a contrastive run) or weights (ImageNet), not both")
    if d.backbone == "tiny" and (d.backbone_from or d.weights):
        raise ConfigError("detection: the tiny backbone takes no backbone_from / weights")
    if not d.lesion_classes or d.max_boxes < 1 or len(d.scale) != 2 or not 0 < d.scale[0] <= d.scale[1]:
        raise ConfigError("detection: lesion_classes must be non-empty, max_boxes >= 1, scale [low, high] > 0")


def build_detector(cfg: TrainConfig):
    """A fresh FCOS detector, its backbone from ``backbone_from`` (that run's encoder) / ``weights`` (or random)."""
    from mammodg.augment.detection import build_detector as build

    return build(cfg.detection)


def stored_shape(data_dir) -> tuple[int, int]:
    from mammodg.records.reader import load_index

    return tuple(load_index(data_dir)["image_shape"])


def detections(detector, cfg: TrainConfig, split: str, data_dir=None, max_batches: int = 0, keep_images: int = 0):
    """Per image of a split (the :mod:`mammodg.metrics.detection` input): ground truth and detections in
    stored-image pixels, ``domain`` (data segment) and ``image_id``; the first ``keep_images`` images with a
    lesion also carry their stored ``image`` (for overlays)."""
    import tensorflow as tf

    from mammodg.augment.detection import class_ids, detect, pack_targets
    from mammodg.records.schema import parse
    from mammodg.sampling.indexed import indexed_split

    d, data_dir = cfg.detection, data_dir or cfg.data_dir
    shape, names = stored_shape(data_dir), d.class_names()

    def decode(_, raw):
        r = parse(raw)
        cls = class_ids(r["lesion_class"], d.lesion_classes, d.merge_classes)
        return r["image"], pack_targets(tf.boolean_mask(r["boxes"], cls >= 0), tf.boolean_mask(cls, cls >= 0),
                                        d.max_boxes), r["data_segment"], r["image_id"]

    ds, _ = indexed_split(data_dir, decode, split=split)
    run = tf.function(lambda x: detect(detector, x, d, stored_shape=shape, target_mean=cfg.target_mean))
    out = []
    for b, (images, gt, segs, ids) in enumerate(ds.batch(cfg.batch_size)):
        if max_batches and b >= max_batches:
            break
        det = {k: v.numpy() for k, v in run(images).items()}
        for k in range(len(ids)):
            n, real = int(det["num_detections"][k]), gt[k].numpy()[gt[k].numpy()[:, 4] >= 0]
            im = {"gt_boxes": real[:, :4], "gt_classes": [names[int(c)] for c in real[:, 4]],
                  "boxes": det["boxes"][k, :n], "scores": det["scores"][k, :n],
                  "classes": [names[int(c)] for c in det["classes"][k, :n]],
                  "domain": segs[k].numpy().decode(), "image_id": ids[k].numpy().decode()}
            if len(real) and sum("image" in o for o in out) < keep_images:
                im["image"] = images[k].numpy()
            out.append(im)
    return out


def _validate(cfg: TrainConfig):
    from mammodg.metrics.detection import average_precision

    def validate(model):
        ims = detections(model.get_layer("fcos"), cfg, cfg.val_split, max_batches=cfg.val_max_batches)
        ap50 = average_precision(ims, iou_thresholds=(0.5,))["ap50"]
        per_image = float(np.mean([len(im["boxes"]) for im in ims]))
        has_gt = any(len(im["gt_boxes"]) for im in ims)
        return {"global": {"ap50": ap50 if has_gt else None, "detections_per_image": per_image},
                "monitor": 1.0 - ap50 if has_gt else per_image}

    return validate


def _image_patients(raw):
    """raw image record -> (patient, [0]): one training image, for :func:`~mammodg.stages.downstream.count_labels`."""
    from mammodg.records.schema import parse

    return parse(raw, decode_image=False)["patient"], [0]


def training_batches(cfg: TrainConfig, decode, start: int = 0):
    """Training batches of the images of the patients ``label_fraction`` keeps, mapped by ``decode``."""
    from mammodg.sampling.indexed import indexed_batches

    return indexed_batches(cfg.data_dir, decode, split=cfg.train_split, strategy=cfg.strategy, seed=cfg.seed,
                           batch_size=cfg.batch_size, start_step=start, shuffle_budget=cfg.shuffle_budget,
                           label_fraction=cfg.label_fraction)


WARMUP_STEPS, WARMUP_FACTOR = 300, 0.1


def warmup_steps(steps: int) -> int:
    """Linear warm-up length: ``WARMUP_STEPS``, at most a third of the run."""
    return max(1, min(WARMUP_STEPS, steps // 3))


def learning_rate_schedule(cfg: TrainConfig):
    """``learning_rate`` reached linearly from ``WARMUP_FACTOR`` x itself over the first :func:`warmup_steps`
    steps, then held (FCOS's warm-up; a cosine decay to ``alpha=1`` is constant): without it the first steps
    of a random head blow the loss up and short runs learn nothing or depend on the seed (README
    "Detection", "Does it learn?")."""
    import keras

    lr = cfg.learning_rate
    return keras.optimizers.schedules.CosineDecay(lr * WARMUP_FACTOR, decay_steps=1, alpha=1.0, warmup_target=lr,
                                                  warmup_steps=warmup_steps(cfg.steps))


def optimizer(cfg: TrainConfig, **kw):
    """SGD with momentum and weight decay (section IV-B) on :func:`learning_rate_schedule`; ``kw``: Keras' EMA
    keywords."""
    import keras

    d = cfg.detection
    return keras.optimizers.SGD(learning_rate_schedule(cfg), momentum=d.momentum, weight_decay=d.weight_decay, **kw)


def detection_task(cfg: TrainConfig) -> Task:
    from mammodg.augment.detection import PackedFCOSLoss, detection_decoder, packed_model
    from mammodg.records.reader import all_shards, load_index
    from mammodg.stages.downstream import count_labels

    d = cfg.detection
    files = sorted(all_shards(load_index(cfg.data_dir), cfg.data_dir, cfg.train_split))
    kept = count_labels(_image_patients, files, cfg.label_fraction, 1, "images")
    print(f"detection: {kept['samples_per_class'][0]} training images of {kept['kept_patients']}/{kept['patients']} "
          f"patients (label_fraction {cfg.label_fraction})", flush=True)
    decode = detection_decoder(d, stored_shape=stored_shape(cfg.data_dir), target_mean=cfg.target_mean,
                               seed=cfg.seed, training=True)
    return Task(
        build_model=lambda: packed_model(build_detector(cfg)),
        loss=PackedFCOSLoss(d.input_size, len(d.class_names()), tuple(d.levels)),
        batches=lambda start: training_batches(cfg, decode, start),
        validate=_validate(cfg), learning_rate=cfg.learning_rate,
        optimizer=lambda **kw: optimizer(cfg, **kw))


def run(cfg: TrainConfig):
    from mammodg.stages import train_and_export

    check(cfg)
    backbone_file(cfg)
    return train_and_export(cfg, detection_task(cfg))
