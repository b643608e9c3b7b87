"""Training stages: ``mammodg train --stage NAME`` calls ``run(name, cfg)``.

Each stage module exposes ``run(cfg: TrainConfig)``; the stage name selects it here (one place).
"""
from __future__ import annotations

import importlib
from pathlib import Path

# stage name -> module under mammodg.stages
STAGE_MODULES = {
    "patch": "patch",
    "classifier": "classifier",
    "cyclegan": "cyclegan",
    "contrastive": "contrastive",
    "birads": "birads",
    "density": "density",
    "detection": "detection",
    "matching": "matching",
}


def run(stage: str, cfg):
    if stage not in STAGE_MODULES:
        raise ValueError(f"unknown stage {stage!r}; known stages: {sorted(STAGE_MODULES)}")
    module = importlib.import_module(f"mammodg.stages.{STAGE_MODULES[stage]}")
    import tensorflow as tf

    from mammodg.records.reader import INDEX_NAME
    from mammodg.records.verify import verify
    from mammodg.train import TrainingError, check_config, distribution_strategy

    check_config(cfg)  # the trainer's fields, before a stage reads any data
    distribution_strategy()  # a multi-worker strategy must exist before other TensorFlow work
    if (Path(cfg.data_dir) / INDEX_NAME).is_file():
        verify(cfg.data_dir, quick=True)  # missing, truncated or shortened shards, named, before training
    try:
        return module.run(cfg)
    except tf.errors.DataLossError as e:  # a corrupted record inside a shard of the right length
        from mammodg.records.verify import ShardError

        try:  # the full check (SHA-256 against dataset.json) finds which shard it is
            verify(cfg.data_dir, quick=False)
            where = f"`mammodg verify {cfg.data_dir}` finds no damaged shard"
        except (ShardError, OSError) as bad:
            where = str(bad)
        raise TrainingError(f"a shard under {cfg.data_dir} is corrupted ({e.message.splitlines()[0]}): {where}; "
                            f"`mammodg verify {cfg.data_dir}` checks them all") from None


def train_and_export(cfg, task):
    """Train ``task`` with the shared trainer; when ``cfg.export``, write the run's SavedModel with the
    export contract's signatures (:func:`mammodg.export.export_run`: best EMA weights)."""
    from mammodg.export import export_run
    from mammodg.train import Trainer

    trainer = Trainer(cfg, cfg.resolved_run_dir(), task)
    model = trainer.run()
    if not trainer.is_chief:  # the chief writes the run folder
        return model
    if cfg.export:
        export_run(cfg.resolved_run_dir())
    print(f"run folder: {cfg.resolved_run_dir()}", flush=True)
    return model
