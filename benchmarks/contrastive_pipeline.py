"""Contrastive training throughput: the real tf.data pipeline vs the same model fed from memory.

The pipeline (pair records -> MSVCL pair choice -> PNG decode + style blend -> augmentation -> batch)
must not cost more than 10% of the in-memory rate (target ratio >= 0.9). Pair records are made from
phantoms with three styles per image (a cheap stand-in transfer, so decoding and blending cost what
they cost with CycleGAN styles). Both runs use ``model.fit`` with the same compiled model (the ResNet-50
encoder, whatever the config's backbone: the paper's); the first ``--warmup`` steps of each are excluded,
and repeats alternate the two to share the machine's noise. The pipeline alone (no model) is timed too: on
a CPU-only machine the two compete for the same cores, so the ratio is the pipeline's share of the CPU;
with the model on an accelerator the ceiling is the pipeline-alone rate.

Pair size, encoder input, crops and method come from ``--config`` (the demo's by default); each ``--case
LABEL:KEY=VALUE;KEY=VALUE`` is one more measurement on the same pair records with those overrides (e.g. the
ResNet-50 encoder at 224 with 2 SimCLR views, as ``benchmarks/models.py`` times it from memory).

    python benchmarks/contrastive_pipeline.py [--steps 12] [--config configs/demo/contrastive.yaml] [--case ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/pipeline.py: the timing helpers


class _Styles:
    """Stand-in for CycleGAN generators: three intensity curves."""

    def __init__(self, styles):
        self.styles = styles

    def transfer(self, images01, masks, src, dst):
        return np.where(masks, images01 ** (0.6 + 0.4 * self.styles.index(dst)), 0).astype(np.float32)


def timed_fit(model, ds, steps, warmup):
    """(steps/s, CPU seconds of this process per step) of ``model.fit`` after ``warmup`` untimed steps."""
    import keras

    from pipeline import _cpu_s

    times = []

    class T(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append((time.perf_counter(), _cpu_s()))

    model.fit(ds, steps_per_epoch=steps + warmup, epochs=1, verbose=0, callbacks=[T()])
    (t0, c0), (t1, c1) = times[warmup - 1], times[-1]
    return (len(times) - warmup) / (t1 - t0), (c1 - c0) / (len(times) - warmup)


def measure(cfg, args) -> dict:
    """Training samples/s of the config's pipeline and of its first batch repeated from memory, and the
    pipeline alone; medians over ``--repeats`` (alternating), with every run kept."""
    import keras
    import tensorflow as tf

    from pipeline import timed_run  # benchmarks/pipeline.py

    from mammodg.augment import positive_pairs, views_per_sample
    from mammodg.losses import NTXent
    from mammodg.models.resnet import contrastive_model
    from mammodg.stages.contrastive import contrastive_batches

    c = cfg.contrastive
    pipeline = contrastive_batches(cfg)
    x, y = next(iter(pipeline))
    memory = tf.data.Dataset.from_tensors((x, y)).repeat()
    keras.utils.set_random_seed(0)
    views = views_per_sample(c.method)
    model = contrastive_model((*c.input_size, 1), c.projection_dim, c.hidden_dim, views=views)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=NTXent(c.temperature, pairs=positive_pairs(c.method)))
    timed_fit(model, memory, 1, 1)  # build + trace
    rates = {"pipeline": [], "memory": [], "pipeline_alone": []}
    cpu = {k: [] for k in rates}  # CPU ms of this process per sample (less sensitive to other load than rates)
    for r in range(args.repeats):  # alternate to share machine noise
        for name, ds in (("memory", memory), ("pipeline", pipeline)) if r % 2 == 0 else (("pipeline", pipeline), ("memory", memory)):
            steps_s, cpu_s = timed_fit(model, ds, args.steps, args.warmup)
            rates[name].append(steps_s * cfg.batch_size)
            cpu[name].append(1e3 * cpu_s / cfg.batch_size)
        samples_s, cpu_ms = timed_run(pipeline, args.warmup, args.steps, cfg.batch_size)
        rates["pipeline_alone"].append(samples_s)
        cpu["pipeline_alone"].append(cpu_ms)
    med = {k: float(np.median(v)) for k, v in rates.items()}
    ratios = [p / m for p, m in zip(rates["pipeline"], rates["memory"])]
    cpu_med = {k: float(np.median(v)) for k, v in cpu.items()}
    return {"method": c.method, "batch": cfg.batch_size, "input_size": c.input_size, "encoder": "resnet50",
            "crop_scale": c.crop_scale, "steps": args.steps, "repeats": args.repeats,
            "views_per_sample": views, "samples_per_s": med, "images_per_s": {k: views * v for k, v in med.items()},
            "ratio_pipeline_over_memory": float(np.median(ratios)), "ratio_runs": ratios,
            "ratio_spread": [min(ratios), max(ratios)], "cpu_ms_per_sample": cpu_med,
            "cpu_ratio_memory_over_pipeline": cpu_med["memory"] / cpu_med["pipeline"], "all": rates, "all_cpu": cpu}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--config", default="configs/demo/contrastive.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", action="append", default=[], help="LABEL:KEY=VALUE;KEY=VALUE (config overrides)")
    ap.add_argument("--case-steps", type=int, default=0, help="timed steps of the --case runs (default --steps)")
    ap.add_argument("--out", default="benchmarks/results/contrastive_pipeline.json")
    args = ap.parse_args()

    from mammodg.config import BuildConfig, PreprocessConfig, TrainConfig, load
    from mammodg.phantom import make_phantoms
    from mammodg.records.pairs import build_pairs
    from mammodg.records.reader import load_index
    from mammodg.records.writer import build

    tmp = Path(tempfile.mkdtemp(prefix="mammodg-bench-"))
    base = [f"data_dir={tmp / 'rec'}", f"contrastive.pairs_dir={tmp / 'pairs'}", "strategy=natural"]
    cfg = load(TrainConfig, args.config, base)
    pair_size = tuple(cfg.contrastive.pair_size) or (512, 384)
    manifest = make_phantoms(tmp / "ph", patients=24, styles=3, seed=0, scale=0.7, progress=False)
    build(manifest, tmp / "rec", BuildConfig(preprocess=PreprocessConfig(height=2 * pair_size[0], width=2 * pair_size[1]),
                                             pseudonym_salt="benchmark-salt-16ch"), progress=False)
    styles = sorted(load_index(tmp / "rec")["segments"])
    build_pairs(tmp / "rec", tmp / "pairs", transfer=_Styles(styles), size=pair_size, progress=False)

    result = measure(cfg, args) | {"config": args.config, "pair_size": pair_size, "cases": {}}
    for case in args.case:
        label, _, sets = case.partition(":")
        case_cfg = load(TrainConfig, args.config, base + [s for s in sets.split(";") if s])
        steps = argparse.Namespace(**{**vars(args), "steps": args.case_steps or args.steps})
        result["cases"][label] = measure(case_cfg, steps) | {"overrides": [s for s in sets.split(";") if s]}
    for label, r in [("config", result), *result["cases"].items()]:
        print(f"{label}: images/s ({r['views_per_sample']} views per sample at {r['input_size']}): pipeline "
              f"{r['images_per_s']['pipeline']:.2f}  in-memory {r['images_per_s']['memory']:.2f}  pipeline alone "
              f"{r['images_per_s']['pipeline_alone']:.2f}  ratio {r['ratio_pipeline_over_memory']:.3f} "
              f"(runs {', '.join(f'{v:.3f}' for v in r['ratio_runs'])}; target >= 0.9); CPU ms/sample "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_ms_per_sample"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
