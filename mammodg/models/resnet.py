"""ResNet encoders with a projection head for contrastive pre-training (MSVCL v2 section IV-B).

The paper's backbone is ``keras.applications.ResNet50`` with a 1-channel input and global average pooling
(2048 features). Nothing is ever downloaded: ``weights`` is None (random) or the path of a local
ImageNet weights file for the 3-channel network; its first convolution is converted to one channel
by summing the kernel over RGB (a grey image x gives the same response as the RGB image (x, x, x)).
A ResNet-18-shaped encoder of explicit width (``resnet18_backbone``) serves small runs such as the demo.
"""
from __future__ import annotations

from pathlib import Path

import keras
from keras import ops

from mammodg.models import register

BACKBONE_NAME = "backbone"
FEATURES_NAME = "backbone_features"  # the feature extractor inside downstream models (detection, matching, ...)
# C2-C5 (strides 4-32) of the ResNet-18 encoder: the last ReLU of each stage, by layer name
RESNET18_FEATURES = {lv: f"stage{lv - 1}_out" for lv in range(2, 6)}


@register("resnet50_backbone")
def resnet50_backbone(input_shape=(None, None, 1), weights: str | None = None, name: str = BACKBONE_NAME):
    """(h, w, 1) image -> 2048 pooled features."""
    model = keras.applications.ResNet50(include_top=False, weights=None, input_shape=tuple(input_shape),
                                        pooling="avg", name=name)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"contrastive.weights: {path} not found (ImageNet weights are never downloaded)")
        rgb = keras.applications.ResNet50(include_top=False, weights=str(path), input_shape=(224, 224, 3), pooling="avg")
        for src, dst in zip(rgb.layers, model.layers):
            values = src.get_weights()
            if values and dst.name == "conv1_conv":
                values[0] = values[0].sum(axis=2, keepdims=True)
            if values:
                dst.set_weights(values)
    return model


@register("resnet18_backbone")
def resnet18_backbone(input_shape=(None, None, 1), width: float = 1.0, name: str = BACKBONE_NAME):
    """(h, w, 1) image -> ``8 * base`` pooled features: ResNet-18 (He et al. 2016: 7x7 stem, max pool, 4
    stages of 2 basic blocks) with ``base = round(64 * width)`` filters in its first stage."""
    layers = keras.layers
    base = max(4, round(64 * width))

    def conv_bn(x, filters, kernel, stride, relu=True):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(epsilon=1.001e-5)(x)
        return layers.ReLU()(x) if relu else x

    inputs = keras.Input(tuple(input_shape))
    x = layers.MaxPooling2D(3, strides=2, padding="same")(conv_bn(inputs, base, 7, 2))
    for stage in range(4):
        filters = base * 2 ** stage
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = x if stride == 1 and x.shape[-1] == filters else conv_bn(x, filters, 1, stride, relu=False)
            y = conv_bn(conv_bn(x, filters, 3, stride), filters, 3, 1, relu=False)
            x = layers.ReLU(name=RESNET18_FEATURES[stage + 2] if block == 1 else None)(layers.Add()([shortcut, y]))
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(x), name=name)


def build_backbone(kind: str = "resnet50", input_shape=(None, None, 1), weights: str | None = None, width: float = 1.0):
    """The contrastive backbone ``kind`` (``contrastive.backbone``): ImageNet ``weights`` only for ResNet-50."""
    if kind == "resnet18":
        if weights:
            raise ValueError("contrastive.weights: ImageNet weights exist only for backbone resnet50")
        return resnet18_backbone(input_shape, width)
    return resnet50_backbone(input_shape, weights)


def view_names(views: int = 2) -> tuple[str, ...]:
    """Input names of a contrastive model with ``views`` views per sample: view1, view2, ..."""
    return tuple(f"view{i + 1}" for i in range(views))


@register("contrastive_model")
def contrastive_model(input_shape=(512, 384, 1), projection_dim: int = 128, hidden_dim: int = 2048,
                      weights: str | None = None, bn_momentum: float = 0.9, views: int = 2,
                      backbone: str = "resnet50", width: float = 1.0):
    """``views`` inputs ``{"view1", "view2", ...}`` -> projections stacked as (b, views, projection_dim).

    All views go through the same backbone and the same MLP projection head (Dense-ReLU-Dense, SimCLR)
    as *one* batch of ``views * b`` images, as SimCLR does: BatchNorm statistics are those of all views
    together, so they cannot differ between the anchors' and the positives' sides (with one backbone
    call per view, a batch of CCs and a batch of MLOs would each be normalised by its own statistics).
    Under several replicas the backbone's BatchNorm uses synchronized (global-batch) statistics, so the
    network cannot tell positives apart by per-replica batch statistics (google-research/simclr #114).
    BatchNorm momentum is 0.9 (SimCLR's batch_norm_decay) instead of Keras' 0.99, so the moving
    statistics used at validation and export follow the weights within tens of steps.
    """
    backbone = build_backbone(backbone, input_shape, weights, width)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = bn_momentum
            # cross-replica batch statistics (else BN lets the model find positives, google-research/simclr #114)
            layer.synchronized = keras.backend.backend() == "tensorflow"
    head = keras.Sequential([keras.layers.Dense(hidden_dim, activation="relu"), keras.layers.Dense(projection_dim)],
                            name="projection")
    names = view_names(views)
    inputs = {k: keras.Input(tuple(input_shape), name=k) for k in names}
    stacked = keras.layers.Concatenate(axis=0, name="all_views")([inputs[k] for k in names])  # (views * b, h, w, 1)
    z = head(backbone(stacked))
    return keras.Model(inputs, PerView(views, name="per_view")(z), name="contrastive")


