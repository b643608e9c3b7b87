"""``--stage cyclegan``: vendor-style transfer between every pair of seen styles (MSVCL v2 section III-B1).

"Given M seen vendor-style domains, we train C(M, 2) generators" -- here one CycleGAN (Zhu et al.
2017) per unordered pair (A, B), which gives both directions A->B and B->A, so each training image can
be rendered in the M-1 other styles; the contrastive stage blends two renderings with eq. (2),
``A * (1 - alpha) + B * alpha`` (see :class:`StyleTransfer`).

Training, section IV-B and the CycleGAN paper: ResNet generators and 70x70 PatchGAN discriminators
(:mod:`mammodg.models.cyclegan`); random ``crop_size`` crops (512x512 in the paper) that contain breast
tissue; least-squares (MSE) adversarial loss, L1 cycle loss weighted by ``cycle_weight`` and L1
identity loss weighted by ``identity_weight * cycle_weight``; Adam (``learning_rate``, ``beta_1``), one
for both generators and one for both discriminators, constant then linearly decayed to 0 from
``decay_start * steps`` to ``steps``; each discriminator sees a 50 % mix of current and past fakes from an
:class:`ImagePool` of ``pool_size`` images. Images are in [-1, 1]: ``2 v - 1`` inside the breast, -1
outside.

Run folder (``run_dir``)::

    config.yaml                     the resolved configuration
    <pair folder>/ckpt/             tf.train.Checkpoint (4 models, 2 optimizers, step), every val_every steps
    <pair folder>/state.json        step, done, loss history
    generators/<src>__to__<dst>.keras
    saved_model/<src>__to__<dst>/   SavedModel of the same generator (when ``export``)
    styles.json                     styles, pairs, and the generator files of every ordered (src, dst)
    style_grid.png                  Figure 4 of the paper: transfers between styles and a blending row

Re-running the same command resumes an interrupted pair from its checkpoint (the image pools restart
empty) and skips finished pairs; a NaN or infinite loss stops with an error naming the pair and step.
``seed`` fixes the initial weights, the crops, the sample order and the pools' choices of every pair.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from mammodg.config import ConfigError, TrainConfig, save
from mammodg.records.styles import STYLES_JSON, StyleTransfer
from mammodg.train import TrainingError, atomic_json

BLEND_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # eq. (2): 0.0, 0.1, ..., 1.0


def safe_name(style: str) -> str:
    """A file-name form of a style (data segment), e.g. ``"PHANTOM|VendorA"`` -> ``"PHANTOM_VendorA"``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", style).strip("_") or "style"


def generator_name(src: str, dst: str) -> str:
    return f"{safe_name(src)}__to__{safe_name(dst)}"


def seen_styles(cfg: TrainConfig, index: dict) -> list[str]:
    """``cyclegan.styles``, checked against the segments of the train split (empty = all of them)."""
    from mammodg.records.reader import streams

    known = sorted({seg for seg, _ in streams(index, cfg.data_dir, cfg.train_split)})
    styles = list(cfg.cyclegan.styles) or known
    unknown = [s for s in styles if s not in known]
    if unknown:
        raise ConfigError(f"cyclegan.styles: unknown style(s) {unknown}; the {cfg.train_split!r} split of "
                          f"{cfg.data_dir} has the data segments {known}")
    if len(set(styles)) != len(styles) or len({safe_name(s) for s in styles}) != len(styles):
        raise ConfigError(f"cyclegan.styles: styles must be distinct (also as file names {[safe_name(s) for s in styles]})")
    if len(styles) < 2:
        raise ConfigError(f"cyclegan.styles: need at least 2 styles to train style pairs, got {styles}")
    return styles


