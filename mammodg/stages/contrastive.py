"""``--stage contrastive``: multi-style / multi-view contrastive pre-training (MSVCL v2 sections III-A/B).

Positive pairs, per ``contrastive.method`` (each side then gets its own random augmentation):

- ``simclr``: one image (a random view of the breast, its own style) twice;
- ``mscl``: one image (random view) in two different styles: one pure, the other a blend (eq. 2) that is
  at most half the first style (see :func:`choose`);
- ``mvcl``: the CC and the MLO view of the same breast, own style;
- ``msvcl``: "optimization of both multi-style and -view contrastive losses" (section III-B): three views
  per breast, the CC (anchor), the CC in another style (multi-style pair) and the MLO in another style
  (multi-view pair); the loss is the mean of the two pairs' NT-Xent losses.

A batch holds N different breasts; ``view1`` of every sample is the CC (MVCL/MSVCL) so the negatives
of an anchor include the same view of the other patients. Breasts with one view give same-view pairs.

Augmentations (section IV-B): random crop (area ``crop_scale``, aspect 3/4..4/3, centred on a random
breast pixel and kept inside the image; with ``crop_overlap`` the crops of one view of a sample share a
breast point) resized to ``input_size`` and rotated within +/- ``rotation_deg`` about its centre (one
resampling of the output pixels only), horizontal flip, intensity jitter of strength ``jitter``
(brightness and contrast factors in [1 - 0.8 s, 1 + 0.8 s], as SimCLR's colour jitter).
Randomness is stateless, seeded by (seed, sample index), so a resumed run draws what an uninterrupted
one would have.

Optimiser (``contrastive.optimizer``): LARS is not in Keras; ``sgd`` (the default) is SGD (momentum 0.9,
weight decay ``contrastive.weight_decay``) with a cosine schedule (optional linear warm-up) and SimCLR's
linear scaling: the peak rate is ``learning_rate * batch_size / 256`` (the paper's 0.3 at batch 256).
Without LARS' per-layer scaling that rate barely moves a ResNet-50 in a few hundred small-batch steps,
so short runs (the demo) use ``adamw``: AdamW with the same schedule and peak ``learning_rate``.
EMA, validation (NT-Xent and positive-retrieval accuracy on the validation breasts), checkpoints and
resume come from the shared trainer. The backbone is written as ``backbone.weights.h5`` and as a SavedModel ``saved_model/``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mammodg.config import TrainConfig
from mammodg.train import Task, Trainer

METHODS = ("simclr", "mscl", "mvcl", "msvcl")


def _uniform(seed, shape=(), lo=0.0, hi=1.0):
    import tensorflow as tf

    return tf.random.stateless_uniform(shape, seed, lo, hi)


def _randint(seed, n):
    import tensorflow as tf

    return tf.random.stateless_uniform([], seed, 0, tf.maximum(n, 1), dtype=tf.int32)


def views_per_sample(method: str) -> int:
    """How many views of a breast one sample holds: 3 for MSVCL (a multi-style and a multi-view pair
    sharing their anchor), 2 otherwise."""
    return 3 if method == "msvcl" else 2


def positive_pairs(method: str) -> tuple[tuple[int, int], ...]:
    """The positive pairs among a sample's views (indices into view1, view2, ...)."""
    return ((0, 1), (0, 2)) if method == "msvcl" else ((0, 1),)


