"""FCOS inputs (issue 18): a record -> the resized model input and its boxes in input pixels, and the
packing that lets the detector train through a plain ``model.compile(loss=...)``.

A stored (H, W) image becomes the model input (:func:`mammodg.records.schema.model_input`) resized to
``input_size`` (h, w) (bilinear, antialiased); boxes are scaled by (sx, sy) = (w / W, h / H), and a
detection maps back to stored pixels with :func:`mammodg.models.fcos.to_stored_pixels` and that scale.
Training adds a random flip and scale about the centre (:func:`mammodg.augment.geometry.random_flip_scale`),
boxes moved with the image and dropped when they leave it; the fill outside is the outside-breast constant.

Targets are packed as (M, 5) rows ``x0, y0, x1, y1, class`` (class -1: padding) and the detector's outputs
as (N, classes + 5) columns ``logits, l, t, r, b, centerness``, so that :class:`PackedFCOSLoss` is an
ordinary Keras loss of one tensor each.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from mammodg.augment.geometry import random_flip_scale


def class_ids(lesion_class, lesion_classes, merge: bool):
    """Class index of each lesion name: its position in ``lesion_classes`` (0 for all of them when
    ``merge``), -1 for a class that is not detected (e.g. calcifications in mass detection)."""
    names = tf.constant(list(lesion_classes))
    hit = tf.cast(tf.equal(lesion_class[:, None], names[None, :]), tf.int32)
    pos = tf.argmax(hit, axis=-1, output_type=tf.int32)
    found = tf.reduce_any(hit > 0, axis=-1)
    return tf.where(found, tf.zeros_like(pos) if merge else pos, -1)


def resized_input(stored, input_size, target_mean: float):
    """Stored uint16 (H, W, 1) or (B, H, W, 1) -> float32 model input resized to ``input_size`` (h, w)."""
    from mammodg.records.schema import model_input

    batched = stored.shape.rank == 4
    x = tf.map_fn(lambda s: model_input(s, target_mean), stored, fn_output_signature=tf.float32) if batched \
        else model_input(stored, target_mean)
    return tf.image.resize(x, input_size, method="bilinear", antialias=True)


def input_scale(stored_shape, input_size):
    """(sx, sy) of input pixels per stored pixel."""
    (h, w), (sh, sw) = input_size, stored_shape
    return tf.constant([w / sw, h / sh], tf.float32)


def pack_targets(boxes, classes, max_boxes: int):
    """(n, 4) boxes and (n,) classes -> (max_boxes, 5) rows, padded with class -1 (extra boxes cut)."""
    rows = tf.concat([tf.cast(boxes, tf.float32), tf.cast(classes, tf.float32)[:, None]], axis=-1)[:max_boxes]
    pad = tf.maximum(max_boxes - tf.shape(rows)[0], 0)
    rows = tf.concat([rows, tf.tile(tf.constant([[0, 0, 0, 0, -1]], tf.float32), [pad, 1])], axis=0)
    return tf.ensure_shape(rows, [max_boxes, 5])


def detection_decoder(d, *, stored_shape, target_mean: float, seed: int, training: bool):
    """``decode(index, record) -> (input (h, w, 1), packed targets (max_boxes, 5))`` for the config section
    ``d`` (:class:`mammodg.config.DetectionConfig`); with ``training``, random flip and scale seeded by
    (``seed``, index): the same sample gets the same draws in every run."""
    from mammodg.records.schema import outside_constant, parse

    size, scale = tuple(d.input_size), input_scale(stored_shape, d.input_size)

    def decode(i, raw):
        r = parse(raw)
        x = resized_input(r["image"], size, target_mean)
        cls = class_ids(r["lesion_class"], d.lesion_classes, d.merge_classes)
        keep = cls >= 0
        boxes = tf.boolean_mask(r["boxes"], keep) * tf.tile(scale, [2])
        cls = tf.boolean_mask(cls, keep)
        if training:
            s = tf.stack([tf.cast(seed, tf.int64), tf.cast(i, tf.int64)])
            x, boxes, cls = random_flip_scale(x, boxes, cls, s, flip_h=d.flip, scale=tuple(d.scale),
                                              fill_value=outside_constant(r["image"], target_mean))
        return tf.ensure_shape(x, [*size, 1]), pack_targets(boxes, cls, d.max_boxes)

    return decode


def packed_model(detector):
    """The detector with its three outputs concatenated per location (module docstring): the model the
    trainer fits and checkpoints; ``packed.get_layer(detector.name)`` is the detector."""
    image = keras.Input(detector.input_shape[1:], name="image")
    out = detector(image)
    ctr = keras.layers.Reshape((-1, 1), name="centerness_column")(out["centerness"])
    packed = keras.layers.Concatenate(axis=-1, name="packed")([out["classification"], out["regression"], ctr])
    return keras.Model(image, packed, name="fcos_packed")


def unpack_outputs(packed, num_classes: int) -> dict:
    return {"classification": packed[..., :num_classes], "regression": packed[..., num_classes:num_classes + 4],
            "centerness": packed[..., num_classes + 4]}


@keras.saving.register_keras_serializable("mammodg")
class PackedFCOSLoss(keras.losses.Loss):
    """:class:`mammodg.losses.FCOSLoss` on packed targets and outputs; returns the scalar total. Under
    ``tf.distribute`` positives are summed over replicas (``replica_sum``); a scalar loss is not divided
    by the replica count in Keras, so the replicas' losses add up to the global-batch loss."""

    def __init__(self, image_shape, num_classes: int = 1, levels=(3, 4, 5, 6, 7), name="fcos", **kwargs):
        super().__init__(name=name, **kwargs)
        from mammodg.losses import FCOSLoss

        self.fcos = FCOSLoss(image_shape, num_classes, levels, replica_sum=_replica_sum)

    def call(self, y_true, y_pred):
        targets = {"boxes": y_true[..., :4], "classes": keras.ops.cast(y_true[..., 4], "int32")}
        return self.fcos(targets, unpack_outputs(y_pred, self.fcos.num_classes))["total"]

    def get_config(self):
        return {"name": self.name, "image_shape": list(self.fcos.image_shape), "num_classes": self.fcos.num_classes,
                "levels": list(self.fcos.levels)}


