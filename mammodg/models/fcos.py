"""FCOS mass detector (Tian et al. 2019) on the contrastive ResNet-50 backbone (MSVCL v2 section III-C).

``image (H, W, 1)`` -> backbone features C2-C5 -> FPN P2/P3-P7 (:class:`FPN`) -> one shared head
(:class:`FCOSHead`) applied to every level -> a dict of per-location outputs, concatenated level by level
in the order of :func:`~mammodg.models.fcos_targets.locations`:

* ``classification`` (B, N, classes): logits for a sigmoid focal loss;
* ``regression`` (B, N, 4): distances (l, t, r, b) to the box edges in input pixels, always > 0;
* ``centerness`` (B, N): logit of the centerness.

The regression output is ``stride * exp(scale_level * x)`` (a learned :class:`Scale` per level): strictly
positive, so a predicted box is never degenerate and GIoU has no 0/0; ``relu`` would leave dead locations
with zero gradient. :func:`decode_detections` turns the outputs into boxes after NMS (TensorFlow's
``combined_non_max_suppression``, the export side); training targets and losses are in
:mod:`mammodg.models.fcos_targets` and :mod:`mammodg.losses`.
"""
from __future__ import annotations

import math
from pathlib import Path

import keras
from keras import ops

from mammodg.models import register
from mammodg.models.fcos_targets import DEFAULT_LEVELS, check_levels, level_shapes, locations, strides_of

OUTPUTS = ("classification", "regression", "centerness")
RESNET50_FEATURES = {2: "conv2_block3_out", 3: "conv3_block4_out", 4: "conv4_block6_out", 5: "conv5_block3_out"}
_MAX_LOG = 8.0  # caps exp() of the regression at e^8 strides: no overflow, far beyond any image


def _feature_levels(levels) -> list[int]:
    """Backbone levels the FPN reads: C2 when P2 is on, and always C3-C5."""
    return list(range(min(check_levels(levels)), 6))


@register("fcos_resnet50_features")
def resnet50_features(input_shape=(None, None, 1), levels=DEFAULT_LEVELS, backbone_weights: str | None = None,
                      imagenet_weights: str | None = None):
    """ResNet-50 (the contrastive backbone, 1 input channel) -> ``{"c2"?, "c3", "c4", "c5"}`` by layer name.

    ``backbone_weights``: a contrastive run's ``backbone.weights.h5``; ``imagenet_weights``: a local ImageNet
    weights file (converted to 1 channel); neither: random. Nothing is downloaded.
    """
    from mammodg.models.resnet import resnet50_backbone

    if backbone_weights and imagenet_weights:
        raise ValueError("detection: give backbone_weights (contrastive run) or imagenet_weights, not both")
    backbone = resnet50_backbone(input_shape, weights=imagenet_weights)
    if backbone_weights:
        path = Path(backbone_weights)
        if not path.is_file():
            raise FileNotFoundError(f"detection.backbone_weights: {path} not found (a contrastive run's backbone.weights.h5)")
        backbone.load_weights(path)
    outputs = {f"c{lv}": backbone.get_layer(RESNET50_FEATURES[lv]).output for lv in _feature_levels(levels)}
    return keras.Model(backbone.input, outputs, name="backbone_features")


@register("fcos_tiny_features")
def tiny_features(input_shape=(None, None, 1), levels=DEFAULT_LEVELS, width: int = 8):
    """A few stride-2 convolutions giving C2-C5 of ``width`` channels: a stand-in backbone for tests and demos."""
    image = keras.Input(tuple(input_shape), name="image")
    x, outputs = image, {}
    for lv in range(1, 6):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", activation="relu", name=f"tiny_c{lv}")(x)
        if lv in _feature_levels(levels):
            outputs[f"c{lv}"] = x
    return keras.Model(image, outputs, name="backbone_features")


@keras.saving.register_keras_serializable("mammodg")
class Scale(keras.layers.Layer):
    """Multiplies its input by one learned scalar (FCOS: one per pyramid level on the box regression)."""

    def __init__(self, initial: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.initial = float(initial)

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.initial), name="scale")

    def call(self, x):
        return x * ops.cast(self.scale, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "initial": self.initial}


