"""``--stage cyclegan``: vendor-style transfer between every pair of seen styles (MSVCL v2 section III-B1).

"Given M seen vendor-style domains, we train C(M, 2) generators": one CycleGAN
(:class:`mammodg.models.cyclegan.CycleGAN`, losses in :mod:`mammodg.losses`) per unordered pair (A, B),
giving both directions, so each image can be rendered in the M-1 other styles. Each pair is one run of
the shared trainer in ``<run_dir>/pair_<A>__<B>/`` (resume, finished-pair skip, NaN stop, TensorBoard,
``state.json``); inputs are random ``crop_size`` breast crops (:mod:`mammodg.augment.gan`); Adam
(``learning_rate``, ``beta_1``) for the generators and for the discriminators, constant then linearly
decayed to 0 from ``decay_start * steps``; no EMA, and the exported generators are the last ones.
Validation: the cycle and identity losses on fixed crops of each style's first validation record.

Run folder (``run_dir``)::

    config.yaml                     the resolved configuration
    pair_<A>__<B>/                  the trainer's run folder of one pair (last.keras, state.json, ...)
    generators/<src>__to__<dst>.keras
    saved_model/<src>__to__<dst>/   SavedModel of the same generator (when ``export``)
    styles.json                     styles, pairs, and the generator files of every ordered (src, dst)
    style_grid.png                  Figure 4 of the paper: transfers between styles and a blending row

``seed + k`` seeds pair k: its initial weights, crops, sample order and image pools.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from pathlib import Path

from mammodg.config import ConfigError, TrainConfig, save
from mammodg.records.styles import STYLES_JSON, StyleTransfer
from mammodg.io.atomic import atomic_write_json
from mammodg.train import Task, Trainer, TrainingError, check_config, cluster


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
    check_config(cfg)
    if c.crop_size % 4 or c.crop_size < 24:
        raise ConfigError(f"cyclegan.crop_size must be a multiple of 4 and >= 24 (generator strides, PatchGAN), "
                          f"got {c.crop_size}")
    if min(c.generator_filters, c.discriminator_filters) < 1:
        raise ConfigError("cyclegan.generator_filters and cyclegan.discriminator_filters must be >= 1")
    if not 0.0 <= c.decay_start <= 1.0:
        raise ConfigError(f"cyclegan.decay_start must be in [0, 1] (a fraction of steps), got {c.decay_start}")
    if c.pool_size < 0 or c.cycle_weight < 0 or c.identity_weight < 0 or c.generator_blocks < 0:
        raise ConfigError("cyclegan.pool_size, cycle_weight, identity_weight and generator_blocks must be >= 0")


def _files(cfg: TrainConfig, index: dict, style: str) -> tuple[list[str], int]:
    """A style's validation records (its train records when the validation split has none)."""
    from mammodg.augment.gan import style_files

    val = style_files(index, cfg.data_dir, cfg.val_split, style) if cfg.val_split in index["splits"] else ([], 0)
    return val if val[0] else style_files(index, cfg.data_dir, cfg.train_split, style)


