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

__all__ = ["ReflectionPadding2D", "resnet_generator", "patchgan_discriminator", "pool_query", "ImagePool",
           "LinearDecay", "CycleGAN"]


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


# ------------------------------------------------------------------------------------------- training
def pool_query(buffer, count, images, uniforms, slots):
    """The image pool rule (Shrivastava et al. 2017), one image at a time, as a pure function.

    While fewer than ``size = len(buffer)`` images are stored (``count``), each image is stored and
    returned as is; afterwards, when its ``uniforms[i] < 0.5``, it is swapped for the stored image
    ``slots[i]`` (the stored one is returned, the new one takes its place), else returned as is.
    Returns ``(returned images, new buffer, new count)``; the random draws come from the caller.
    """
    size = ops.shape(buffer)[0]
    out = []
    for i in range(images.shape[0]):  # the batch size is static inside train_step
        image = images[i]
        filling = count < size
        swap = ops.logical_and(ops.logical_not(filling), uniforms[i] < 0.5)
        slot = ops.where(filling, ops.minimum(count, size - 1), slots[i])
        stored = ops.take(buffer, slot, axis=0)
        out.append(ops.where(swap, stored, image))
        new = ops.where(ops.logical_or(filling, swap), image, stored)
        buffer = ops.scatter_update(buffer, ops.reshape(slot, (1, 1)), new[None])
        count = ops.minimum(count + 1, size)
    return ops.stack(out), buffer, count


