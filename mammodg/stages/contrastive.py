"""``--stage contrastive``: multi-style / multi-view contrastive pre-training of a ResNet backbone
(MSVCL v2 sections III-A/B, IV-B). Methods, augmentations and optimizer: README, "Contrastive pre-training".

Inputs: the breast-level pair records of ``contrastive.pairs_dir`` (``mammodg build-pairs``). Output: the
best EMA backbone as ``backbone.weights.h5`` and a SavedModel ``saved_model/``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mammodg.config import ConfigError, TrainConfig
from mammodg.stages.contrastive_report import format_scores, learning_summary, pair_scores
from mammodg.train import Task, Trainer, cluster


def check(cfg: TrainConfig) -> None:
    """Config errors before any data work."""
    from mammodg.augment import METHODS
    from mammodg.optimizers import CONTRASTIVE_OPTIMIZERS

    c = cfg.contrastive
    for name, value, allowed in (("method", c.method, METHODS), ("optimizer", c.optimizer, CONTRASTIVE_OPTIMIZERS)):
        if value not in allowed:
            raise ConfigError(f"contrastive.{name} must be one of {allowed}, got {value!r}")
    if not 0.0 <= c.overlap_shift <= 1.0:  # beyond 1 a crop could miss the shared point
        raise ConfigError(f"contrastive.overlap_shift must lie in [0, 1], got {c.overlap_shift!r}")


def pairs_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.contrastive.pairs_dir or Path(cfg.resolved_run_dir()).parent / "pairs")


def check_pairs(cfg: TrainConfig) -> Path:
    """The pair records, or an error naming the command that builds them."""
    from mammodg.augment import uses_styles
    from mammodg.records.writer import INDEX_NAME

    out, c = pairs_dir(cfg), cfg.contrastive
    build = f"mammodg build-pairs --data {cfg.data_dir} --out {out}"
    if not (out / INDEX_NAME).is_file():
        styles = f" --cyclegan {c.cyclegan_run or 'RUN'}" if uses_styles(c.method) else ""
        raise FileNotFoundError(f"contrastive.pairs_dir: {out / INDEX_NAME} not found; build it with `{build}{styles}`")
    if uses_styles(c.method) and c.cyclegan_run and not json.loads((out / INDEX_NAME).read_text())["seen_styles"]:
        raise FileNotFoundError(f"contrastive.pairs_dir: {out} holds no style transfers but {c.method} needs them; "
                                f"rebuild it with `{build} --cyclegan {c.cyclegan_run}`")
    return out


def _decoder(cfg: TrainConfig):
    from mammodg.augment import pair_decoder

    c = cfg.contrastive
    return pair_decoder(c.method, cfg.seed, input_size=c.input_size, crop_scale=c.crop_scale,
                        rotation_deg=c.rotation_deg, jitter=c.jitter, target_mean=cfg.target_mean,
                        crop_overlap=c.crop_overlap, view_crop_scale=c.view_crop_scale or None,
                        overlap_shift=c.overlap_shift)


def contrastive_batches(cfg: TrainConfig, start_step: int = 0):
    """Infinite training batches of pair samples, sampled by ``strategy`` over the pair records' segments."""
    from mammodg.sampling.indexed import indexed_batches

    return indexed_batches(pairs_dir(cfg), _decoder(cfg), split=cfg.train_split, strategy=cfg.strategy,
                           seed=cfg.seed, batch_size=cfg.batch_size, start_step=start_step,
                           shuffle_budget=cfg.shuffle_budget)


def validation_size(cfg: TrainConfig, count: int) -> int:
    """Breasts per validation batch: ``contrastive.val_breasts`` (at least 32 by default) or the training
    batch if larger, all ``count`` validation breasts if fewer. Retrieval among few breasts is noisy and
    its chance level high, so the validation batch never follows a small training batch down."""
    return min(count, max(cfg.contrastive.val_breasts, cfg.batch_size))


def validation_batches(cfg: TrainConfig):
    """The validation breasts once, in batches of :func:`validation_size`, with the same augmentations at
    every validation. Returns (batches, breasts per batch, breasts in the split)."""
    from mammodg.sampling.indexed import indexed_split

    ds, count = indexed_split(pairs_dir(cfg), _decoder(cfg), split=cfg.val_split)
    if count < 2:
        raise ValueError(f"validation split {cfg.val_split!r} of {pairs_dir(cfg)} has {count} breast(s); "
                         "contrastive validation needs at least 2")
    size = validation_size(cfg, count)
    return ds.batch(size, drop_remainder=True), size, count


def _validate(cfg: TrainConfig):
    """NT-Xent and positive top-1 (with its chance level) of each pair type on the validation breasts.

    Scores go to history.json as ``global`` keys ``<type>_nt_xent``, ``<type>_top1``, ``<type>_top1_chance``,
    ``<type>_anchors`` and ``<type>_top1_p`` (one-sided exact test of the hits against chance), and
    ``nt_xent`` (the mean over pair types, the monitored value)."""
    import keras

    from mammodg.metrics import top1_above_chance_p

    c = cfg.contrastive
    told = []

    def validate(model):
        batches, size, count = validation_batches(cfg)
        if not told:
            few = f" (fewer than {c.val_breasts}: all of them)" if count < c.val_breasts else ""
            print(f"validation: {count} breasts of split {cfg.val_split!r}{few}, in batches of {size}", flush=True)
            told.append(True)
        per = {}
        for b, (x, g) in enumerate(batches):
            if cfg.val_max_batches and b >= cfg.val_max_batches:
                break
            z = keras.ops.convert_to_numpy(model(x, training=False))
            for kind, vals in pair_scores(z, g.numpy(), c.method, c.temperature).items():
                for k, v in vals.items():
                    per.setdefault(kind, {}).setdefault(k, []).append(v)
        scores = {f"{kind}_{k}": float(np.concatenate(v).mean()) for kind, vals in per.items() for k, v in vals.items()}
        for kind, vals in per.items():  # hits vs chance over all anchors: one-sided exact test
            hits, chance = np.concatenate(vals["top1"]), np.concatenate(vals["top1_chance"])
            scores[f"{kind}_anchors"], scores[f"{kind}_top1_p"] = len(hits), top1_above_chance_p(hits, chance)
        loss = float(np.mean([scores[f"{kind}_nt_xent"] for kind in per]))
        print(format_scores(scores, c.method), flush=True)
        return {"global": {"nt_xent": loss, **scores}, "monitor": loss}

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
                                         weights=c.weights or None, views=views_per_sample(c.method),
                                         backbone=c.backbone, width=c.width),
        loss=NTXent(c.temperature, pairs=positive_pairs(c.method), groups=True),  # y_true: patient group ids
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
    history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").is_file() else []
    if history:  # the learning figures at the end of the log
        print(f"last validation (step {history[-1]['step']}): {format_scores(history[-1]['global'], cfg.contrastive.method)}",
              flush=True)
        print(learning_summary(history, cfg.contrastive.method), flush=True)
    backbone = backbone_of(model)
    backbone.save_weights(run_dir / "backbone.weights.h5")
    print(f"backbone weights (best EMA): {run_dir / 'backbone.weights.h5'}", flush=True)
    if cfg.export:
        backbone.export(str(run_dir / "saved_model"), format="tf_saved_model", verbose=False)
        print(f"backbone SavedModel: {run_dir / 'saved_model'}", flush=True)
    print(f"run folder: {run_dir}", flush=True)
    return model
