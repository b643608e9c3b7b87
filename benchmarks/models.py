#!/usr/bin/env python
"""Training images/s of each model, from in-memory tensors and (VGG, CycleGAN) from the real tf.data pipeline, with
the FLOPs per image, so a rate can be set against the published GPU figure and the hardware's limit.

    python benchmarks/models.py [--quick] [--only vgg_classifier,...] [--out benchmarks/results/models.json]

Each model trains with ``train_on_batch`` (compiled train step: forward, backward, optimizer update) for
``warmup`` steps (tracing, excluded) then ``steps`` timed steps. FLOPs: the forward pass of one image is counted by
the backend (TensorFlow's graph profiler, or XLA's cost analysis under ``KERAS_BACKEND=jax``); training is taken
as 3x forward (backward = 2x forward), the convention behind "ResNet-50 training is about 24.5 GFLOP per 224x224
image" (3 x 8.2). Where a model is measured smaller than its paper size (to fit a CPU budget), the paper-size
rate is extrapolated by the FLOP ratio at the same achieved GFLOP/s, and labelled so.

Models: the VGG classifier at 1152x832, the ResNet-50 contrastive encoder at 224 (2 views per sample, NT-Xent),
CycleGAN on 512 crops (generator and PatchGAN discriminator each timed; a CycleGAN step is estimated as 6 generator
and 6 discriminator forward+backward passes: G_AB, G_BA, the two cycles and the two identities; D on real and
fake of each style; and the stage's own train step from its style-crop pipeline and from memory, at the measured
crop, 512 extrapolated by FLOPs) and FCOS (skipped, recorded, when ``mammodg.models.fcos`` does not import). Runs under any
Keras backend; the real-pipeline figures need TensorFlow. Also counted (not run): the forward FLOPs of the
detection, BI-RADS, density and matching models at their MSVCL configs' sizes, for the cost at scale.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TRAIN_OVER_FORWARD = 3  # backward ~ 2x forward (NVIDIA / MLPerf convention)

# Published references and the physical limit quoted by issue 20 (NVIDIA DeepLearningExamples, TF ResNet-50 v1.5,
# AMP + XLA, training images/s; batch 256 on A100, 256 on V100).
REFERENCES = {
    "resnet50_a100_img_s": 2375,
    "resnet50_v100_img_s": 1270,
    "resnet50_train_gflop_per_img": 24.5,
    "source": "NVIDIA DeepLearningExamples TensorFlow2 ResNet-50 v1.5 performance tables (AMP + XLA, 1 GPU)",
}


def forward_flops(model, inputs) -> float | None:
    """FLOPs of ``model(inputs)`` (inference mode), counted by the backend; None where it cannot count."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        specs = keras.tree.map_structure(lambda a: tf.TensorSpec(a.shape, tf.float32), inputs)
        graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(specs).graph
        builder = tf.compat.v1.profiler.ProfileOptionBuilder
        opts = builder(builder.float_operation()).with_empty_output().build()
        return float(tf.compat.v1.profiler.profile(graph=graph, options=opts).total_float_ops)
    if backend == "jax":
        import jax

        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        fn = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
        cost = fn.lower(tv, ntv, inputs).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    return None