def _check(cfg: TrainConfig) -> None:
    c = cfg.cyclegan
    if c.crop_size % 4 or c.crop_size < 24:
        raise ConfigError(f"cyclegan.crop_size must be a multiple of 4 and >= 24 (generator strides, PatchGAN), "
                          f"got {c.crop_size}")
    if min(cfg.batch_size, cfg.steps, cfg.val_every, c.generator_filters, c.discriminator_filters) < 1:
        raise ConfigError("batch_size, steps, val_every, cyclegan.generator_filters and "
                          "cyclegan.discriminator_filters must be >= 1")
    if not 0.0 <= c.decay_start <= 1.0:
        raise ConfigError(f"cyclegan.decay_start must be in [0, 1] (a fraction of steps), got {c.decay_start}")
    if c.pool_size < 0 or c.cycle_weight < 0 or c.identity_weight < 0 or c.generator_blocks < 0:
        raise ConfigError("cyclegan.pool_size, cycle_weight, identity_weight and generator_blocks must be >= 0")


# ----------------------------------------------------------------------------------------------- data
def to_unit_range(stored):
    """Stored uint16 image -> (float32 in [-1, 1], breast mask): ``2 v - 1`` inside the breast, -1 outside."""
    import tensorflow as tf

    x = tf.cast(stored, tf.float32)
    inside = x > 0
    return tf.where(inside, (x - 1.0) / 65534.0 * 2.0 - 1.0, -1.0), inside