@keras.saving.register_keras_serializable("mammodg")
class FPN(keras.layers.Layer):
    """Feature pyramid (FCOS): lateral 1x1 + top-down nearest upsampling + 3x3 on C2?/C3-C5, then
    P6 = 3x3/2 conv of P5 and P7 = 3x3/2 conv of relu(P6). Returns the list of P maps for ``levels``."""

    def __init__(self, levels=DEFAULT_LEVELS, width: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.levels = check_levels(levels)
        self.width = int(width)
        self.c_levels = _feature_levels(self.levels)
        conv = dict(kernel_initializer="he_uniform")
        self.lateral = [keras.layers.Conv2D(width, 1, name=f"lateral_c{lv}", **conv) for lv in self.c_levels]
        self.smooth = [keras.layers.Conv2D(width, 3, padding="same", name=f"output_p{lv}", **conv) for lv in self.c_levels]
        self.extra = [keras.layers.Conv2D(width, 3, strides=2, padding="same", name=f"p{lv}", **conv)
                      for lv in self.levels if lv > 5]

    def build(self, input_shape):
        width = (None, None, None, self.width)
        for lv, lateral, smooth in zip(self.c_levels, self.lateral, self.smooth):
            lateral.build(input_shape[f"c{lv}"])
            smooth.build(width)
        for conv in self.extra:
            conv.build(width)

    def call(self, features):
        top, maps = None, []
        for lv, lateral, smooth in reversed(list(zip(self.c_levels, self.lateral, self.smooth))):
            x = lateral(features[f"c{lv}"])
            if top is not None:
                up = ops.repeat(ops.repeat(top, 2, axis=1), 2, axis=2)
                x = x + up[:, : ops.shape(x)[1], : ops.shape(x)[2], :]
            top = x
            maps.insert(0, smooth(x))
        x = maps[-1]
        for i, conv in enumerate(self.extra):
            x = conv(x if i == 0 else ops.relu(x))
            maps.append(x)
        return maps

    def get_config(self):
        return {**super().get_config(), "levels": list(self.levels), "width": self.width}


@keras.saving.register_keras_serializable("mammodg")
class FCOSHead(keras.layers.Layer):
    """Shared FCOS head: classification tower -> class logits; regression tower -> (l, t, r, b) and centerness.

    Towers are ``tower_convs`` x (3x3 conv, GroupNorm, ReLU) with N(0, 0.01) weights; the class bias starts at
    -log((1 - prior) / prior) so every location starts at probability ``prior`` (focal loss, RetinaNet).
    Outputs are flattened per level and concatenated (module docstring), in float32.
    """

    def __init__(self, num_classes: int = 1, levels=DEFAULT_LEVELS, width: int = 256, tower_convs: int = 4,
                 groups: int = 32, prior: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.levels, self.width = int(num_classes), check_levels(levels), int(width)
        self.tower_convs, self.groups, self.prior = int(tower_convs), int(groups), float(prior)
        if self.width % self.groups:
            raise ValueError(f"detection: head width {self.width} is not a multiple of groups {self.groups}")
        init = dict(kernel_initializer=keras.initializers.RandomNormal(stddev=0.01), bias_initializer="zeros")

        def tower(name):
            return [layer for i in range(self.tower_convs) for layer in (
                keras.layers.Conv2D(self.width, 3, padding="same", name=f"{name}_conv{i}", **init),
                keras.layers.GroupNormalization(self.groups, name=f"{name}_gn{i}"),
                keras.layers.ReLU(name=f"{name}_relu{i}"))]

        self.cls_tower, self.reg_tower = tower("cls"), tower("reg")
        bias = -math.log((1 - self.prior) / self.prior)
        self.cls_logits = keras.layers.Conv2D(self.num_classes, 3, padding="same", name="cls_logits",
                                              kernel_initializer=init["kernel_initializer"],
                                              bias_initializer=keras.initializers.Constant(bias))
        self.bbox_pred = keras.layers.Conv2D(4, 3, padding="same", name="bbox_pred", **init)
        self.ctr_pred = keras.layers.Conv2D(1, 3, padding="same", name="centerness", **init)
        self.scales = [Scale(name=f"scale_p{lv}") for lv in self.levels]

    def build(self, input_shape):
        shape = (None, None, None, input_shape[0][-1])
        width = (None, None, None, self.width)
        for tower in (self.cls_tower, self.reg_tower):
            for i, layer in enumerate(tower):
                layer.build(shape if i == 0 else width)
        for layer in (self.cls_logits, self.bbox_pred, self.ctr_pred):
            layer.build(width if self.tower_convs else shape)
        for scale in self.scales:
            scale.build(())

    def call(self, maps):
        out = {k: [] for k in OUTPUTS}
        for p, stride, scale in zip(maps, strides_of(self.levels), self.scales):
            c, r = p, p
            for layer in self.cls_tower:
                c = layer(c)
            for layer in self.reg_tower:
                r = layer(r)
            log_ltrb = ops.cast(scale(self.bbox_pred(r)), "float32")
            values = {"classification": self.cls_logits(c),
                      "regression": stride * ops.exp(ops.minimum(log_ltrb, _MAX_LOG)),
                      "centerness": self.ctr_pred(r)}
            for k, v in values.items():
                out[k].append(ops.reshape(ops.cast(v, "float32"), (ops.shape(v)[0], -1, ops.shape(v)[-1])))
        out = {k: ops.concatenate(v, axis=1) for k, v in out.items()}
        out["centerness"] = out["centerness"][..., 0]
        return out

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "levels": list(self.levels),
                "width": self.width, "tower_convs": self.tower_convs, "groups": self.groups, "prior": self.prior}


def fcos_detector(features: keras.Model, num_classes: int = 1, levels=DEFAULT_LEVELS, width: int = 256,
                  tower_convs: int = 4, groups: int = 32, prior: float = 0.01, name: str = "fcos") -> keras.Model:
    """FCOS on any feature extractor ``image -> {"c2"?, "c3", "c4", "c5"}`` (strides 4-32, ceil rounding)."""
    levels = check_levels(levels)
    image = keras.Input(features.input_shape[1:], name="image")
    maps = FPN(levels, width, name="fpn")(features(image))
    outputs = FCOSHead(num_classes, levels, width, tower_convs, groups, prior, name="head")(maps)
    return keras.Model(image, outputs, name=name)


@register("fcos")
def fcos_model(input_shape=(512, 384, 1), num_classes: int = 1, levels=DEFAULT_LEVELS, backbone: str = "resnet50",
               backbone_weights: str | None = None, imagenet_weights: str | None = None, width: int = 256,
               tower_convs: int = 4, groups: int = 32, prior: float = 0.01, backbone_width: int = 8) -> keras.Model:
    """The detector by config: ``backbone`` is ``"resnet50"`` (contrastive / ImageNet / random weights) or
    ``"tiny"`` (:func:`tiny_features` of ``backbone_width`` channels, tests and demos)."""
    if backbone == "resnet50":
        features = resnet50_features(input_shape, levels, backbone_weights, imagenet_weights)
    elif backbone == "tiny":
        if backbone_weights or imagenet_weights:
            raise ValueError("detection: the tiny backbone takes no weights file")
        features = tiny_features(input_shape, levels, backbone_width)
    else:
        raise ValueError(f"detection.backbone must be 'resnet50' or 'tiny', got {backbone!r}")
    return fcos_detector(features, num_classes, levels, width, tower_convs, groups, prior)


def decode_detections(outputs, image_shape, levels=DEFAULT_LEVELS, score_threshold: float = 0.05, top_k: int = 1000,
                      iou_threshold: float = 0.6, max_detections: int = 100):
    """Model outputs -> detections in input pixels, the export signature's tensors.

    Score = sqrt(sigmoid(class) * sigmoid(centerness)); per level the ``top_k`` locations by their best class
    score are kept; then class-wise NMS, score threshold and the ``max_detections`` best over all classes by
    ``tf.image.combined_non_max_suppression`` (no Keras op does NMS; this runs at inference/export, where
    TensorFlow belongs). Boxes are x0, y0, x1, y1 clipped to the (H, W) input. Returns ``boxes`` (B, D, 4),
    ``scores`` (B, D), ``classes`` (B, D) int32 and ``num_detections`` (B,) int32; rows past
    ``num_detections`` are zeros.
    """
    import tensorflow as tf

    shapes, strides = level_shapes(image_shape, levels), strides_of(levels)
    loc = tf.constant(locations(shapes, strides))
    ltrb = tf.cast(outputs["regression"], tf.float32)
    scores = tf.sqrt(tf.sigmoid(tf.cast(outputs["classification"], tf.float32))
                     * tf.sigmoid(tf.cast(outputs["centerness"], tf.float32))[..., None])
    hw = tf.constant([image_shape[1], image_shape[0]], tf.float32)
    boxes = tf.concat([tf.maximum(loc - ltrb[..., :2], 0.0), tf.minimum(loc + ltrb[..., 2:], hw)], axis=-1)
    kept_boxes, kept_scores, start = [], [], 0
    for h, w in shapes:
        n = h * w
        level_scores, level_boxes = scores[:, start:start + n], boxes[:, start:start + n]
        _, idx = tf.math.top_k(tf.reduce_max(level_scores, axis=-1), k=min(top_k, n))
        kept_scores.append(tf.gather(level_scores, idx, batch_dims=1))
        kept_boxes.append(tf.gather(level_boxes, idx, batch_dims=1))
        start += n
    nms = tf.image.combined_non_max_suppression(
        tf.concat(kept_boxes, axis=1)[:, :, None, :], tf.concat(kept_scores, axis=1),
        max_output_size_per_class=max_detections, max_total_size=max_detections, iou_threshold=iou_threshold,
        score_threshold=score_threshold, pad_per_class=False, clip_boxes=False)
    return {"boxes": nms.nmsed_boxes, "scores": nms.nmsed_scores, "classes": tf.cast(nms.nmsed_classes, tf.int32),
            "num_detections": nms.valid_detections}


def to_stored_pixels(boxes, scale, offset=(0.0, 0.0)):
    """Boxes (..., 4) in model-input pixels -> stored-image pixels, for an input made as ``stored * scale + offset``.

    ``scale`` is a number or (sx, sy), ``offset`` is (ox, oy) in input pixels; pass (B, 1, 2) for per-image values."""

    def xyxy(v):
        v = ops.convert_to_tensor(v, "float32")
        v = ops.stack([v, v]) if len(v.shape) == 0 else v
        return ops.concatenate([v, v], axis=-1)

    return (ops.cast(boxes, "float32") - xyxy(offset)) / xyxy(scale)
