"""Contrastive training throughput: the real tf.data pipeline vs the same model fed from memory.

The pipeline (pair records -> MSVCL pair choice -> PNG decode + style blend -> augmentation -> batch)
must not cost more than 10% of the in-memory rate (target ratio >= 0.9). Pair records are made from
phantoms with three styles per image (a cheap stand-in transfer, so decoding and blending cost what
they cost with CycleGAN styles). Both runs use ``model.fit`` with the same compiled model; the first
``--warmup`` steps of each are excluded.

Pair size, encoder input, crops and method come from ``--config`` (the demo's by default).

    python benchmarks/contrastive_pipeline.py [--steps 12] [--config configs/demo/contrastive.yaml]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


class _Styles:
    """Stand-in for CycleGAN generators: three intensity curves."""

    def __init__(self, styles):
        self.styles = styles

    def transfer(self, images01, masks, src, dst):
        return np.where(masks, images01 ** (0.6 + 0.4 * self.styles.index(dst)), 0).astype(np.float32)


def _timed_fit(model, ds, steps, warmup):
    import keras

    times = []

    class T(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())

    model.fit(ds, steps_per_epoch=steps + warmup, epochs=1, verbose=0, callbacks=[T()])
    return (len(times) - warmup) / (times[-1] - times[warmup - 1])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--config", default="configs/demo/contrastive.yaml")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/contrastive_pipeline.json")
    args = ap.parse_args()

    import keras

    from mammodg.config import BuildConfig, PreprocessConfig, TrainConfig, load
    from mammodg.phantom import make_phantoms
    from mammodg.losses import NTXent
    from mammodg.models.resnet import contrastive_model
    from mammodg.records.pairs import build_pairs
    from mammodg.records.reader import load_index
    from mammodg.records.writer import build
    from mammodg.augment import positive_pairs, views_per_sample
    from mammodg.stages.contrastive import contrastive_batches

    tmp = Path(tempfile.mkdtemp(prefix="mammodg-bench-"))
    cfg = load(TrainConfig, args.config, [f"data_dir={tmp / 'rec'}", f"contrastive.pairs_dir={tmp / 'pairs'}", "strategy=natural"])
    c = cfg.contrastive
    pair_size = tuple(c.pair_size) or (512, 384)
    manifest = make_phantoms(tmp / "ph", patients=24, styles=3, seed=0, scale=0.7, progress=False)
    build(manifest, tmp / "rec", BuildConfig(preprocess=PreprocessConfig(height=2 * pair_size[0], width=2 * pair_size[1]),
                                             pseudonym_salt="benchmark-salt-16ch"), progress=False)
    styles = sorted(load_index(tmp / "rec")["segments"])
    build_pairs(tmp / "rec", tmp / "pairs", transfer=_Styles(styles), size=pair_size, progress=False)

    pipeline = contrastive_batches(cfg)
    x, y = next(iter(pipeline))
    memory = __import__("tensorflow").data.Dataset.from_tensors((x, y)).repeat()

    keras.utils.set_random_seed(0)
    views = views_per_sample(c.method)
    model = contrastive_model((*c.input_size, 1), c.projection_dim, c.hidden_dim, views=views)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=NTXent(c.temperature, pairs=positive_pairs(c.method)))
    _timed_fit(model, memory, 1, 1)  # build + trace
    rates = {"pipeline": [], "memory": []}
    for r in range(args.repeats):  # alternate to share machine noise
        for name, ds in (("memory", memory), ("pipeline", pipeline)) if r % 2 == 0 else (("pipeline", pipeline), ("memory", memory)):
            rates[name].append(_timed_fit(model, ds, args.steps, args.warmup) * cfg.batch_size)
    med = {k: float(np.median(v)) for k, v in rates.items()}
    result = {"config": args.config, "method": c.method, "batch": cfg.batch_size, "input_size": c.input_size,
              "pair_size": pair_size, "crop_scale": c.crop_scale, "steps": args.steps,
              "views_per_sample": views, "samples_per_s": med, "images_per_s": {k: views * v for k, v in med.items()},
              "ratio_pipeline_over_memory": med["pipeline"] / med["memory"], "all": rates}
    print(f"images/s ({views} views per sample): pipeline {views * med['pipeline']:.2f}  in-memory {views * med['memory']:.2f}  "
          f"ratio {result['ratio_pipeline_over_memory']:.3f} (target >= 0.9)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