def breast_crop(stored, crop_size: int, seed):
    """A random ``crop_size`` square of a stored image, centred on a random breast pixel (clipped to the
    image, which is padded with -1 when smaller than the crop); ``seed`` is a stateless seed (2 ints)."""
    import tensorflow as tf

    img, inside = to_unit_range(stored)
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    img = tf.pad(img + 1.0, [[0, tf.maximum(crop_size - h, 0)], [0, tf.maximum(crop_size - w, 0)], [0, 0]]) - 1.0
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    breast = tf.cast(tf.where(inside[..., 0]), tf.int32)
    n = tf.shape(breast)[0]
    candidates = tf.concat([breast, [[h // 2, w // 2]]], 0)  # the image centre if there is no breast pixel
    centre = candidates[tf.random.stateless_uniform([], seed, 0, tf.maximum(n, 1), dtype=tf.int32)]
    top = tf.clip_by_value(centre[0] - crop_size // 2, 0, h - crop_size)
    left = tf.clip_by_value(centre[1] - crop_size // 2, 0, w - crop_size)
    return tf.ensure_shape(img[top:top + crop_size, left:left + crop_size], [crop_size, crop_size, 1])


def style_files(index: dict, data_dir, split: str, style: str) -> tuple[list[str], int]:
    """Shards and record count of one data segment (all labels) in a split."""
    from mammodg.records.reader import streams

    by_key = streams(index, data_dir, split)
    keys = sorted(k for k in by_key if k[0] == style)
    return [p for k in keys for p in by_key[k][0]], sum(by_key[k][1] for k in keys)


def style_batches(cfg: TrainConfig, index: dict, style: str, seed: int, start_step: int = 0):
    """Infinite, shuffled batches ``(batch_size, crop, crop, 1)`` in [-1, 1] of one style's train split."""
    import tensorflow as tf

    from mammodg.records.schema import parse
    from mammodg.sampling.streams import Plan, serialized_stream

    files, count = style_files(index, cfg.data_dir, cfg.train_split, style)
    plan = Plan(keys=[(style, "*")], files=[files], counts=[count], choices=np.zeros(1, np.int32))
    start = start_step * cfg.batch_size
    ds = serialized_stream(plan, seed=seed, start=start, shuffle_budget=max(2, cfg.shuffle_budget // 2))
    crop = cfg.cyclegan.crop_size
    ds = ds.enumerate(start).map(
        lambda i, raw: breast_crop(parse(raw)["image"], crop, tf.stack([tf.constant(seed, tf.int64), i])),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(cfg.batch_size, drop_remainder=True)


# ------------------------------------------------------------------------------------------- training
class ImagePool:
    """The CycleGAN image buffer (Shrivastava et al. 2017): discriminators also see past fakes.

    While fewer than ``size`` images are stored, every queried image is stored and returned as is;
    afterwards each queried image is, with probability 1/2, swapped for a random stored image (the
    stored one is returned, the new one takes its place), else returned as is. ``size`` 0: no pool.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = int(size)
        self.images: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)

    def query(self, images: np.ndarray) -> np.ndarray:
        if self.size == 0:
            return images
        out = []
        for image in images:
            if len(self.images) < self.size:
                self.images.append(image.copy())
                out.append(image)
            elif self.rng.random() < 0.5:
                j = int(self.rng.integers(self.size))
                out.append(self.images[j])
                self.images[j] = image.copy()
            else:
                out.append(image)
        return np.stack(out)


def linear_decay(learning_rate: float, steps: int, decay_start: float):
    """Learning rate ``learning_rate`` until ``decay_start * steps``, then linearly down to 0 at ``steps``."""
    import keras

    class LinearDecay(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            start = decay_start * steps
            frac = (steps - keras.ops.cast(step, "float32")) / max(steps - start, 1.0)
            return learning_rate * keras.ops.clip(frac, 0.0, 1.0)

        def get_config(self):
            return {"learning_rate": learning_rate, "steps": steps, "decay_start": decay_start}

    return LinearDecay()


class CycleGAN:
    """One style pair (A, B): generators ``g_ab``, ``g_ba``, discriminators ``d_a`` (real A vs ``g_ba(B)``)
    and ``d_b``, one Adam for both generators and one for both discriminators, one image pool per
    discriminator. Built from ``cfg`` (``learning_rate``, ``steps`` and the ``cyclegan`` section)."""

    def __init__(self, cfg: TrainConfig, seed: int = 0):
        import keras
        import tensorflow as tf

        from mammodg import models

        c = cfg.cyclegan
        keras.utils.set_random_seed(seed)
        gen = dict(filters=c.generator_filters, n_blocks=c.generator_blocks)
        generator, discriminator = models.get("cyclegan_generator"), models.get("patchgan_discriminator")
        self.g_ab, self.g_ba = generator(**gen, name="G_AB"), generator(**gen, name="G_BA")
        self.d_a = discriminator(filters=c.discriminator_filters, name="D_A")
        self.d_b = discriminator(filters=c.discriminator_filters, name="D_B")
        self.g_vars = self.g_ab.trainable_variables + self.g_ba.trainable_variables
        self.d_vars = self.d_a.trainable_variables + self.d_b.trainable_variables
        lr = linear_decay(cfg.learning_rate, cfg.steps, c.decay_start)
        self.g_opt = keras.optimizers.Adam(lr, beta_1=c.beta_1)
        self.d_opt = keras.optimizers.Adam(lr, beta_1=c.beta_1)
        self.g_opt.build(self.g_vars)  # variables exist before a checkpoint restore
        self.d_opt.build(self.d_vars)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.pool_a, self.pool_b = ImagePool(c.pool_size, seed), ImagePool(c.pool_size, seed + 1)
        self.cycle_weight = float(c.cycle_weight)
        self.identity_weight = float(c.identity_weight) * float(c.cycle_weight)
        self._g_step = tf.function(self._generator_step)
        self._d_step = tf.function(self._discriminator_step)

    def checkpoint(self):
        import tensorflow as tf

        return tf.train.Checkpoint(g_ab=self.g_ab, g_ba=self.g_ba, d_a=self.d_a, d_b=self.d_b,
                                   g_opt=self.g_opt, d_opt=self.d_opt, step=self.step)

    def _generator_step(self, real_a, real_b):
        import tensorflow as tf

        def l1(x, y):
            return tf.reduce_mean(tf.abs(x - y))

        with tf.GradientTape() as tape:
            fake_b, fake_a = self.g_ab(real_a, training=True), self.g_ba(real_b, training=True)
            adv = tf.reduce_mean(tf.square(self.d_b(fake_b) - 1.0)) + tf.reduce_mean(tf.square(self.d_a(fake_a) - 1.0))
            cycle = l1(self.g_ba(fake_b, training=True), real_a) + l1(self.g_ab(fake_a, training=True), real_b)
            total = adv + self.cycle_weight * cycle
            identity = tf.constant(0.0)
            if self.identity_weight > 0:
                identity = l1(self.g_ab(real_b, training=True), real_b) + l1(self.g_ba(real_a, training=True), real_a)
                total += self.identity_weight * identity
        self.g_opt.apply_gradients(zip(tape.gradient(total, self.g_vars), self.g_vars))
        return fake_a, fake_b, {"g_total": total, "g_adv": adv, "cycle": cycle, "identity": identity}

    def _discriminator_step(self, real_a, real_b, fake_a, fake_b):
        import tensorflow as tf

        def lsgan(d, real, fake):  # (MSE(D(real), 1) + MSE(D(fake), 0)) / 2
            real_loss = tf.reduce_mean(tf.square(d(real, training=True) - 1.0))
            return 0.5 * (real_loss + tf.reduce_mean(tf.square(d(fake, training=True))))

        with tf.GradientTape() as tape:
            d_a, d_b = lsgan(self.d_a, real_a, fake_a), lsgan(self.d_b, real_b, fake_b)
            total = d_a + d_b
        self.d_opt.apply_gradients(zip(tape.gradient(total, self.d_vars), self.d_vars))
        return {"d_a": d_a, "d_b": d_b}

    def train_step(self, real_a, real_b) -> dict[str, float]:
        """One generator update then one discriminator update (on pooled fakes); the losses before them."""
        fake_a, fake_b, g = self._g_step(real_a, real_b)
        d = self._d_step(real_a, real_b, self.pool_a.query(fake_a.numpy()), self.pool_b.query(fake_b.numpy()))
        self.step.assign_add(1)
        return {k: float(v) for k, v in {**g, **d}.items()}


def _export_generator(model, run_dir: Path, name: str, saved_model: bool) -> None:
    """``generators/<name>.keras`` and (optionally) ``saved_model/<name>/``, each written then renamed."""
    path = run_dir / "generators" / f"{name}.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)
    if saved_model:
        out = run_dir / "saved_model" / name
        tmp = out.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.export(str(tmp), format="tf_saved_model", verbose=False)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)


def train_pair(cfg: TrainConfig, index: dict, a: str, b: str, run_dir: Path, seed: int) -> None:
    """Train (or resume, or skip when done) the CycleGAN of styles ``a`` and ``b``, then export both generators."""
    import tensorflow as tf

    folder = run_dir / f"pair_{safe_name(a)}__{safe_name(b)}"
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"step": 0, "done": False, "history": []}
    if state["done"] and state["step"] >= cfg.steps:
        print(f"{a} <-> {b}: already trained to step {state['step']}", flush=True)
        return
    gan = CycleGAN(cfg, seed)
    manager = tf.train.CheckpointManager(gan.checkpoint(), str(folder / "ckpt"), max_to_keep=1, checkpoint_name="ckpt")
    if manager.latest_checkpoint:
        gan.checkpoint().restore(manager.latest_checkpoint).assert_existing_objects_matched()
        print(f"{a} <-> {b}: resuming from step {int(gan.step)}", flush=True)
    start = int(gan.step)
    data = tf.data.Dataset.zip((style_batches(cfg, index, a, 2 * seed, start),
                                style_batches(cfg, index, b, 2 * seed + 1, start))).prefetch(2)
    sums, n, t0 = {}, 0, time.perf_counter()
    for step, (real_a, real_b) in enumerate(data.take(max(0, cfg.steps - start)), start + 1):
        losses = gan.train_step(real_a, real_b)
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingError(f"cyclegan pair {a} <-> {b}: loss became NaN/inf at step {step} ({losses}); last good "
                                f"checkpoint: {manager.latest_checkpoint}. Lower learning_rate or check the data.")
        sums = {k: sums.get(k, 0.0) + v for k, v in losses.items()}
        n += 1
        if step % cfg.val_every == 0 or step == cfg.steps:
            manager.save(checkpoint_number=step)
            mean = {k: round(v / n, 4) for k, v in sums.items()}
            ips = 2 * cfg.batch_size * n / (time.perf_counter() - t0)
            state["step"] = step
            state["history"].append({"step": step, **mean, "images_per_s": round(ips, 2)})
            atomic_json(state_path, state)
            print(f"{a} <-> {b} step {step}/{cfg.steps}: G {mean['g_total']:.3f} (adv {mean['g_adv']:.3f} cycle "
                  f"{mean['cycle']:.3f} identity {mean['identity']:.3f})  D_A {mean['d_a']:.3f} D_B {mean['d_b']:.3f}"
                  f"  {ips:.1f} images/s", flush=True)
            sums, n, t0 = {}, 0, time.perf_counter()
    _export_generator(gan.g_ab, run_dir, generator_name(a, b), cfg.export)
    _export_generator(gan.g_ba, run_dir, generator_name(b, a), cfg.export)
    state.update(step=max(start, cfg.steps), done=True)
    atomic_json(state_path, state)


# -------------------------------------------------------------------------------------------- outputs
def validation_examples(cfg: TrainConfig, index: dict, styles: list[str]) -> dict:
    """One image per style, the first record of its validation split (train split if it has none):
    style -> (image (h, w, 1) float32 in [0, 1], mask (h, w, 1) bool)."""
    import tensorflow as tf

    from mammodg.records.schema import parse

    out = {}
    for style in styles:
        files = style_files(index, cfg.data_dir, cfg.val_split, style)[0] if cfg.val_split in index["splits"] else []
        files = files or style_files(index, cfg.data_dir, cfg.train_split, style)[0]
        raw = next(iter(tf.data.TFRecordDataset(files[:1])))
        stored = parse(raw)["image"].numpy().astype(np.float32)
        out[style] = (np.where(stored > 0, (stored - 1) / 65534, 0).astype(np.float32), stored > 0)
    return out


def style_grid(transfer: StyleTransfer, examples: dict, path) -> Path:
    """Figure 4 of the paper: row i = the example of style i and its transfer to every other style
    (diagonal: the original); last row = eq. (2) blending of the first style's example (style A) with its
    transfer to the second style (B), alpha = 0.0, 0.1, ..., 1.0."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    styles = transfer.styles
    m = len(styles)
    cols = max(m, len(BLEND_ALPHAS))
    fig = Figure(figsize=(1.6 * cols, 2.3 * (m + 1)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(m + 1, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def show(ax, img, title):
        ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=7)

    for i, src in enumerate(styles):
        img, mask = examples[src]
        for j, dst in enumerate(styles):
            out = transfer.transfer(img[None], mask[None], src, dst)[0]
            show(axes[i, j], out, f"original\n{src}" if i == j else f"{src}\n-> {dst}")
    img, mask = examples[styles[0]]
    style_b = transfer.transfer(img[None], mask[None], styles[0], styles[1])[0]
    for k, alpha in enumerate(BLEND_ALPHAS):
        show(axes[m, k], img * (1.0 - alpha) + style_b * alpha, f"blend alpha={alpha:.1f}")
    path = Path(path)
    fig.savefig(path)
    return path


def run(cfg: TrainConfig) -> StyleTransfer:
    """Train every pair of seen styles (resuming / skipping), then write styles.json and style_grid.png."""
    from mammodg.records.reader import load_index

    _check(cfg)
    index = load_index(cfg.data_dir)
    styles = seen_styles(cfg, index)
    pairs = list(itertools.combinations(styles, 2))
    run_dir = Path(cfg.resolved_run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    save(cfg, run_dir / "config.yaml")
    print(f"cyclegan: {len(styles)} styles {styles} -> {len(pairs)} pairs of {cfg.steps} steps", flush=True)
    for k, (a, b) in enumerate(pairs):
        train_pair(cfg, index, a, b, run_dir, seed=cfg.seed + k)
    gens = [{"src": s, "dst": d, "keras": f"generators/{generator_name(s, d)}.keras",
             "saved_model": f"saved_model/{generator_name(s, d)}" if cfg.export else None}
            for s in styles for d in styles if s != d]
    atomic_json(run_dir / STYLES_JSON, {"styles": styles, "pairs": [list(p) for p in pairs], "generators": gens})
    transfer = StyleTransfer.load(run_dir)
    grid = style_grid(transfer, validation_examples(cfg, index, styles), run_dir / "style_grid.png")
    print(f"style grid: {grid}\nrun folder: {run_dir}", flush=True)
    return transfer