def timed_steps(model, batches, steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` train steps after ``warmup`` untimed ones (the first traces and compiles).
    Fetching the batch is inside the timing, so a real pipeline's cost shows where it is the bottleneck."""
    it = iter(batches)
    for _ in range(warmup):
        model.train_on_batch(*next(it))
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        model.train_on_batch(*next(it))
        out.append(time.perf_counter() - t)
    return out


def rate(step_s: list[float], images_per_step: int) -> float:
    return images_per_step / float(np.median(step_s))


def _rand(rng, shape):
    return rng.uniform(-1, 1, shape).astype(np.float32)


# --- models: each returns a result dict ---

def bench_vgg(args, rng) -> dict:
    import keras

    from mammodg import models

    size, width, batch = ((192, 192), 1 / 16, 2) if args.quick else ((1152, 832), 1.0, args.vgg_batch)
    model = models.build("vgg_classifier", input_shape=(*size, 1), width=width)
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _rand(rng, (batch, *size, 1)), rng.integers(0, 2, batch).astype(np.int32)
    flops = forward_flops(model, x[:1])
    steps = timed_steps(model, itertools.repeat((x, y)), args.steps, args.warmup)
    res = {"paper_size": [1152, 832], "measured_size": list(size), "width": width, "batch": batch,
           "forward_gflop_per_img": flops / 1e9 if flops else None, "memory_step_s": steps,
           "memory_img_s": rate(steps, batch)}
    if width != 1.0 or tuple(size) != (1152, 832):
        full = models.build("vgg_classifier", input_shape=(1152, 832, 1), width=1.0)
        res["paper_forward_gflop_per_img"] = forward_flops(full, np.zeros((1, 1152, 832, 1), np.float32)) / 1e9
    patch = models.build("patch_classifier", input_shape=(224, 224, 1), width=1.0)  # the patch stage (cost at scale)
    res["patch_224_forward_gflop_per_img"] = forward_flops(patch, np.zeros((1, 224, 224, 1), np.float32)) / 1e9
    res["pipeline"] = vgg_pipeline(model, size, batch, args)
    return res


def vgg_pipeline(model, size, batch: int, args) -> dict:
    """The classifier fed by ``image_batches(strategy="periodic")`` over a synthetic shard set of the same size."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return {"skipped": "TensorFlow is not installed (the input pipeline needs it)"}
    sys.path.insert(0, str(Path(__file__).parent))
    import pipeline as synth  # benchmarks/pipeline.py: synthetic breast images through the writer's layout

    tmp = Path(tempfile.mkdtemp(prefix="mammodg-bench-models-"))
    segments, per_stream = 2, 4
    images = synth.make_images(4, *size, level=1, seed=0)
    synth.write_dataset(tmp, segments, per_stream, images, *size, shard_size=64)
    ds, _ = synth.periodic_pipeline(tmp, batch, budget=64, seed=0, target_mean=0.25)
    steps = timed_steps(model, ds, args.steps, 1)
    return {"records": 2 * segments * per_stream, "strategy": "periodic", "step_s": steps, "img_s": rate(steps, batch)}


def bench_contrastive(args, rng) -> dict:
    import keras

    from mammodg.losses import NTXent
    from mammodg.models.resnet import contrastive_model, view_names

    size, batch = ((64, 64), 2) if args.quick else ((224, 224), args.resnet_batch)
    model = contrastive_model((*size, 1), projection_dim=128, hidden_dim=2048, views=2)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=NTXent(0.1))
    x = {k: _rand(rng, (batch, *size, 1)) for k in view_names(2)}
    y = np.zeros((batch,), np.float32)
    flops = forward_flops(model, {k: v[:1] for k, v in x.items()})
    steps = timed_steps(model, itertools.repeat((x, y)), args.steps, args.warmup)
    res = {"paper_size": [224, 224], "measured_size": list(size), "batch_samples": batch, "views": 2,
           "forward_gflop_per_img": flops / 2e9 if flops else None, "memory_step_s": steps,
           "memory_img_s": rate(steps, 2 * batch),
           "pipeline": {"see": "contrastive_pipeline (demo config: MSVCL, 3 views, the demo's input size)"}}
    if tuple(size) != (224, 224):
        full = contrastive_model((224, 224, 1), projection_dim=128, hidden_dim=2048, views=2)
        res["paper_forward_gflop_per_img"] = forward_flops(full, {k: np.zeros((1, 224, 224, 1), np.float32)
                                                                   for k in view_names(2)}) / 2e9
    if not args.quick:  # the MSVCL config's encoder input (cost at scale)
        cfg = contrastive_model((512, 384, 1), projection_dim=128, hidden_dim=2048, views=2)
        res["msvcl_512x384_forward_gflop_per_img"] = forward_flops(cfg, {k: np.zeros((1, 512, 384, 1), np.float32)
                                                                         for k in view_names(2)}) / 2e9
    return res


def bench_cyclegan(args, rng) -> dict:
    import keras

    from mammodg import models

    crop, filters = (32, 8) if args.quick else (args.cyclegan_crop, 64)
    res = {"paper_size": [512, 512], "measured_size": [crop, crop], "filters": filters, "batch": 1,
           "passes_per_step": {"generator": 6, "discriminator": 6}}
    x = _rand(rng, (1, crop, crop, 1))
    for part, name, loss in (("generator", "cyclegan_generator", "mae"), ("discriminator", "patchgan_discriminator", "mse")):
        net = models.build(name, filters=filters)
        net.compile(optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5), loss=loss)
        target = x if part == "generator" else np.zeros(net.compute_output_shape(x.shape), np.float32)
        flops = forward_flops(net, x)
        full = forward_flops(net, np.zeros((1, 512, 512, 1), np.float32))
        steps = timed_steps(net, itertools.repeat((x, target)), args.steps, args.warmup)
        res[part] = {"forward_gflop_per_img": flops / 1e9, "paper_forward_gflop_per_img": full / 1e9,
                     "step_s": steps, "img_s": rate(steps, 1)}
    g, d = res["generator"], res["discriminator"]
    res["memory_img_s"] = 1 / (6 / g["img_s"] + 6 / d["img_s"])  # image pairs (one per style) per second
    res["forward_gflop_per_img"] = 6 * g["forward_gflop_per_img"] + 6 * d["forward_gflop_per_img"]
    res["paper_forward_gflop_per_img"] = 6 * g["paper_forward_gflop_per_img"] + 6 * d["paper_forward_gflop_per_img"]
    res["note"] = "memory_img_s: image pairs/s of a CycleGAN step estimated from the measured G and D rates"
    res["pipeline"] = cyclegan_pipeline(crop, filters, args)
    if "img_s" in res["pipeline"]:  # the 512 rates, extrapolated by the FLOP ratio like the in-memory one
        scale = res["forward_gflop_per_img"] / res["paper_forward_gflop_per_img"]
        res["pipeline"]["paper_img_s_extrapolated"] = res["pipeline"]["img_s"] * scale
        res["pipeline"]["paper_memory_img_s_extrapolated"] = res["pipeline"]["memory_img_s"] * scale
    return res


def cyclegan_pipeline(crop: int, filters: int, args) -> dict:
    """The CycleGAN stage's own task (:func:`mammodg.stages.cyclegan.pair_task`: the paper's networks, image
    pools, both optimizers) at ``crop``: fed by its style crops from records of two styles (synthetic shards,
    :mod:`benchmarks.pipeline`), and by their first batch repeated from memory; image pairs/s, repeats
    alternating."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return {"skipped": "the CycleGAN train step and its input pipeline need the TensorFlow backend"}
    import tensorflow as tf

    sys.path.insert(0, str(Path(__file__).parent))
    import pipeline as synth
    from contrastive_pipeline import timed_fit

    tmp = Path(tempfile.mkdtemp(prefix="mammodg-bench-cyclegan-"))
    try:
        return _cyclegan_pipeline(tmp, crop, filters, args, tf, synth, timed_fit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cyclegan_pipeline(tmp: Path, crop: int, filters: int, args, tf, synth, timed_fit) -> dict:
    from mammodg.config import TrainConfig, load
    from mammodg.records.reader import load_index
    from mammodg.stages.cyclegan import pair_task

    h, w = 2 * crop, 3 * crop // 2  # crops of the breast of a stored image twice the crop's height
    synth.write_dataset(tmp, 2, 8, synth.make_images(4, h, w, level=1, seed=0), h, w, shard_size=8)
    cfg = load(TrainConfig, "configs/msvcl/cyclegan.yaml", [f"data_dir={tmp}", f"cyclegan.crop_size={crop}",
                                                             f"cyclegan.generator_filters={filters}",
                                                             f"cyclegan.discriminator_filters={filters}",
                                                             "mixed_precision=float32", "jit_compile=false"])
    index = load_index(tmp)
    task = pair_task(cfg, index, *sorted(index["segments"]))
    model = task.build_model()
    task.compile(model)
    pipe = task.batches(0)
    memory = tf.data.Dataset.from_tensors(next(iter(pipe))).repeat()
    timed_fit(model, memory, 1, 1)  # build + trace
    rates = {"pipeline": [], "memory": []}
    for r in range(args.pipeline_repeats):
        for name in ("memory", "pipeline") if r % 2 == 0 else ("pipeline", "memory"):
            rates[name].append(cfg.batch_size * timed_fit(model, pipe if name == "pipeline" else memory,
                                                          args.steps, args.warmup + 1)[0])
    med = {k: float(np.median(v)) for k, v in rates.items()}
    return {"strategy": f"style crops of 2 styles ({len(index['segments'])} segments, {h}x{w} records)",
            "batch": cfg.batch_size, "img_s": med["pipeline"], "memory_img_s": med["memory"],
            "ratio": med["pipeline"] / med["memory"], "runs": rates,
            "note": "image pairs/s of the stage's train step (its pipeline vs its first batch from memory)"}


def bench_fcos(args, rng) -> dict:
    import keras

    try:
        importlib.import_module("mammodg.models.fcos")
    except ImportError as e:
        return {"skipped": f"not available: mammodg.models.fcos does not import ({e})"}
    from mammodg import models

    size, kw = ((64, 64), {"backbone": "tiny", "width": 32}) if args.quick else (tuple(args.fcos_size), {})
    model = models.build("fcos", input_shape=(*size, 1), **kw)
    x = _rand(rng, (1, *size, 1))
    outs = model(x)
    y = keras.tree.map_structure(lambda o: np.zeros(keras.ops.shape(o), np.float32), outs)
    # a stand-in loss (squared outputs): times the network's forward+backward, not FCOS' target assignment
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.tree.map_structure(lambda _: "mse", outs))
    flops = forward_flops(model, x)
    steps = timed_steps(model, itertools.repeat((x, y)), args.steps, args.warmup)
    res = {"paper_size": [512, 384], "measured_size": list(size), "batch": 1, "options": kw,
           "forward_gflop_per_img": flops / 1e9 if flops else None, "memory_step_s": steps,
           "memory_img_s": rate(steps, 1), "loss": "stand-in: mse of every output against zeros",
           "pipeline": {"skipped": "not measured"}}
    if tuple(size) != (512, 384) and not args.quick:
        full = models.build("fcos", input_shape=(512, 384, 1))
        res["paper_forward_gflop_per_img"] = forward_flops(full, np.zeros((1, 512, 384, 1), np.float32)) / 1e9
    return res


def stage_flops() -> dict:
    """Forward GFLOP per image of the MSVCL v2 downstream stages' models at their configs' sizes (for the cost at
    scale; counted, not run): detection (FCOS at ``detection.input_size``), birads and density (ResNet-50 at the
    224 crops / inputs), matching (per ROI: a pair is two 224 ROIs through the shared embedding)."""
    from mammodg import models
    from mammodg.augment.matching_pairs import build_matcher
    from mammodg.config import TrainConfig, load
    from mammodg.models import fcos  # noqa: F401  (registers the detector)
    from mammodg.stages.birads import build_birads_model
    from mammodg.stages.density import build_density_model

    def cfg(stage, *sets):
        return load(TrainConfig, f"configs/msvcl/{stage}.yaml", [f"{stage}.backbone_from=", *sets])

    def image(shape):
        return np.zeros((1, *shape), np.float32)

    out = {}
    d = cfg("detection").detection
    out["detection"] = {"input": list(d.input_size),
                        "build": lambda: (models.build("fcos", **d.model_kwargs()), image((*d.input_size, 1)))}
    b = cfg("birads")
    out["birads"] = {"input": [b.birads.crop_size] * 2,
                     "build": lambda: (build_birads_model(b), image((b.birads.crop_size, b.birads.crop_size, 1)))}
    n = cfg("density")
    out["density"] = {"input": list(n.density.input_size),
                      "build": lambda: (build_density_model(n), image((*n.density.input_size, 1)))}
    m = cfg("matching", "matching.detection_run=")
    s = m.matching.roi_size
    out["matching"] = {"input": [s, s], "per": 2,
                       "build": lambda: (build_matcher(m), {"roi_cc": image((s, s, 1)), "roi_mlo": image((s, s, 1)),
                                                            "geom_cc": image((3,)), "geom_mlo": image((3,))})}
    for name, entry in out.items():
        build = entry.pop("build")
        try:
            model, x = build()
            entry["forward_gflop_per_img"] = forward_flops(model, x) / 1e9 / entry.pop("per", 1)
        except Exception as e:  # noqa: BLE001  (recorded; the table says n/a)
            entry["error"] = f"{type(e).__name__}: {e}"
    return out


BENCHES = {"vgg_classifier": bench_vgg, "resnet50_contrastive": bench_contrastive, "cyclegan": bench_cyclegan,
           "fcos": bench_fcos}


def derive(res: dict) -> dict:
    """Training GFLOP/img, achieved GFLOP/s, and the paper-size rate extrapolated by FLOP ratio where needed."""
    f = res.get("forward_gflop_per_img")
    if not f or "memory_img_s" not in res:
        return res
    res["train_gflop_per_img"] = TRAIN_OVER_FORWARD * f
    res["achieved_gflop_s"] = res["train_gflop_per_img"] * res["memory_img_s"]
    full = res.get("paper_forward_gflop_per_img")
    res["paper_train_gflop_per_img"] = TRAIN_OVER_FORWARD * (full or f)
    if full:
        res["paper_img_s_extrapolated"] = res["memory_img_s"] * f / full
    return res


def versions() -> dict:
    import keras

    out = {"python": platform.python_version(), "numpy": np.__version__, "keras": keras.__version__,
           "backend": keras.backend.backend()}
    for mod in ("tensorflow", "jax"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except ImportError:
            pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of every entry (seconds)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (tracing/compilation)")
    ap.add_argument("--vgg-batch", type=int, default=2)
    ap.add_argument("--resnet-batch", type=int, default=4, help="samples per batch (2 views each)")
    ap.add_argument("--cyclegan-crop", type=int, default=128, help="measured crop (512 extrapolated by FLOPs)")
    ap.add_argument("--fcos-size", type=int, nargs=2, default=[256, 192], help="measured input (512x384 extrapolated)")
    ap.add_argument("--pipeline-repeats", type=int, default=2, help="repeats of the CycleGAN pipeline/memory pair")
    ap.add_argument("--no-stage-flops", action="store_true", help="skip counting the downstream stages' FLOPs")
    ap.add_argument("--out", default="benchmarks/results/models.json")
    args = ap.parse_args()

    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    chosen = [n for n in args.only.split(",") if n] or list(BENCHES)
    results = {"versions": versions(), "quick": args.quick, "steps": args.steps, "warmup": args.warmup,
               "train_over_forward": TRAIN_OVER_FORWARD, "references": REFERENCES, "models": {}}
    for name in chosen:
        t = time.perf_counter()
        try:
            res = derive(BENCHES[name](args, rng))
        except Exception as e:  # one model failing is recorded; the others still run
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        res["wall_s"] = round(time.perf_counter() - t, 1)
        results["models"][name] = res
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                 if k in ("memory_img_s", "train_gflop_per_img", "achieved_gflop_s", "paper_img_s_extrapolated",
                          "skipped", "error", "wall_s")}
        print(f"{name}: {shown}", flush=True)
        keras.backend.clear_session()
    if not (args.quick or args.no_stage_flops):
        t = time.perf_counter()
        results["stage_flops"] = stage_flops()
        print(f"stage_flops: {results['stage_flops']} ({time.perf_counter() - t:.1f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=float))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
