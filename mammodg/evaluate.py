"""``mammodg evaluate``: a trained classifier run -> JSON + Markdown report and Figure 3/4-like PNGs."""
from __future__ import annotations

import json
from pathlib import Path


def evaluate_run(run: Path, *, split: str = "val", n_boot: int = 2000) -> dict:
    from mammodg import models
    from mammodg.config import TrainConfig, load
    from mammodg.metrics.classification import classification_report
    from mammodg.records.reader import load_index
    from mammodg.report import write_report
    from mammodg.stages.vgg_stages import image_scores

    cfg_path = run / "config.yaml"
    if not cfg_path.is_file() or not (run / "best.weights.h5").is_file():
        raise FileNotFoundError(f"{run} is not a finished training run (config.yaml / best.weights.h5 missing)")
    cfg = load(TrainConfig, cfg_path)
    if cfg.stage != "classifier":
        raise ValueError(f"{run}: evaluate reports image classifiers; this run is stage {cfg.stage!r}")
    h, w = load_index(cfg.data_dir)["image_shape"]
    model = models.build("vgg_classifier", input_shape=(h, w, 1), width=cfg.width, filters=tuple(cfg.filters))
    model.load_weights(run / "best.weights.h5")
    cfg.val_max_batches = 0
    p, y, segs = image_scores(model, cfg, split)
    report = classification_report(y, p, segs, n_boot=n_boot, seed=cfg.seed)
    history = json.loads((run / "history.json").read_text()) if (run / "history.json").is_file() else None
    return write_report(report, run / f"report_{split}", f"{run.name}: {split} split ({cfg.strategy} sampling)", history=history)