def choose(n_views, n_styles, method: str, seed):
    """What a sample is made of: per side (``view1``, ``view2``[, ``view3``]) a view and styles (a, b)
    blended with alpha (eq. 2).

    - ``simclr``: one random view of the breast twice, own style;
    - ``mscl``: one random view in two different styles;
    - ``mvcl``: the CC and the MLO, own style;
    - ``msvcl``: both losses of the paper's synergy, sharing an anchor: side 1 the CC, side 2 the CC in
      another style (the multi-style pair 1-2), side 3 the MLO in another style (the multi-view pair 1-3).

    Multi-style positives are always two *different* styles of the source (the paper's C(M, 2) style
    pairs x 11 blends): one side is a pure style ``s``, the other any blend ``a * (1 - alpha) + b * alpha``
    of two styles with ``a != s`` and ``alpha`` in {0, 0.1, .., 0.5}, so ``s`` carries at most half of it
    (every blend of eq. 2 is one of these up to swapping ``a`` and ``b``). Which side is pure is random
    (for MSVCL: the anchor, or else both of its partners). Were the sides drawn independently, a third
    of the pairs would share their style and style itself would become a cue that matches positives:
    the opposite of the invariance sought. A breast with one view gives same-view pairs."""
    import tensorflow as tf

    k = views_per_sample(method)
    s = tf.random.experimental.stateless_split(seed, 9)
    if method == "mvcl":  # CC with MLO of the same breast (same view twice if only one)
        views = [tf.constant(0), tf.minimum(1, n_views - 1)]
    elif method == "msvcl":
        views = [tf.constant(0), tf.constant(0), tf.minimum(1, n_views - 1)]
    else:  # one random view of the breast, twice
        views = [_randint(s[0], n_views)] * 2
    out = {f"view{i + 1}": v for i, v in enumerate(views)}
    if method in ("mscl", "msvcl"):
        pure = _randint(s[1], n_styles)
        p_side = (pure, pure, tf.constant(0.0))

        def blend(s1, s2, s3):  # any blend with at most half of ``pure``
            other = (pure + 1 + _randint(s1, n_styles - 1)) % n_styles  # != pure (when there are 2+ styles)
            return other, _randint(s2, n_styles), tf.cast(_randint(s3, 6), tf.float32) / 10.0

        blends = [blend(s[2], s[3], s[4]), blend(s[6], s[7], s[8])]
        anchor_pure = _uniform(s[5]) < 0.5
        sides = [(anchor_pure, p_side, blends[0])] + [(anchor_pure, blends[i - 1], p_side) for i in range(1, k)]
        for i, (pick, if_pure, if_blend) in enumerate(sides, start=1):
            for j, key in enumerate(("a", "b")):
                out[f"style{i}_{key}"] = tf.where(pick, if_pure[j], if_blend[j])
            out[f"alpha{i}"] = tf.where(pick, if_pure[2], if_blend[2])
    else:
        for i in range(1, k + 1):
            out.update({f"style{i}_a": tf.constant(0), f"style{i}_b": tf.constant(0), f"alpha{i}": tf.constant(0.0)})
    return out


def _styled(images, n_styles, view, a, b, alpha):
    """The stored image of ``view`` as ``style_a * (1 - alpha) + style_b * alpha`` (eq. 2)."""
    import tensorflow as tf

    def decode(i):
        return tf.cast(tf.io.decode_png(images[view * n_styles + i], channels=1, dtype=tf.uint16), tf.float32)

    return tf.cond(tf.equal(a, b) | tf.equal(alpha, 0.0), lambda: decode(a),
                   lambda: decode(a) * (1.0 - alpha) + decode(b) * alpha)


