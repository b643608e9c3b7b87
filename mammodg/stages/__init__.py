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
}


def run(stage: str, cfg):
    if stage not in STAGE_MODULES:
        raise ValueError(f"unknown stage {stage!r}; known stages: {sorted(STAGE_MODULES)}")
    module = importlib.import_module(f"mammodg.stages.{STAGE_MODULES[stage]}")
    from mammodg.train import check_config

    check_config(cfg)  # the trainer's fields, before a stage reads any data
    return module.run(cfg)


def train_and_export(cfg, task):
    """Train ``task`` with the shared trainer; write a SavedModel of the best EMA weights when ``cfg.export``."""
    from mammodg.train import Trainer

    model = Trainer(cfg, cfg.resolved_run_dir(), task).run()
    if cfg.export:
        out = Path(cfg.resolved_run_dir()) / "saved_model"
        model.export(str(out), format="tf_saved_model", verbose=False)
        print(f"SavedModel (best EMA weights): {out}", flush=True)
    print(f"run folder: {cfg.resolved_run_dir()}", flush=True)
    return model
