"""Training stages: ``mammodg train --stage NAME`` calls ``run(name, cfg)``.

Each stage module exposes ``run(cfg: TrainConfig)``; the stage name selects it here (one place).
"""
from __future__ import annotations

import importlib

# stage name -> module under mammodg.stages
STAGE_MODULES = {
    "patch": "vgg_stages",
    "classifier": "vgg_stages",
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