def crop_input(stored, boxes, cfg: TrainConfig, angles=None):
    """``boxes`` (k, 4: y0, x0, y1, x1 as fractions of the sides, sampled like ``tf.image.crop_and_resize``)
    of a stored-encoding float image (h, w, 1), each rotated by ``angles`` (k,) radians about its centre
    and resized to ``input_size``, in one bilinear resampling of only the output pixels: (k, *input_size, 1)
    model inputs. Outside the breast (and the image) is the whole image's constant
    (:func:`mammodg.records.schema.outside_constant`): a crop's own would run far below 0 when the crop
    is nearly all breast."""
    import tensorflow as tf

    from mammodg.records.schema import model_input, outside_constant

    oh, ow = cfg.contrastive.input_size
    h, w = tf.cast(tf.shape(stored)[0], tf.float32), tf.cast(tf.shape(stored)[1], tf.float32)
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    y0, x0, y1, x1 = tf.unstack(boxes, axis=1)
    angles = tf.zeros_like(y0) if angles is None else tf.convert_to_tensor(angles, tf.float32)
    sy, sx = (y1 - y0) * (h - 1) / max(oh - 1, 1), (x1 - x0) * (w - 1) / max(ow - 1, 1)  # input px per output px
    cy, cx = (y0 + y1) / 2 * (h - 1), (x0 + x1) / 2 * (w - 1)
    c, s = tf.cos(angles), tf.sin(angles)
    a0, a1, b0, b1 = c * sx, -s * sy, s * sx, c * sy  # output (x, y) -> input, about the box centre
    a2 = cx - a0 * (ow - 1) / 2 - a1 * (oh - 1) / 2
    b2 = cy - b0 * (ow - 1) / 2 - b1 * (oh - 1) / 2
    zero = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=1)
    k = tf.shape(boxes)[0]
    x = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.repeat(stored[None], k, axis=0), transforms=transforms, output_shape=[oh, ow], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")
    # interpolation blur across the breast edge stays outside
    return model_input(tf.where(x >= 1.0, x, 0.0), cfg.target_mean, fill=outside_constant(stored, cfg.target_mean))


def evaluation_tiles(stored: np.ndarray, cfg: TrainConfig, min_breast: float = 0.5) -> np.ndarray:
    """Deterministic encoder inputs of one stored image (h, w) at the scale the encoder was trained on:
    the image resized to ``pair_size``, cut into an even grid of square-fraction tiles of the mean
    training-crop area (``sqrt(mean(crop_scale))`` of each side), each resized to ``input_size`` as in
    :func:`augment` (no rotation, flip or jitter). Tiles less than ``min_breast`` inside the breast are
    dropped (the most-breast tile is always kept). Returns (k, *input_size, 1)."""
    import tensorflow as tf

    from mammodg.preprocess.breast import resize_stored

    c = cfg.contrastive
    if c.pair_size:
        stored = resize_stored(stored, *c.pair_size)
    h, w = stored.shape
    side = math.sqrt(float(np.mean(c.crop_scale)))
    starts = np.linspace(0.0, 1.0 - side, math.ceil(1.0 / side - 1e-6))
    boxes = [(y, x, y + side, x + side) for y in starts for x in starts]
    inside = stored > 0
    frac = np.array([inside[round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)].mean() for y0, x0, y1, x1 in boxes])
    keep = np.flatnonzero(frac >= min_breast) if (frac >= min_breast).any() else [int(frac.argmax())]
    return crop_input(tf.constant(stored[..., None], tf.float32), tf.constant([boxes[i] for i in keep], tf.float32), cfg).numpy()


def breast_point(stored, seed):
    """A random breast pixel of a stored-encoding image (h, w, 1) as fractions (y, x) of its sides
    (anywhere when there is no breast). Every style of a view has the same mask, so the same seed gives
    the same point in each."""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, 2)
    breast = tf.cast(tf.where(stored[..., 0] >= 1.0), tf.float32)
    return tf.cond(tf.shape(breast)[0] > 0,
                   lambda: tf.gather(breast, _randint(s[0], tf.shape(breast)[0])) / tf.cast(tf.shape(stored)[:2], tf.float32),
                   lambda: _uniform(s[1], (2,)))