def pair_task(cfg: TrainConfig, index: dict, a: str, b: str) -> Task:
    """The trainer's task for the CycleGAN of styles ``a`` and ``b`` (seeded by ``cfg.seed``)."""
    import keras
    import tensorflow as tf

    from mammodg.augment.gan import breast_crop, style_batches, style_files
    from mammodg.models.cyclegan import CycleGAN, LinearDecay
    from mammodg.records.schema import parse

    c = cfg.cyclegan
    crops = dict(batch_size=cfg.batch_size, crop_size=c.crop_size, shuffle_budget=cfg.shuffle_budget // 2)

    def batches(start):
        streams = [style_batches(*style_files(index, cfg.data_dir, cfg.train_split, s), seed=2 * cfg.seed + i,
                                 start_step=start, **crops) for i, s in enumerate((a, b))]
        return tf.data.Dataset.zip(tuple(streams)).prefetch(2)

    @functools.cache
    def val_crops(style):  # fixed crops of the style's first validation record, made once
        stored = parse(next(iter(tf.data.TFRecordDataset(_files(cfg, index, style)[0][:1]))))["image"]
        seeds = [tf.constant([0, i], tf.int64) for i in range(cfg.batch_size)]
        return tf.stack([breast_crop(stored, c.crop_size, seed) for seed in seeds])

    def validate(model):
        losses = {k: float(v) for k, v in model.losses_of(val_crops(a), val_crops(b), training=False)[0].items()}
        return {"monitor": losses["cycle"], "global": losses}

    def compile_(model):
        lr = LinearDecay(cfg.learning_rate, cfg.steps, c.decay_start)
        model.compile(keras.optimizers.Adam(lr, beta_1=c.beta_1), keras.optimizers.Adam(lr, beta_1=c.beta_1))

    return Task(build_model=lambda: CycleGAN(c.crop_size, c.generator_filters, c.generator_blocks,
                                             c.discriminator_filters, c.pool_size, c.cycle_weight,
                                             c.identity_weight * c.cycle_weight, seed=cfg.seed),
                loss=None, batches=batches, validate=validate, learning_rate=cfg.learning_rate,
                compile=compile_, select_best=False)


def _save_generator(model, run_dir: Path, name: str) -> None:
    """``generators/<name>.keras`` (what :class:`StyleTransfer` loads), written then renamed."""
    from mammodg.io.atomic import atomic_path

    path = run_dir / "generators" / f"{name}.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def train_pair(cfg: TrainConfig, index: dict, a: str, b: str, run_dir: Path, k: int) -> bool:
    """Train (or resume, or skip when done) pair ``k``, styles ``a`` and ``b``, then export both generators
    (unless they exist and nothing was trained); whether any step was trained."""
    pair_cfg = dataclasses.replace(cfg, seed=cfg.seed + k)
    print(f"cyclegan pair {a} <-> {b}", flush=True)
    trainer = Trainer(pair_cfg, run_dir / f"pair_{safe_name(a)}__{safe_name(b)}", pair_task(pair_cfg, index, a, b))
    try:
        gan = trainer.run()
    except TrainingError as e:
        raise TrainingError(f"cyclegan pair {a} <-> {b}: {e}") from None
    names = generator_name(a, b), generator_name(b, a)
    if cluster()[2] and (trainer.trained or not all((run_dir / "generators" / f"{n}.keras").is_file() for n in names)):
        for generator, name in zip((gan.g_ab, gan.g_ba), names):
            _save_generator(generator, run_dir, name)
    return trainer.trained


def run(cfg: TrainConfig) -> StyleTransfer | None:
    """Train every pair of seen styles (resuming / skipping), then write styles.json and style_grid.png
    (the chief only: other workers of a multi-worker run return None)."""
    from mammodg.augment.gan import first_image
    from mammodg.records.reader import load_index
    from mammodg.report import style_grid

    _check(cfg)
    index = load_index(cfg.data_dir)
    styles = seen_styles(cfg, index)
    pairs = list(itertools.combinations(styles, 2))
    run_dir = Path(cfg.resolved_run_dir())
    print(f"cyclegan: {len(styles)} styles {styles} -> {len(pairs)} pairs of {cfg.steps} steps", flush=True)
    trained = [train_pair(cfg, index, a, b, run_dir, k) for k, (a, b) in enumerate(pairs)]
    if not cluster()[2]:  # multi-worker: only the chief writes the run folder (generators, styles, export)
        return None
    if any(trained) or not (run_dir / "config.yaml").is_file():  # a finished run keeps its config
        save(cfg, run_dir / "config.yaml")
    gens = [{"src": s, "dst": d, "keras": f"generators/{generator_name(s, d)}.keras",
             "saved_model": f"saved_model/{generator_name(s, d)}" if cfg.export else None}
            for s in styles for d in styles if s != d]
    atomic_write_json(run_dir / STYLES_JSON, {"styles": styles, "pairs": [list(p) for p in pairs], "generators": gens})
    transfer = StyleTransfer.load(run_dir)
    examples = {s: first_image(_files(cfg, index, s)[0]) for s in styles}
    grid = style_grid(transfer, examples, run_dir / "style_grid.png")
    if cfg.export and (any(trained) or not (run_dir / "saved_model").is_dir()):
        from mammodg.export import export_run

        export_run(run_dir)  # saved_model/<src>__to__<dst>/, the export contract's signatures
    print(f"style grid: {grid}\nrun folder: {run_dir}", flush=True)
    return transfer