@keras.saving.register_keras_serializable(package="mammodg")
class ImagePool(layers.Layer):
    """The CycleGAN image buffer: discriminators also see past fakes (rule: :func:`pool_query`).

    ``size`` past images of ``image_shape`` live in a non-trainable variable with their ``count``, so the
    pool works inside ``train_step`` and is saved and restored with the model; the draws come from a
    seeded ``SeedGenerator`` (deterministic for ``seed``, continued on resume). ``size`` 0: no pool.
    """

    def __init__(self, size: int = 50, image_shape=(256, 256, 1), seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.image_shape, self.seed = int(size), tuple(int(d) for d in image_shape), int(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.images = self.add_weight(shape=(max(self.size, 1), *self.image_shape), initializer="zeros",
                                      trainable=False, name="images")
        self.count = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False, name="count")
        self.built = True

    def call(self, images):
        if self.size == 0:
            return images
        n = images.shape[0]
        uniforms = keras.random.uniform((n,), seed=self.seed_generator)
        slots = keras.random.randint((n,), 0, self.size, seed=self.seed_generator)
        out, buffer, count = pool_query(self.images.value, self.count.value, images, uniforms, slots)
        self.images.assign(buffer)
        self.count.assign(count)
        return out

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store["rng"] = ops.convert_to_numpy(self.seed_generator.state)  # Keras does not save seed states

    def load_own_variables(self, store):
        self.seed_generator.state.assign(store["rng"])
        super().load_own_variables({k: store[k] for k in store.keys() if k != "rng"})

    def get_config(self):
        return {**super().get_config(), "size": self.size, "image_shape": list(self.image_shape), "seed": self.seed}


def _pool_global_batch(pool: ImagePool, fakes):
    """``pool`` on the global batch of fakes: under ``tf.distribute`` every replica gathers all replicas' fakes
    (in replica order, the global batch's), applies the same pool rule with the same draws and keeps its own
    rows, so the pools stay identical on every replica and equal to one device's on the global batch."""
    import tensorflow as tf

    from mammodg.losses import gather_replicas

    fakes = ops.stop_gradient(fakes)
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return pool(fakes)
    everything, offset = gather_replicas(fakes)
    pooled = pool(ops.reshape(everything, (ctx.num_replicas_in_sync * fakes.shape[0], *fakes.shape[1:])))
    return ops.slice(pooled, (offset, 0, 0, 0), fakes.shape)


@keras.saving.register_keras_serializable(package="mammodg")
class LinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate ``learning_rate`` until ``decay_start * steps``, then linearly down to 0 at ``steps``."""

    def __init__(self, learning_rate: float, steps: int, decay_start: float):
        self.learning_rate, self.steps, self.decay_start = float(learning_rate), int(steps), float(decay_start)

    def __call__(self, step):
        start = self.decay_start * self.steps
        frac = (self.steps - ops.cast(step, "float32")) / max(self.steps - start, 1.0)
        return self.learning_rate * ops.clip(frac, 0.0, 1.0)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "steps": self.steps, "decay_start": self.decay_start}


@keras.saving.register_keras_serializable(package="mammodg")
class CycleGAN(keras.Model):
    """One style pair (A, B) of MSVCL v2 section III-B1: generators ``g_ab``, ``g_ba``, discriminators
    ``d_a`` (real A vs ``g_ba(B)``) and ``d_b``, one image pool per discriminator.

    ``compile(g_optimizer, d_optimizer)``: one optimizer for both generators, one for both
    discriminators. ``fit`` on batches ``(real_a, real_b)`` in [-1, 1]: each step is one generator update
    (least-squares adversarial + ``cycle_weight`` x L1 cycle + ``identity_weight`` x L1 identity) then
    one discriminator update on the pooled fakes. Logs the period means of every loss, and ``loss``, the
    sum of the generator and discriminator objectives (what the NaN watch reads). ``call`` is ``g_ab``.
    ``identity_weight`` here is absolute (the stage passes ``identity_weight * cycle_weight``).
    """

    def __init__(self, crop_size: int = 256, generator_filters: int = 64, generator_blocks: int = 9,
                 discriminator_filters: int = 64, pool_size: int = 50, cycle_weight: float = 10.0,
                 identity_weight: float = 5.0, seed: int = 0, channels: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.settings = dict(crop_size=int(crop_size), generator_filters=int(generator_filters),
                             generator_blocks=int(generator_blocks), discriminator_filters=int(discriminator_filters),
                             pool_size=int(pool_size), cycle_weight=float(cycle_weight),
                             identity_weight=float(identity_weight), seed=int(seed), channels=int(channels))
        gen = dict(filters=generator_filters, n_blocks=generator_blocks, channels=channels)
        self.g_ab, self.g_ba = resnet_generator(**gen, name="G_AB"), resnet_generator(**gen, name="G_BA")
        self.d_a = patchgan_discriminator(discriminator_filters, channels, name="D_A")
        self.d_b = patchgan_discriminator(discriminator_filters, channels, name="D_B")
        shape = (crop_size, crop_size, channels)
        self.pool_a = ImagePool(pool_size, shape, seed, name="pool_a")
        self.pool_b = ImagePool(pool_size, shape, seed + 1, name="pool_b")
        self.cycle_weight, self.identity_weight = float(cycle_weight), float(identity_weight)
        self.trackers = {k: keras.metrics.Mean(name=k) for k in ("loss", "g_total", "g_adv", "cycle", "identity",
                                                                  "d_a", "d_b")}
        self.d_optimizer = None
        self.built = True

    @property
    def generator_variables(self):
        return self.g_ab.trainable_variables + self.g_ba.trainable_variables

    @property
    def discriminator_variables(self):
        return self.d_a.trainable_variables + self.d_b.trainable_variables

    def call(self, images, training=False):
        return self.g_ab(images, training=training)

    def compile(self, g_optimizer, d_optimizer, **kwargs):
        """``g_optimizer`` (the model's ``optimizer``) updates both generators, ``d_optimizer`` both discriminators."""
        super().compile(optimizer=g_optimizer, **kwargs)
        self.d_optimizer = d_optimizer
        self.optimizer.build(self.generator_variables)  # variables exist before weights are loaded
        self.d_optimizer.build(self.discriminator_variables)

    def get_compile_config(self):
        return {"g_optimizer": keras.saving.serialize_keras_object(self.optimizer),
                "d_optimizer": keras.saving.serialize_keras_object(self.d_optimizer)}

    def compile_from_config(self, config):
        self.compile(**{k: keras.saving.deserialize_keras_object(v) for k, v in config.items()})

    @property
    def metrics(self):
        return list(self.trackers.values())

    def losses_of(self, real_a, real_b, training=True):
        """Generator objective and its parts, and the fakes ``(fake_a, fake_b)`` it was computed on."""
        from mammodg.losses import l1_loss, lsgan_generator_loss

        fake_b, fake_a = self.g_ab(real_a, training=training), self.g_ba(real_b, training=training)
        adv = lsgan_generator_loss(self.d_b(fake_b)) + lsgan_generator_loss(self.d_a(fake_a))
        cycle = (l1_loss(self.g_ba(fake_b, training=training), real_a)
                 + l1_loss(self.g_ab(fake_a, training=training), real_b))
        identity = ops.zeros(())
        if self.identity_weight > 0:
            identity = (l1_loss(self.g_ab(real_b, training=training), real_b)
                        + l1_loss(self.g_ba(real_a, training=training), real_a))
        total = adv + self.cycle_weight * cycle + self.identity_weight * identity
        return {"g_total": total, "g_adv": adv, "cycle": cycle, "identity": identity}, (fake_a, fake_b)

    def train_step(self, data):
        import tensorflow as tf  # the TensorFlow backend's gradient tape

        from mammodg.losses import lsgan_discriminator_loss

        real_a, real_b = data
        ctx = tf.distribute.get_replica_context()  # several replicas: gradients are summed over them
        share = 1.0 / (ctx.num_replicas_in_sync if ctx else 1)  # so each replica's mean loss counts 1/replicas
        with tf.GradientTape() as tape:
            g, (fake_a, fake_b) = self.losses_of(real_a, real_b)
            g_share = g["g_total"] * share
        grads = tape.gradient(g_share, self.generator_variables)
        self.optimizer.apply_gradients(zip(grads, self.generator_variables))
        fake_a, fake_b = _pool_global_batch(self.pool_a, fake_a), _pool_global_batch(self.pool_b, fake_b)
        with tf.GradientTape() as tape:
            d = {"d_a": lsgan_discriminator_loss(self.d_a(real_a, training=True), self.d_a(fake_a, training=True)),
                 "d_b": lsgan_discriminator_loss(self.d_b(real_b, training=True), self.d_b(fake_b, training=True))}
            d_total = d["d_a"] + d["d_b"]
            d_share = d_total * share
        grads = tape.gradient(d_share, self.discriminator_variables)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator_variables))
        for k, v in {**g, **d, "loss": g["g_total"] + d_total}.items():
            self.trackers[k].update_state(v)
        return {k: m.result() for k, m in self.trackers.items()}

    def get_config(self):
        return {**super().get_config(), **self.settings}