def crop_box(stored, seed, cfg: TrainConfig, point=None):
    """A random crop (section IV-B) of a stored-encoding image (h, w, 1): box (y0, x0, y1, x1) as
    fractions of the sides (area ``crop_scale``, aspect 3/4..4/3, kept inside the image) and its rotation
    (radians). Centred on a random breast pixel, or, given ``point``, placed at random among the crops of
    that size that contain it."""
    import tensorflow as tf

    c = cfg.contrastive
    s = tf.random.experimental.stateless_split(seed, 5)
    area = _uniform(s[1], (), *c.crop_scale)
    ratio = tf.clip_by_value(tf.exp(_uniform(s[2], (), math.log(3 / 4), math.log(4 / 3))), area, 1 / area)  # crop fits
    size = tf.stack([tf.sqrt(area * ratio), tf.sqrt(area / ratio)])  # fractions of the image height and width
    if point is None:
        centre = breast_point(stored, s[3])
    else:  # the crop contains ``point`` (still so once shifted inside the image)
        centre = point + (_uniform(s[4], (2,)) - 0.5) * size
    y0, x0 = tf.unstack(tf.clip_by_value(centre - size / 2, 0.0, 1.0 - size))
    angle = _uniform(s[0], (), -c.rotation_deg, c.rotation_deg) * math.pi / 180  # about the crop centre
    return tf.stack([y0, x0, y0 + size[0], x0 + size[1]]), angle


def augment(stored, seed, cfg: TrainConfig, point=None):
    """Stored-encoding float image (h, w, 1) -> augmented model input ``input_size`` (section IV-B):
    :func:`crop_box` (containing ``point`` when given), horizontal flip, intensity jitter."""
    import tensorflow as tf

    c = cfg.contrastive
    s = tf.random.experimental.stateless_split(seed, 3)
    box, angle = crop_box(stored, s[0], cfg, point)
    x = crop_input(stored, box[None], cfg, angle[None])[0]
    x = tf.cond(_uniform(s[1]) < 0.5, lambda: tf.image.flip_left_right(x), lambda: x)
    bc = _uniform(s[2], (2,), 1 - 0.8 * c.jitter, 1 + 0.8 * c.jitter)
    x = x * bc[0]
    mean = tf.reduce_mean(x)
    return (x - mean) * bc[1] + mean  # not clipped: the outside constant of model_input may lie outside [0, 1]


def pair_decoder(cfg: TrainConfig):
    """(sample index, serialized pair record) -> ({"view1", "view2"[, "view3"]}, 0) per ``contrastive.method``.

    With ``contrastive.crop_overlap`` the crops of sides showing the same view (SimCLR's and MSCL's
    two sides, MSVCL's multi-style pair) contain one common breast point: SimCLR's large crops
    (8-100% of an image) nearly always overlap, small full-resolution crops placed independently
    rarely do, and two crops of different tissue share little but the style, which then becomes the
    cue that matches positives."""
    import tensorflow as tf

    from mammodg.records.pairs import parse_pair

    check(cfg)
    method = cfg.contrastive.method
    h, w = cfg.contrastive.input_size
    k = views_per_sample(method)

    def decode(i, raw):
        r = parse_pair(raw)
        n_styles = tf.size(r["styles"])
        seeds = tf.random.experimental.stateless_split(tf.stack([tf.cast(cfg.seed, tf.int64), i]), k + 2)
        c = choose(tf.size(r["views"]), n_styles, method, seeds[0])
        views = {}
        for side in range(1, k + 1):
            view = c[f"view{side}"]
            img = _styled(r["images"], n_styles, view, c[f"style{side}_a"], c[f"style{side}_b"], c[f"alpha{side}"])
            point = None
            if cfg.contrastive.crop_overlap:  # one point per view of the breast
                point = breast_point(img, tf.random.experimental.stateless_fold_in(seeds[1], tf.cast(view, tf.int64)))
            views[f"view{side}"] = tf.ensure_shape(augment(img, seeds[side + 1], cfg, point), [h, w, 1])
        return views, tf.constant(0.0)

    return decode


def pairs_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.contrastive.pairs_dir or Path(cfg.resolved_run_dir()).parent / "pairs")