@keras.saving.register_keras_serializable("mammodg")
class PerView(keras.layers.Layer):
    """(views * b, d) rows ordered view by view -> (b, views, d)."""

    def __init__(self, views: int, **kwargs):
        super().__init__(**kwargs)
        self.views = views

    def call(self, z):
        return ops.transpose(ops.reshape(z, (self.views, -1, ops.shape(z)[-1])), (1, 0, 2))

    def compute_output_shape(self, shape):
        return (None, self.views, shape[-1])

    def get_config(self):
        return {**super().get_config(), "views": self.views}


def backbone_of(model) -> keras.Model:
    return model.get_layer(BACKBONE_NAME)


# ------------------------------------------------------------------ contrastive encoders in downstream models
def run_encoder(run_dir) -> dict:
    """The encoder a contrastive run trained: ``{"kind", "width", "weights"}`` from its ``config.yaml``
    (``contrastive.backbone``, ``contrastive.width``) and its ``backbone.weights.h5``. A folder without
    ``config.yaml`` (weights saved by hand) is taken to hold a ResNet-50."""
    from mammodg.config import TrainConfig, load

    run = Path(run_dir)
    weights = run / "backbone.weights.h5"
    if not weights.is_file():
        raise FileNotFoundError(f"backbone_from: {weights} not found "
                                "(train it with `mammodg train --stage contrastive`)")
    if not (run / "config.yaml").is_file():
        return {"kind": "resnet50", "width": 1.0, "weights": weights}
    c = load(TrainConfig, run / "config.yaml").contrastive
    return {"kind": c.backbone, "width": float(c.width), "weights": weights}


def encoder_features(kind: str, input_shape, *, width: float = 1.0, weights=None, levels=(3, 4, 5)) -> keras.Model:
    """The contrastive encoder ``kind`` (``resnet50``, or ``resnet18`` of ``width``) as a feature extractor
    ``image -> {"c2"?, "c3", "c4", "c5"}`` named :data:`FEATURES_NAME`, with a contrastive run's
    ``backbone.weights.h5`` (``weights``) or random."""
    if kind == "resnet50":
        from mammodg.models.fcos import resnet50_features

        return resnet50_features(input_shape, levels, backbone_weights=str(weights) if weights else None)
    if kind != "resnet18":
        raise ValueError(f"backbone: unknown contrastive encoder {kind!r} (resnet50 or resnet18)")
    backbone = resnet18_backbone(input_shape, width)
    if weights:
        backbone.load_weights(weights)
    outputs = {f"c{lv}": backbone.get_layer(name).output for lv, name in RESNET18_FEATURES.items()
               if lv >= min(min(levels), 5)}
    return keras.Model(backbone.input, outputs, name=FEATURES_NAME)


def section_features(s, input_shape, *, levels=(3, 4, 5), load: bool = True) -> keras.Model:
    """The feature extractor a downstream config section ``s`` asks for: with ``s.backbone_from``, the encoder
    that contrastive run trained (:func:`run_encoder`: its architecture, and its weights when ``load``);
    else ``s.backbone`` with random weights (``tiny``: ``s.backbone_width`` channels; ``resnet50``: the
    section's local ImageNet ``weights`` file, if it has one)."""
    from mammodg.models import fcos

    if s.backbone == "tiny":
        if s.backbone_from:
            raise ValueError("the tiny backbone takes no backbone_from")
        return fcos.tiny_features(input_shape, levels, getattr(s, "backbone_width", 8))
    if s.backbone_from:
        enc = run_encoder(s.backbone_from)
        return encoder_features(enc["kind"], input_shape, width=enc["width"], levels=levels,
                                weights=enc["weights"] if load else None)
    imagenet = getattr(s, "weights", "") or None
    return fcos.resnet50_features(input_shape, levels, imagenet_weights=imagenet if load else None)
