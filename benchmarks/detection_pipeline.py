"""Detection training throughput: the real tf.data pipeline vs the same model fed from memory (issue 18).

The pipeline (image records -> sampling -> PNG decode -> model input -> resize -> random flip and scale
with the boxes -> packed targets -> batch) must not cost more than 10% of the in-memory rate (target
ratio >= 0.9). Records are phantoms stored at twice the detector input, so the resize is real work. Both
runs use ``model.fit`` with the same compiled packed FCOS model (:mod:`mammodg.stages.detection`); the
first ``--warmup`` steps of each are excluded. Model and input size come from ``--config`` (the demo's).

    python benchmarks/detection_pipeline.py [--steps 8] [--config configs/demo/detection.yaml] [--set K=V]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from contrastive_pipeline import timed_fit


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--config", default="configs/demo/detection.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="benchmarks/results/detection_pipeline.json")
    args = ap.parse_args()

    import keras
    import tensorflow as tf

    from mammodg.config import BuildConfig, PreprocessConfig, TrainConfig, load
    from mammodg.phantom import make_phantoms
    from mammodg.records.writer import build
    from mammodg.stages.detection import detection_task

    tmp = Path(tempfile.mkdtemp(prefix="mammodg-bench-"))
    cfg = load(TrainConfig, args.config, [f"data_dir={tmp / 'rec'}", "strategy=natural", "detection.backbone_from=",
                                          *args.set])
    h, w = cfg.detection.input_size
    manifest = make_phantoms(tmp / "ph", patients=16, styles=3, seed=0, scale=0.25, progress=False)
    build(manifest, tmp / "rec", BuildConfig(preprocess=PreprocessConfig(height=2 * h, width=2 * w),
                                             pseudonym_salt="benchmark-salt-16ch"), progress=False)
    keras.utils.set_random_seed(0)
    task = detection_task(cfg)
    pipeline = task.batches(0)
    x, y = next(iter(pipeline))
    memory = tf.data.Dataset.from_tensors((x, y)).repeat()
    model = task.build_model()
    model.compile(optimizer=task.optimizer(), loss=task.loss)
    timed_fit(model, memory, 1, 1)  # build + trace
    rates = {"pipeline": [], "memory": []}
    for r in range(args.repeats):  # alternate to share machine noise
        order = (("memory", memory), ("pipeline", pipeline)) if r % 2 == 0 else (("pipeline", pipeline), ("memory", memory))
        for name, ds in order:
            rates[name].append(timed_fit(model, ds, args.steps, args.warmup) * cfg.batch_size)
    med = {k: float(np.median(v)) for k, v in rates.items()}
    result = {"config": args.config, "overrides": args.set, "batch": cfg.batch_size, "input_size": [h, w],
              "stored_size": [2 * h, 2 * w], "backbone": cfg.detection.backbone, "levels": cfg.detection.levels,
              "steps": args.steps, "images_per_s": med, "ratio_pipeline_over_memory": med["pipeline"] / med["memory"],
              "all": rates}
    print(f"images/s: pipeline {med['pipeline']:.2f}  in-memory {med['memory']:.2f}  "
          f"ratio {result['ratio_pipeline_over_memory']:.3f} (target >= 0.9)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