def contrastive_batches(cfg: TrainConfig, start_step: int = 0):
    """Infinite training batches of pairs, sampled by ``cfg.strategy`` over the pair records' segments."""
    import tensorflow as tf

    from mammodg.records.reader import load_index
    from mammodg.sampling.streams import make_plan, serialized_stream

    data = pairs_dir(cfg)
    plan = make_plan(load_index(data), data, cfg.train_split, cfg.strategy, cfg.seed)
    start = start_step * cfg.batch_size
    ds = serialized_stream(plan, seed=cfg.seed, start=start, shuffle_budget=cfg.shuffle_budget)
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(start, np.iinfo(np.int64).max), ds)
    ds = ds.map(pair_decoder(cfg), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(cfg.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def validation_batches(cfg: TrainConfig):
    """The validation breasts once, with fixed augmentations (same draws at every validation)."""
    import tensorflow as tf

    from mammodg.records.reader import all_shards, load_index

    data = pairs_dir(cfg)
    index = load_index(data)
    files = sorted(all_shards(index, data, cfg.val_split))
    count = sum(e["count"] for seg in index["splits"][cfg.val_split].values() for e in seg.values())
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(10**12, 10**12 + count), tf.data.TFRecordDataset(files))
    ds = ds.map(pair_decoder(cfg), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(max(2, min(cfg.batch_size, count)), drop_remainder=True)


def _validate(cfg: TrainConfig):
    import keras

    from mammodg.losses import nt_xent_per_anchor

    pairs = positive_pairs(cfg.contrastive.method)

    def validate(model):
        losses, hits = [], []
        for b, (x, _) in enumerate(validation_batches(cfg)):
            if cfg.val_max_batches and b >= cfg.val_max_batches:
                break
            z = keras.ops.convert_to_numpy(model(x, training=False))
            for i, j in pairs:
                losses.append(keras.ops.convert_to_numpy(nt_xent_per_anchor(z[:, i], z[:, j], cfg.contrastive.temperature)))
                hits.append(_retrieval_hits(z[:, i], z[:, j]))
        if not losses:
            raise ValueError(f"validation split {cfg.val_split!r} of {pairs_dir(cfg)} has fewer than 2 breasts")
        loss, acc = float(np.concatenate(losses).mean()), float(np.concatenate(hits).mean())
        return {"global": {"nt_xent": loss, "positive_top1": acc}, "monitor": loss}

    return validate


def _retrieval_hits(z1: np.ndarray, z2: np.ndarray) -> np.ndarray:
    """For each of the 2N samples of a pair batch: is its most similar other sample its positive?"""
    n = len(z1)
    flat = np.concatenate([z1, z2])
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    sim = flat @ flat.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1) == (np.arange(2 * n) + n) % (2 * n)


OPTIMIZERS = ("sgd", "adamw")


def check(cfg: TrainConfig) -> None:
    """Config errors before any long work (building data or pairs, training a CycleGAN)."""
    from mammodg.config import ConfigError

    c = cfg.contrastive
    for name, value, allowed in (("method", c.method, METHODS), ("optimizer", c.optimizer, OPTIMIZERS)):
        if value not in allowed:
            raise ConfigError(f"contrastive.{name} must be one of {allowed}, got {value!r}")


def _optimizer(cfg: TrainConfig):
    import keras

    check(cfg)
    c = cfg.contrastive

    def make(**ema):
        peak = cfg.learning_rate * cfg.batch_size / 256 if c.optimizer == "sgd" else cfg.learning_rate
        decay = max(1, cfg.steps - c.warmup_steps)
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0 if c.warmup_steps else peak, decay, warmup_target=peak if c.warmup_steps else None,
            warmup_steps=c.warmup_steps)
        if c.optimizer == "adamw":
            return keras.optimizers.AdamW(schedule, weight_decay=c.weight_decay, **ema)
        return keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=c.weight_decay or None, **ema)

    return make