def _replica_sum(x):
    ctx = tf.distribute.get_replica_context()
    return x if ctx is None or ctx.num_replicas_in_sync == 1 else ctx.all_reduce("SUM", x)


def detect(detector, images, d, *, stored_shape, target_mean: float) -> dict:
    """Stored uint16 batch (B, H, W, 1) -> detections after NMS in stored-image pixels (``boxes``, ``scores``,
    ``classes``, ``num_detections``; :func:`mammodg.models.fcos.decode_detections`): what ``serve_images``
    returns and what evaluation scores."""
    from mammodg.models.fcos import decode_detections, to_stored_pixels

    out = detector(resized_input(images, tuple(d.input_size), target_mean), training=False)
    det = decode_detections(out, d.input_size, tuple(d.levels), score_threshold=d.score_threshold,
                            iou_threshold=d.iou_threshold, max_detections=d.max_detections)
    return {**det, "boxes": to_stored_pixels(det["boxes"], input_scale(stored_shape, d.input_size))}


def build_detector(d, load: bool = True):
    """FCOS of config section ``d`` on the backbone it asks for (:func:`mammodg.models.resnet.section_features`:
    a contrastive run's encoder, a ResNet-50 or the tiny one), pre-trained weights loaded when ``load``."""
    from mammodg.models.fcos import fcos_detector
    from mammodg.models.resnet import section_features

    k = d.model_kwargs()
    features = section_features(d, k["input_shape"], levels=k["levels"], load=load)
    return fcos_detector(features, k["num_classes"], k["levels"], k["width"], k["tower_convs"], k["groups"])


def load_detector(weights, d):
    """The detector of config section ``d`` with the weights of a run's ``best.weights.h5`` (saved through
    :func:`packed_model`)."""
    detector = build_detector(d, load=False)
    packed_model(detector).load_weights(weights)
    return detector
