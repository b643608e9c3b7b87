"""The VGG-like 2-level model of the periodic-sampling paper (appendix A.2): a Backbone and an image classifier.

:class:`VGGBackbone` scores 5 patch classes per position (224x224 -> (1, 1, 5); 1152x832 -> (16, 11, 5));
:func:`patch_classifier` takes the maximum over positions; :func:`vgg_classifier` adds :class:`VGGImageHead`
(2 logits, benign / malignant). Only Keras layers and ``keras.ops`` are used. How the paper's text was read
(kernel counts, the linear last convolution, the minimum input size, other input sizes): docs/vgg.md.
Moving a patch-trained Backbone into a classifier: :mod:`mammodg.models.vgg_weights`.
"""
from __future__ import annotations

from typing import Sequence

import keras
from keras import layers, ops

from mammodg.models import register

__all__ = [
    "DEFAULT_FILTERS",
    "DEFAULT_HEAD_FILTERS",
    "NUM_PATCH_CLASSES",
    "VGGBackbone",
    "VGGImageHead",
    "malignancy_probability",
    "min_input_size",
    "patch_classifier",
    "vgg_classifier",
]

DEFAULT_FILTERS: tuple[int, ...] = (32, 64, 128, 256, 256, 512)
DEFAULT_HEAD_FILTERS: tuple[int, int] = (1024, 512)
NUM_PATCH_CLASSES = 5  # healthy, benign / malignant soft tissue lesion, benign / malignant calcification
NUM_IMAGE_CLASSES = 2  # benign, malignant
PATCH_SIZE = (224, 224)
IMAGE_SIZE = (1152, 832)


