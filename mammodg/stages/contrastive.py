"""``--stage contrastive``: multi-style / multi-view contrastive pre-training of a ResNet-50 backbone
(MSVCL v2 sections III-A/B, IV-B). Methods, augmentations and optimizer: README, "Contrastive pre-training".

Inputs: the breast-level pair records of ``contrastive.pairs_dir`` (``mammodg build-pairs``). Output: the
best EMA backbone as ``backbone.weights.h5`` and a SavedModel ``saved_model/``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mammodg.config import ConfigError, TrainConfig
from mammodg.train import Task, Trainer, cluster


def check(cfg: TrainConfig) -> None:
    """Config errors before any data work."""
    from mammodg.augment import METHODS
    from mammodg.optimizers import CONTRASTIVE_OPTIMIZERS

    c = cfg.contrastive
    for name, value, allowed in (("method", c.method, METHODS), ("optimizer", c.optimizer, CONTRASTIVE_OPTIMIZERS)):
        if value not in allowed:
            raise ConfigError(f"contrastive.{name} must be one of {allowed}, got {value!r}")


def pairs_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.contrastive.pairs_dir or Path(cfg.resolved_run_dir()).parent / "pairs")


def check_pairs(cfg: TrainConfig) -> Path:
    """The pair records, or an error naming the command that builds them."""
    from mammodg.augment import multi_style
    from mammodg.records.writer import INDEX_NAME

    out, c = pairs_dir(cfg), cfg.contrastive
    build = f"mammodg build-pairs --data {cfg.data_dir} --out {out}"
    if not (out / INDEX_NAME).is_file():
        styles = f" --cyclegan {c.cyclegan_run or 'RUN'}" if multi_style(c.method) else ""
        raise FileNotFoundError(f"contrastive.pairs_dir: {out / INDEX_NAME} not found; build it with `{build}{styles}`")
    if multi_style(c.method) and c.cyclegan_run and not json.loads((out / INDEX_NAME).read_text())["seen_styles"]:
        raise FileNotFoundError(f"contrastive.pairs_dir: {out} holds no style transfers but {c.method} needs them; "
                                f"rebuild it with `{build} --cyclegan {c.cyclegan_run}`")
    return out


def _decoder(cfg: TrainConfig):
    from mammodg.augment import pair_decoder

    c = cfg.contrastive
    return pair_decoder(c.method, cfg.seed, input_size=c.input_size, crop_scale=c.crop_scale,
                        rotation_deg=c.rotation_deg, jitter=c.jitter, target_mean=cfg.target_mean,
                        crop_overlap=c.crop_overlap)


def contrastive_batches(cfg: TrainConfig, start_step: int = 0):
    """Infinite training batches of pair samples, sampled by ``strategy`` over the pair records' segments."""
    from mammodg.sampling.indexed import indexed_batches

    return indexed_batches(pairs_dir(cfg), _decoder(cfg), split=cfg.train_split, strategy=cfg.strategy,
                           seed=cfg.seed, batch_size=cfg.batch_size, start_step=start_step,
                           shuffle_budget=cfg.shuffle_budget)


def validation_batches(cfg: TrainConfig):
    """The validation breasts once, with the same augmentations at every validation."""
    from mammodg.sampling.indexed import indexed_split

    ds, count = indexed_split(pairs_dir(cfg), _decoder(cfg), split=cfg.val_split)
    return ds.batch(max(2, min(cfg.batch_size, count)), drop_remainder=True)


def _validate(cfg: TrainConfig):
    """NT-Xent and positive-retrieval accuracy of every positive pair on the validation breasts."""
    import keras

    from mammodg.augment import positive_pairs
    from mammodg.losses import nt_xent_per_anchor
    from mammodg.metrics import positive_top1_hits

    pairs = positive_pairs(cfg.contrastive.method)

    def validate(model):
        losses, hits = [], []
        for b, (x, _) in enumerate(validation_batches(cfg)):
            if cfg.val_max_batches and b >= cfg.val_max_batches:
                break
            z = keras.ops.convert_to_numpy(model(x, training=False))
            for i, j in pairs:
                losses.append(keras.ops.convert_to_numpy(nt_xent_per_anchor(z[:, i], z[:, j], cfg.contrastive.temperature)))
                hits.append(positive_top1_hits(z[:, i], z[:, j]))
        if not losses:
            raise ValueError(f"validation split {cfg.val_split!r} of {pairs_dir(cfg)} has fewer than 2 breasts")
        loss, acc = float(np.concatenate(losses).mean()), float(np.concatenate(hits).mean())
        return {"global": {"nt_xent": loss, "positive_top1": acc}, "monitor": loss}

    return validate


def contrastive_task(cfg: TrainConfig) -> Task:
    from mammodg import models
    from mammodg.augment import positive_pairs, views_per_sample
    from mammodg.losses import NTXent
    from mammodg.models import resnet  # noqa: F401  (registers the ResNet builders)
    from mammodg.optimizers import contrastive_optimizer

    c = cfg.contrastive
    return Task(
        build_model=lambda: models.build("contrastive_model", input_shape=(*c.input_size, 1),
                                         projection_dim=c.projection_dim, hidden_dim=c.hidden_dim,
                                         weights=c.weights or None, views=views_per_sample(c.method)),
        loss=NTXent(c.temperature, pairs=positive_pairs(c.method)),
        batches=lambda start: contrastive_batches(cfg, start),
        validate=_validate(cfg), learning_rate=cfg.learning_rate,
        optimizer=contrastive_optimizer(c.optimizer, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
                                        steps=cfg.steps, warmup_steps=c.warmup_steps, weight_decay=c.weight_decay))


def run(cfg: TrainConfig):
    from mammodg.models.resnet import backbone_of

    check(cfg)
    check_pairs(cfg)
    model = Trainer(cfg, cfg.resolved_run_dir(), contrastive_task(cfg)).run()
    if not cluster()[2]:  # the chief writes the run folder
        return model
    run_dir = Path(cfg.resolved_run_dir())
    backbone = backbone_of(model)
    backbone.save_weights(run_dir / "backbone.weights.h5")
    print(f"backbone weights (best EMA): {run_dir / 'backbone.weights.h5'}", flush=True)
    if cfg.export:
        backbone.export(str(run_dir / "saved_model"), format="tf_saved_model", verbose=False)
        print(f"backbone SavedModel: {run_dir / 'saved_model'}", flush=True)
    print(f"run folder: {run_dir}", flush=True)
    return model