def contrastive_task(cfg: TrainConfig) -> Task:
    from mammodg import models
    from mammodg.losses import NTXent
    from mammodg.models import resnet  # noqa: F401  (registers the ResNet builders)

    c = cfg.contrastive
    return Task(
        build_model=lambda: models.build("contrastive_model", input_shape=(*c.input_size, 1),
                                         projection_dim=c.projection_dim, hidden_dim=c.hidden_dim,
                                         weights=c.weights or None, views=views_per_sample(c.method)),
        loss=NTXent(c.temperature, pairs=positive_pairs(c.method)),
        batches=lambda start: contrastive_batches(cfg, start),
        validate=_validate(cfg), learning_rate=cfg.learning_rate, optimizer=_optimizer(cfg))


def prepare(cfg: TrainConfig) -> Path:
    """Make sure the pair records exist: build them (and, for the demo, the dataset and CycleGAN run)."""
    from mammodg.config import load
    from mammodg.records.pairs import build_pairs, format_pairs_summary
    from mammodg.records.writer import INDEX_NAME

    out = pairs_dir(cfg)
    c = cfg.contrastive
    multi_style = c.method in ("mscl", "msvcl")
    if (out / INDEX_NAME).is_file():
        if not (multi_style and c.cyclegan_run and not json.loads((out / INDEX_NAME).read_text())["seen_styles"]):
            return out
        print(f"{out} holds no style transfers but {c.method} needs them: rebuilding it", flush=True)
    if not (Path(cfg.data_dir) / INDEX_NAME).is_file():
        from mammodg.demo import DEMO_DATA, build_demo_dataset

        if Path(cfg.data_dir) != DEMO_DATA:
            raise FileNotFoundError(f"data_dir: {Path(cfg.data_dir) / INDEX_NAME} not found; build it with "
                                    "mammodg build-tfrecords")
        print("demo dataset missing: building it (real CBIS-DDSM cases + phantoms)", flush=True)
        build_demo_dataset(DEMO_DATA.parent)
    if multi_style and c.cyclegan_run and not (Path(c.cyclegan_run) / "styles.json").is_file():
        if not c.cyclegan_config:
            raise FileNotFoundError(f"contrastive.cyclegan_run: {c.cyclegan_run}/styles.json not found; train it "
                                    "(mammodg train --stage cyclegan) or set contrastive.cyclegan_config")
        from mammodg.stages import run as run_stage

        gan_config = Path(c.cyclegan_config)
        if not gan_config.is_file():  # a repository-relative path (configs/...) used from elsewhere
            gan_config = Path(__file__).resolve().parents[2] / c.cyclegan_config
        print(f"CycleGAN run {c.cyclegan_run} missing: training it with {gan_config}", flush=True)
        gan_cfg = load(TrainConfig, gan_config, ["stage=cyclegan", f"run_dir={c.cyclegan_run}",
                                                        f"data_dir={cfg.data_dir}"])
        run_stage("cyclegan", gan_cfg)
    transfer = None
    if multi_style and c.cyclegan_run:
        from mammodg.records.styles import StyleTransfer

        transfer = StyleTransfer.load(c.cyclegan_run)
    elif multi_style:
        print("warning: multi-style method without contrastive.cyclegan_run: every image keeps its own style only",
              flush=True)
    index = build_pairs(cfg.data_dir, out, transfer=transfer, size=tuple(c.pair_size) or None)
    print(format_pairs_summary(index), flush=True)
    return out


def run(cfg: TrainConfig):
    from mammodg.models.resnet import backbone_of

    check(cfg)
    prepare(cfg)
    model = Trainer(cfg, cfg.resolved_run_dir(), contrastive_task(cfg)).run()
    run_dir = Path(cfg.resolved_run_dir())
    backbone = backbone_of(model)
    backbone.save_weights(run_dir / "backbone.weights.h5")
    print(f"backbone weights (best EMA): {run_dir / 'backbone.weights.h5'}", flush=True)
    if cfg.export:
        backbone.export(str(run_dir / "saved_model"), format="tf_saved_model", verbose=False)
        print(f"backbone SavedModel: {run_dir / 'saved_model'}", flush=True)
    print(f"run folder: {run_dir}", flush=True)
    return model
