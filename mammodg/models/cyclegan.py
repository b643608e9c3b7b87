"""CycleGAN networks (Zhu et al. 2017, appendix 7.2), as used by MSVCL v2 section IV-B for vendor-style transfer.

MSVCL v2: "The generator backbone consists of ResNet with 9 blocks ..., while the discriminator is
PatchGAN". Both follow the CycleGAN paper:

* **Generator** (:func:`resnet_generator`): ``c7s1-64, d128, d256, R256 x n_blocks, u128, u64, c7s1-1``
  with ``c7s1-k`` a 7x7 Conv-InstanceNorm-ReLU with k filters, stride 1; ``dk`` a 3x3
  Conv-InstanceNorm-ReLU, stride 2; ``Rk`` a residual block of two 3x3 convolutions (k filters);
  ``uk`` a 3x3 fractional-strided (transposed) Conv-InstanceNorm-ReLU, stride 1/2. The last ``c7s1``
  has ``channels`` filters and a tanh instead of norm + ReLU, so images live in [-1, 1]. Reflection
  padding before the 7x7 and residual convolutions "to reduce artifacts". Fully convolutional: any
  ``H x W`` with both sides multiples of 4 (and >= 8) maps to the same shape.
* **Discriminator** (:func:`patchgan_discriminator`): the 70x70 PatchGAN ``C64-C128-C256-C512`` then
  a 1-channel convolution, ``Ck`` a 4x4 Conv-InstanceNorm-LeakyReLU(0.2) with k filters, stride 2
  (stride 1 for C512, no norm for C64). Convolutions pad 1 pixel as in the reference code, so a
  256x256 input gives a 30x30 map of real/fake scores, each seeing a 70x70 input patch.

Instance normalisation is ``GroupNormalization(groups=-1)`` (one group per channel); weights are
initialised from N(0, 0.02) as in the reference code. ``filters`` (64 in the papers) scales every width.
"""
from __future__ import annotations

import keras
from keras import layers, ops

from mammodg.models import register

__all__ = ["ReflectionPadding2D", "resnet_generator", "patchgan_discriminator"]


@keras.saving.register_keras_serializable(package="mammodg")
class ReflectionPadding2D(layers.Layer):
    """Pad height and width by ``padding`` pixels on each side, mirroring the image (no edge repeat)."""

    def __init__(self, padding: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.padding = int(padding)

    def call(self, x):
        p = self.padding
        return ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]], mode="reflect")

    def compute_output_shape(self, shape):
        grow = lambda d: None if d is None else d + 2 * self.padding  # noqa: E731
        return (shape[0], grow(shape[1]), grow(shape[2]), shape[3])

    def get_config(self):
        return {**super().get_config(), "padding": self.padding}


def _init():
    return keras.initializers.RandomNormal(0.0, 0.02)


def _instance_norm(name: str):
    return layers.GroupNormalization(groups=-1, epsilon=1e-5, name=name)


def _conv_norm_relu(x, filters: int, kernel: int, stride: int, name: str, transpose: bool = False):
    conv = layers.Conv2DTranspose if transpose else layers.Conv2D
    if kernel == 7:  # c7s1-k: reflection padding then a 'valid' convolution
        x = ReflectionPadding2D(3, name=f"{name}_pad")(x)
    x = conv(filters, kernel, strides=stride, padding="valid" if kernel == 7 else "same", use_bias=False,
             kernel_initializer=_init(), name=f"{name}_conv")(x)
    return layers.ReLU(name=f"{name}_relu")(_instance_norm(f"{name}_norm")(x))


def _residual_block(x, filters: int, name: str):
    """Rk: [reflect-pad, 3x3 conv, norm, ReLU, reflect-pad, 3x3 conv, norm] + the input."""
    y = x
    for i in (1, 2):
        y = ReflectionPadding2D(1, name=f"{name}_pad{i}")(y)
        y = layers.Conv2D(filters, 3, use_bias=False, kernel_initializer=_init(), name=f"{name}_conv{i}")(y)
        y = _instance_norm(f"{name}_norm{i}")(y)
        if i == 1:
            y = layers.ReLU(name=f"{name}_relu")(y)
    return layers.Add(name=f"{name}_add")([x, y])


@register("cyclegan_generator")
def resnet_generator(filters: int = 64, n_blocks: int = 9, channels: int = 1, name: str = "generator") -> keras.Model:
    """CycleGAN ResNet generator ``(B, H, W, channels)`` in [-1, 1] -> same shape in [-1, 1] (tanh).

    ``n_blocks`` residual blocks (9 for 256x256 and larger images in the CycleGAN paper, and in MSVCL v2)
    at 1/4 resolution with ``4 * filters`` channels. H and W must be multiples of 4 and at least 8.
    """
    if filters < 1 or n_blocks < 0 or channels < 1:
        raise ValueError(f"need filters >= 1, n_blocks >= 0, channels >= 1; got {filters}, {n_blocks}, {channels}")
    inp = keras.Input((None, None, channels), name="image")
    x = _conv_norm_relu(inp, filters, 7, 1, "c7s1")
    x = _conv_norm_relu(x, 2 * filters, 3, 2, "d1")
    x = _conv_norm_relu(x, 4 * filters, 3, 2, "d2")
    for i in range(n_blocks):
        x = _residual_block(x, 4 * filters, f"res{i + 1}")
    x = _conv_norm_relu(x, 2 * filters, 3, 2, "u1", transpose=True)
    x = _conv_norm_relu(x, filters, 3, 2, "u2", transpose=True)
    x = ReflectionPadding2D(3, name="out_pad")(x)
    x = layers.Conv2D(channels, 7, kernel_initializer=_init(), name="out_conv")(x)
    out = layers.Activation("tanh", name="tanh")(x)
    return keras.Model(inp, out, name=name)


@register("patchgan_discriminator")
def patchgan_discriminator(filters: int = 64, channels: int = 1, name: str = "discriminator") -> keras.Model:
    """70x70 PatchGAN ``(B, H, W, channels)`` -> ``(B, H/8 - 2, W/8 - 2, 1)`` real/fake scores.

    The scores are linear (the least-squares GAN loss is applied to them); H and W must be >= 24.
    """
    if filters < 1 or channels < 1:
        raise ValueError(f"need filters >= 1 and channels >= 1; got {filters}, {channels}")
    inp = keras.Input((None, None, channels), name="image")
    x = inp
    for i, (mult, stride) in enumerate([(1, 2), (2, 2), (4, 2), (8, 1)]):
        x = layers.ZeroPadding2D(1, name=f"c{i + 1}_pad")(x)
        x = layers.Conv2D(mult * filters, 4, strides=stride, use_bias=i == 0, kernel_initializer=_init(),
                          name=f"c{i + 1}_conv")(x)
        if i > 0:  # C64 has no normalisation
            x = _instance_norm(f"c{i + 1}_norm")(x)
        x = layers.LeakyReLU(0.2, name=f"c{i + 1}_lrelu")(x)
    x = layers.ZeroPadding2D(1, name="out_pad")(x)
    out = layers.Conv2D(1, 4, kernel_initializer=_init(), name="out_conv")(x)
    return keras.Model(inp, out, name=name)