def _scaled(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


def min_input_size(n_blocks: int = len(DEFAULT_FILTERS)) -> int:
    """Smallest input height/width giving a >= 1x1 Backbone map: ``6 * 2**(n_blocks - 1)`` (192 for 6 blocks)."""
    if n_blocks < 1:
        raise ValueError(f"need at least 1 convolution block, got {n_blocks}")
    return 6 * 2 ** (n_blocks - 1)


@register("vgg_backbone")
@keras.saving.register_keras_serializable(package="mammodg")
class VGGBackbone(keras.Model):
    """Fully convolutional VGG-like Backbone: ``(B, H, W, C)`` -> ``(B, h, w, num_classes)`` logits.

    224x224 -> (1, 1, 5); 1152x832 -> (16, 11, 5); minimum input ``min_input_size(len(filters))`` (192).

    Args (keyword-only):
        width: multiplier of every kernel count except the ``num_classes`` scores (min 1 kernel).
        filters: kernel counts of the convolution blocks before ``width`` (one 3x3 conv per block).
        head_filters: kernel counts of the 2x2 and 1x1 head convolutions before ``width``.
        num_classes: number of scores per position (5 patch classes); the last conv is linear (logits).
        name: the model name; keep ``"backbone"`` so ``model.get_layer("backbone")`` finds it.
    """

    def __init__(
        self,
        *,
        width: float = 1.0,
        filters: Sequence[int] = DEFAULT_FILTERS,
        head_filters: Sequence[int] = DEFAULT_HEAD_FILTERS,
        num_classes: int = NUM_PATCH_CLASSES,
        name: str = "backbone",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        width = float(width)
        filters = tuple(int(f) for f in filters)
        head_filters = tuple(int(f) for f in head_filters)
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if not filters or min(filters) < 1:
            raise ValueError(f"filters must be a non-empty sequence of positive ints, got {filters}")
        if len(head_filters) != 2 or min(head_filters) < 1:
            raise ValueError(f"head_filters must be 2 positive ints (2x2 conv, 1x1 conv), got {head_filters}")
        self.width = width
        self.filters = filters
        self.head_filters = head_filters
        self.num_classes = int(num_classes)
        n = len(filters)
        self.block_layers = []
        for i, f in enumerate(filters, start=1):
            self.block_layers += [
                layers.BatchNormalization(name=f"block{i}_bn"),
                layers.Conv2D(
                    _scaled(f, width), 3, padding="valid" if i == n else "same", activation="relu",
                    name=f"block{i}_conv",
                ),
                layers.MaxPooling2D(2, strides=2, padding="valid", name=f"block{i}_pool"),
            ]
        self.head_layers = [
            layers.Conv2D(_scaled(head_filters[0], width), 2, activation="relu", name="head_conv1"),
            layers.Conv2D(_scaled(head_filters[1], width), 1, activation="relu", name="head_conv2"),
            layers.Conv2D(self.num_classes, 1, activation=None, name="logits"),  # linear: see docs/vgg.md
        ]

    @property
    def min_input_size(self) -> int:
        return min_input_size(len(self.filters))

    def _check_shape(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"{self.name}: expected a (batch, height, width, channels) input, got {input_shape}")
        m = self.min_input_size
        for axis, d in zip(("height", "width"), input_shape[1:3]):
            if d is not None and d < m:
                raise ValueError(
                    f"{self.name}: input {axis} {d} is below the minimum {m} for {len(self.filters)} blocks "
                    f"(input shape {tuple(input_shape)})"
                )

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self._check_shape(input_shape)
        shape = input_shape
        for layer in self.block_layers + self.head_layers:
            if not layer.built:  # idempotent: deserialisation may have built the model already
                layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.built = True

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        self._check_shape(input_shape)
        shape = input_shape
        for layer in self.block_layers + self.head_layers:
            shape = layer.compute_output_shape(shape)
        return shape

    def call(self, inputs, training=None):
        x = inputs
        for layer in self.block_layers:
            x = layer(x, training=training) if isinstance(layer, layers.BatchNormalization) else layer(x)
        for layer in self.head_layers:
            x = layer(x)
        return x

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "width": self.width,
            "filters": list(self.filters),
            "head_filters": list(self.head_filters),
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="mammodg")
class VGGImageHead(layers.Layer):
    """Image classifier of A.2.3 on a Backbone map ``(B, h, w, 5)`` -> ``(B, num_classes)`` logits.

    ``MaxPooling2D(min(pool_size, dim))`` then the sum of sub-part 1 (3 x [BN, ReLU, Conv2D] with
    ``sub_filters + (num_classes,)`` kernels of sizes ``kernel_size``, 1x1, 1x1) and sub-part 2 (BN, Conv2D
    ``num_classes`` kernels of size ``kernel_size``), kernel sizes clipped to the pooled map, then a global max
    over any remaining positions (= flatten at 1x1). The map height and width must be static.
    """

    def __init__(
        self,
        *,
        pool_size: int = 5,
        kernel_size: Sequence[int] = (3, 2),
        sub_filters: Sequence[int] = (16, 8),
        num_classes: int = NUM_IMAGE_CLASSES,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.pool_size = int(pool_size)
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.sub_filters = tuple(int(f) for f in sub_filters)
        self.num_classes = int(num_classes)
        if self.pool_size < 1 or len(self.kernel_size) != 2 or min(self.kernel_size) < 1:
            raise ValueError(f"bad pool_size {pool_size} / kernel_size {kernel_size}")
        if len(self.sub_filters) != 2 or min(self.sub_filters) < 1:
            raise ValueError(f"sub_filters must be 2 positive ints, got {sub_filters}")

    def layout(self, input_shape) -> dict:
        """The pool size, pooled map size and conv kernel size used for a map of shape ``input_shape``."""
        h, w = tuple(input_shape)[1:3]
        if h is None or w is None:
            raise ValueError(
                f"{self.name}: the image head needs a static map height and width (got map shape "
                f"{tuple(input_shape)}); build the classifier with a fixed input_shape"
            )
        pool = (min(self.pool_size, h), min(self.pool_size, w))
        pooled = (h // pool[0], w // pool[1])
        kernel = (min(self.kernel_size[0], pooled[0]), min(self.kernel_size[1], pooled[1]))
        out = (pooled[0] - kernel[0] + 1, pooled[1] - kernel[1] + 1)
        return {"pool": pool, "pooled": pooled, "kernel": kernel, "out": out}

    def build(self, input_shape):
        p = self.layout(input_shape)
        if getattr(self, "pool", None) is not None:  # already built (e.g. by deserialisation)
            if tuple(self.pool.pool_size) != p["pool"] or tuple(self.b_conv.kernel_size) != p["kernel"]:
                raise ValueError(f"{self.name}: already built for another map size than {tuple(input_shape)}")
            self.built = True
            return
        f1, f2 = self.sub_filters
        self.pool = layers.MaxPooling2D(p["pool"], strides=p["pool"], padding="valid", name="pool")
        self.a_bn1 = layers.BatchNormalization(name="a_bn1")
        self.a_conv1 = layers.Conv2D(f1, p["kernel"], name="a_conv1")
        self.a_bn2 = layers.BatchNormalization(name="a_bn2")
        self.a_conv2 = layers.Conv2D(f2, 1, name="a_conv2")
        self.a_bn3 = layers.BatchNormalization(name="a_bn3")
        self.a_conv3 = layers.Conv2D(self.num_classes, 1, name="a_conv3")
        self.b_bn = layers.BatchNormalization(name="b_bn")
        self.b_conv = layers.Conv2D(self.num_classes, p["kernel"], name="b_conv")
        shape = self.pool.compute_output_shape(tuple(input_shape))
        for layer in (self.a_bn1, self.a_conv1, self.a_bn2, self.a_conv2, self.a_bn3, self.a_conv3):
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        shape = self.pool.compute_output_shape(tuple(input_shape))
        self.b_bn.build(shape)
        self.b_conv.build(shape)
        self.built = True

    def compute_output_shape(self, input_shape):
        self.layout(input_shape)  # validates
        return (input_shape[0], self.num_classes)

    def call(self, inputs, training=None):
        x = self.pool(inputs)
        a = self.a_conv1(ops.relu(self.a_bn1(x, training=training)))
        a = self.a_conv2(ops.relu(self.a_bn2(a, training=training)))
        a = self.a_conv3(ops.relu(self.a_bn3(a, training=training)))
        b = self.b_conv(self.b_bn(x, training=training))
        return ops.max(a + b, axis=(1, 2))  # (B, 1, 1, C) -> (B, C) for the paper's shapes

    def get_config(self):
        config = super().get_config()
        config.update(
            pool_size=self.pool_size,
            kernel_size=list(self.kernel_size),
            sub_filters=list(self.sub_filters),
            num_classes=self.num_classes,
        )
        return config


def _make_backbone(backbone, width, filters) -> VGGBackbone:
    if backbone is None:
        return VGGBackbone(width=width, filters=filters)
    if not isinstance(backbone, VGGBackbone):
        raise TypeError(f"backbone must be a VGGBackbone, got {type(backbone).__name__}")
    return backbone


@register("patch_classifier")
def patch_classifier(
    *,
    input_shape: Sequence[int | None] = (*PATCH_SIZE, 1),
    width: float = 1.0,
    filters: Sequence[int] = DEFAULT_FILTERS,
    backbone: VGGBackbone | None = None,
    softmax: bool = False,
    name: str = "patch_classifier",
) -> keras.Model:
    """Backbone + global max over positions: ``(B, 224, 224, 1)`` -> ``(B, 5)`` patch logits.

    For 224x224 the map is (1, 1, 5) so this is the reshape to (5,); larger patches (or ``None`` sizes) take
    the maximum score over positions. ``softmax=True`` appends a softmax (probabilities instead of logits).
    ``backbone``: reuse an existing :class:`VGGBackbone` (then ``width``/``filters`` are ignored).
    """
    backbone = _make_backbone(backbone, width, filters)
    inputs = keras.Input(shape=tuple(input_shape), name="patch")
    x = backbone(inputs)
    x = layers.GlobalMaxPooling2D(name="patch_logits")(x)
    if softmax:
        x = layers.Softmax(name="patch_probabilities")(x)
    return keras.Model(inputs, x, name=name)


@register("vgg_classifier")
def vgg_classifier(
    *,
    input_shape: Sequence[int] = (*IMAGE_SIZE, 1),
    width: float = 1.0,
    filters: Sequence[int] = DEFAULT_FILTERS,
    backbone: VGGBackbone | None = None,
    name: str = "vgg_classifier",
) -> keras.Model:
    """The full 2-level image model: ``(B, 1152, 832, 1)`` -> ``(B, 2)`` logits (0 benign, 1 malignant).

    The Backbone is a sub-model named ``"backbone"`` (``model.get_layer("backbone")``), so its weights can be
    initialised from a patch-pretrained model with :func:`~mammodg.models.vgg_weights.load_backbone_weights`. ``input_shape`` needs a
    static height and width (>= 192); for 1152x832 the shapes are the paper's (16, 11, 5) -> (3, 2, 5) -> 2.
    ``backbone``: reuse an existing :class:`VGGBackbone` (then ``width``/``filters`` are ignored).
    """
    backbone = _make_backbone(backbone, width, filters)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = backbone(inputs)
    x = VGGImageHead(name="image_head")(x)
    return keras.Model(inputs, x, name=name)


def malignancy_probability(logits):
    """``softmax(logits)[..., 1]``: the probability of the malignant class from the classifier's 2 logits."""
    return ops.softmax(ops.convert_to_tensor(logits), axis=-1)[..., 1]
