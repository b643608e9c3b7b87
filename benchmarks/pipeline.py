#!/usr/bin/env python
"""Sampling pipeline: periodic stream throughput vs a plain reader, and peak memory vs the number of segments.

    python benchmarks/pipeline.py [--height 1152 --width 832] [--batch 8] [--records 512] [--repeats 7]

A synthetic dataset is written straight to shards (no DICOM): 16-bit PNG breast-like images (a
half-ellipse on the chest-wall side with smooth texture and noise, 0 outside the mask, like the
preprocessor's output) with every record field, through ``encode_example`` and the writer's own shard
and index layout. ``--distinct`` images are generated and reused across records (each record has
its own metadata), which keeps the build fast without changing what the pipeline reads or decodes.

Targets (from the issue):

(a) throughput: ``image_batches(..., strategy="periodic")`` on ``--segments`` data segments against a
    plain reader over the *same shards* with the *same decode function*:
    ``from_tensor_slices(files).shuffle.interleave(TFRecordDataset, cycle_length, AUTOTUNE)
    .shuffle(shuffle_budget).repeat().map(decode, AUTOTUNE).batch(b).prefetch(AUTOTUNE)``.
    Each repeat builds a fresh iterator of each pipeline (one alive at a time, order alternating
    ABBA), discards warm-up batches (enough samples for the periodic stream to have drawn from every
    (segment, label) stream once, so every shuffle buffer has been filled, plus ``--warmup-extra``),
    then times ``--batches`` batches. Reported: median images/s of each; the ratio periodic / plain
    (target >= 0.9) is the median of the per-repeat ratios (the two runs of a repeat are adjacent in
    time, which cancels slow drifts of the load of a shared machine); also the ratio of the medians,
    and the CPU time of the process per image (less sensitive to other load than images/s).
(b) memory: for each of ``--mem-segments`` (4 and 64) a dataset with the *same total number of
    records* (``--records``, split evenly over segments x 2 labels) and the same image size, batch and
    shuffle budget; the periodic pipeline runs in a fresh subprocess for ``--mem-batches`` batches
    (default: one full period of the choice sequence, so every stream has been read). Reported: the
    child's peak RSS (VmHWM) and, for information, its growth over the RSS it had before building the
    pipeline (TensorFlow imported and initialised). Target: peak RSS(64) <= 1.2 x peak RSS(4).
    (``getrusage`` ``ru_maxrss`` is not used: Linux carries the parent's peak RSS at fork over into a
    child's, through exec, so it would report this script's own peak for every configuration.)

Figures are printed and saved as JSON to ``<out>/pipeline.json``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SPLIT = "train"
VENDORS = ("VendorA", "VendorB", "VendorC", "VendorD")


# --- synthetic dataset ---

def breast_image(rng, h: int, w: int):
    """A uint16 image in the stored encoding (0 outside the mask, 1 + round(v * 65534) inside)."""
    import numpy as np
    from scipy import ndimage

    from mammodg.preprocess.stored import to_stored

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, cy = w * rng.uniform(0.6, 0.9), h * rng.uniform(0.35, 0.47), h * rng.uniform(0.45, 0.55)
    t2 = (xx / a) ** 2 + ((yy - cy) / b) ** 2
    mask = t2 < 1
    thick = np.sqrt(np.clip(1 - t2, 0, 1))
    lo = ndimage.gaussian_filter(rng.standard_normal((h // 16 + 2, w // 16 + 2)).astype(np.float32), 1.5)
    tex = ndimage.zoom(lo, 16, order=1)[:h, :w]
    tex = (tex - tex.min()) / (np.ptp(tex) + 1e-6)
    v = 0.25 + 0.45 * np.sqrt(thick) + 0.25 * tex * thick + rng.normal(0, 0.01, (h, w)).astype(np.float32)
    img = to_stored(v, mask)
    return img, float(mask.mean())


def make_images(n: int, h: int, w: int, level: int, seed: int):
    import numpy as np

    from mammodg.records.schema import encode_png16

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img, frac = breast_image(rng, h, w)
        out.append((encode_png16(img, level), frac))
    return out


def write_dataset(out: Path, n_segments: int, per_stream: int, images, h: int, w: int, shard_size: int) -> dict:
    """``n_segments`` segments x 2 labels x ``per_stream`` records, as the builder lays them out."""
    import hashlib

    from mammodg.config import BuildConfig, PreprocessConfig, to_dict
    from mammodg.records.schema import encode_example
    from mammodg.io.atomic import atomic_write_json
    from mammodg.records.reader import INDEX_FORMAT, INDEX_NAME
    from mammodg.records.shards import write_shards

    cfg = BuildConfig(preprocess=PreprocessConfig(height=h, width=w), shard_size=shard_size, pseudonym_salt="bench")
    out.mkdir(parents=True, exist_ok=True)
    metas, records = [], {}
    line = 0
    for s in range(n_segments):
        source, vendor = f"SYN{s:02d}", VENDORS[s % len(VENDORS)]
        segment = f"{source}|{vendor}"
        for label in (0, 1):
            for j in range(per_stream):
                line += 1
                png, frac = images[line % len(images)]
                key = hashlib.sha256(f"{n_segments}/{line}".encode()).hexdigest()[:24]
                patient = hashlib.sha256(f"patient{line // 2}".encode()).hexdigest()[:16]
                boxes = [[0.3 * w, 0.4 * h, 0.3 * w + 64, 0.4 * h + 64]] if label else []
                feats = {
                    "image": png, "height": h, "width": w, "label": label, "data_segment": segment, "split": SPLIT,
                    "source": source, "manufacturer": vendor, "view": ("CC", "MLO")[j % 2],
                    "laterality": ("L", "R")[(j // 2) % 2], "patient": patient, "image_id": key,
                    "birads": "4" if label else "2", "density": "ABCD"[line % 4], "pixel_spacing_mm": 0.1,
                    "scale": 1.0, "flipped": j % 2, "mask_fallback": 0, "truncated": 0, "breast_fraction": frac,
                    "photometric": "MONOCHROME2", "transfer_syntax": "1.2.840.10008.1.2.1", "decoder": "synthetic",
                    "voi": "none",
                    "boxes/x_min": [b[0] for b in boxes], "boxes/y_min": [b[1] for b in boxes],
                    "boxes/x_max": [b[2] for b in boxes], "boxes/y_max": [b[3] for b in boxes],
                    "boxes/lesion_class": ["mass"] * len(boxes), "boxes/birads": ["4"] * len(boxes),
                }
                records[key] = feats  # encoded when its shard is written (the PNG bytes are shared)
                metas.append({"key": key, "line": line, "split": SPLIT, "segment": segment, "label": label,
                              "patient": patient})
    splits = write_shards(out, metas, lambda m: encode_example(records[m["key"]]), shard_size)
    index = {
        "format": INDEX_FORMAT, "manifest_rows": len(metas), "records": len(metas), "rejected": 0,
        "rejected_by_reason": {}, "ignored_columns": [], "warnings": [], "segment_keys": cfg.segment_keys,
        "segments": sorted({m["segment"] for m in metas}), "image_shape": [h, w],
        "config": to_dict(cfg) | {"pseudonym_salt": "(not stored)"}, "splits": splits,
        "timing": {"processed": 0, "workers": 0, "process_s": 0.0, "assemble_s": 0.0},
    }
    atomic_write_json(out / INDEX_NAME, index)
    return index


# --- pipelines ---

def make_decode(target_mean: float):
    """The whole-image decode of ``image_batches`` (passed to both pipelines, so it is the same function)."""
    import tensorflow as tf

    from mammodg.records.schema import model_input, parse

    def whole_image(raw):
        r = parse(raw)
        return model_input(r["image"], target_mean), tf.cast(r["label"], tf.int32)

    return whole_image


def periodic_pipeline(data_dir, batch: int, budget: int, seed: int, target_mean: float):
    from mammodg.sampling.streams import image_batches

    return image_batches(data_dir, SPLIT, strategy="periodic", batch_size=batch, seed=seed, target_mean=target_mean,
                         decode=make_decode(target_mean), shuffle_budget=budget)


def plain_pipeline(data_dir, batch: int, budget: int, seed: int, target_mean: float, cycle_length: int):
    import tensorflow as tf

    from mammodg.records.reader import all_shards, load_index

    files = sorted(all_shards(load_index(data_dir), data_dir, SPLIT))
    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)),
                       num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.shuffle(budget, seed=seed + 1).repeat()
    ds = ds.map(make_decode(target_mean), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE), len(files)


def first_cover(plan) -> int:
    """Samples until the periodic choice sequence has drawn from every stream once."""
    import numpy as np

    firsts = [int(np.flatnonzero(plan.choices == k)[0]) for k in range(len(plan.keys))]
    return max(firsts) + 1


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_run(ds, warmup: int, n: int, batch: int) -> tuple[float, float]:
    """(images/s, CPU ms of this process per image) over ``n`` batches after ``warmup``; a fresh iterator."""
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    t, c = time.perf_counter(), _cpu_s()
    for _ in range(n):
        next(it)
    dt, dc = time.perf_counter() - t, _cpu_s() - c
    del it  # stops its threads: only one pipeline runs at a time
    gc.collect()
    return n * batch / dt, dc * 1e3 / (n * batch)


def throughput(data_dir, args) -> dict:
    import tensorflow as tf

    periodic, plan = periodic_pipeline(data_dir, args.batch, args.shuffle_budget, args.seed, args.target_mean)
    plain, n_files = plain_pipeline(data_dir, args.batch, args.shuffle_budget, args.seed, args.target_mean,
                                    args.cycle_length)
    warmup = -(-first_cover(plan) // args.batch) + args.warmup_extra
    runs = {"periodic": [], "plain": []}
    cpu = {"periodic": [], "plain": []}
    for r in range(args.repeats):
        order = ("periodic", "plain") if r % 2 == 0 else ("plain", "periodic")  # ABBA
        for name in order:
            ips, ms = timed_run(periodic if name == "periodic" else plain, warmup, args.batches, args.batch)
            runs[name].append(ips)
            cpu[name].append(ms)
        print(f"  repeat {r + 1}/{args.repeats}: periodic {runs['periodic'][-1]:.1f} img/s "
              f"({cpu['periodic'][-1]:.1f} CPU ms/img), plain {runs['plain'][-1]:.1f} img/s "
              f"({cpu['plain'][-1]:.1f} CPU ms/img)", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    paired = [p / q for p, q in zip(runs["periodic"], runs["plain"])]
    return {
        "tf_version": tf.__version__, "streams": len(plan.keys), "shards": n_files,
        "warmup_batches": warmup, "timed_batches": args.batches, "repeats": args.repeats,
        "periodic_img_s": round(med["periodic"], 2), "plain_img_s": round(med["plain"], 2),
        "ratio": round(statistics.median(paired), 3),
        "ratio_of_medians": round(med["periodic"] / med["plain"], 3),
        "periodic_cpu_ms_per_img": round(med_cpu["periodic"], 2), "plain_cpu_ms_per_img": round(med_cpu["plain"], 2),
        "cpu_efficiency_ratio": round(med_cpu["plain"] / med_cpu["periodic"], 3),
        "ratio_runs": [round(v, 3) for v in paired],
        "periodic_img_s_runs": [round(v, 2) for v in runs["periodic"]],
        "plain_img_s_runs": [round(v, 2) for v in runs["plain"]],
    }


# --- memory (one configuration per fresh process) ---

def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def memory_child(args) -> None:
    import tensorflow as tf

    _ = (tf.constant(1.0) + 1.0).numpy()  # runtime initialised before the "before" reading
    before = _proc_kb("VmRSS")
    ds, plan = periodic_pipeline(args.child_data, args.batch, args.shuffle_budget, args.seed, args.target_mean)
    n = args.mem_batches or -(-len(plan.choices) // args.batch)  # default: one period of the choice sequence
    t = time.perf_counter()
    for _ in ds.take(n):
        pass
    dt = time.perf_counter() - t
    print("MEMORY " + json.dumps({
        "streams": len(plan.keys), "batches": n, "period": len(plan.choices), "img_s": round(n * args.batch / dt, 2),
        "rss_before_pipeline_mb": round(before / 1024, 1), "peak_rss_mb": round(_proc_kb("VmHWM") / 1024, 1),
    }), flush=True)


def memory(data_dir, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-data", str(data_dir), "--batch", str(args.batch),
           "--shuffle-budget", str(args.shuffle_budget), "--seed", str(args.seed), "--mem-batches", str(args.mem_batches),
           "--target-mean", str(args.target_mean)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("MEMORY ")]
    if out.returncode or not lines:
        raise RuntimeError(f"memory child failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    res = json.loads(lines[-1][len("MEMORY "):])
    res["pipeline_growth_mb"] = round(res["peak_rss_mb"] - res["rss_before_pipeline_mb"], 1)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--height", type=int, default=1152)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--records", type=int, default=512, help="records per dataset, split evenly over segments x labels")
    ap.add_argument("--segments", type=int, default=64, help="data segments of the throughput dataset")
    ap.add_argument("--mem-segments", default="4,64", help="segment counts compared for memory (first is the reference)")
    ap.add_argument("--distinct", type=int, default=16, help="distinct synthetic images, reused across records")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--png-level", type=int, default=1)
    ap.add_argument("--shuffle-budget", type=int, default=512)
    ap.add_argument("--cycle-length", type=int, default=16, help="interleave cycle length of the plain reader")
    ap.add_argument("--batches", type=int, default=24, help="timed batches per repeat")
    ap.add_argument("--warmup-extra", type=int, default=3, help="warm-up batches beyond covering every stream once")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mem-batches", type=int, default=0, help="batches per memory run (0: one choice period)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-mean", type=float, default=0.25)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--keep-data", default="", help="write the datasets here and keep them (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--child-data", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_data:
        memory_child(args)
        return

    mem_segments = [int(s) for s in args.mem_segments.split(",") if s]
    seg_counts = sorted(set(([] if args.skip_throughput else [args.segments]) + ([] if args.skip_memory else mem_segments))
                        or {args.segments, *mem_segments})  # both skipped: only build (with --keep-data)
    for n in seg_counts:
        if args.records % (2 * n):
            ap.error(f"--records {args.records} must split evenly over {n} segments x 2 labels")
    root = Path(args.keep_data) if args.keep_data else Path(tempfile.mkdtemp(prefix="mammodg-bench-pipeline-"))
    results = {
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(), "image": [args.height, args.width], "batch": args.batch,
        "records": args.records, "shuffle_budget": args.shuffle_budget, "distinct_images": args.distinct,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        t = time.perf_counter()
        images = make_images(args.distinct, args.height, args.width, args.png_level, args.seed)
        results["png_kb_mean"] = round(sum(len(p) for p, _ in images) / len(images) / 1024, 1)
        dirs = {}
        for n in seg_counts:
            dirs[n] = root / f"seg{n}"
            write_dataset(dirs[n], n, args.records // (2 * n), images, args.height, args.width, args.shard_size)
        del images
        results["build_s"] = round(time.perf_counter() - t, 2)
        print(f"datasets {[str(d) for d in dirs.values()]} built in {results['build_s']} s "
              f"({args.records} records each, {results['png_kb_mean']} KiB PNG mean)", flush=True)

        if not args.skip_throughput:
            print(f"(a) throughput, {args.segments} segments:", flush=True)
            a = throughput(dirs[args.segments], args)
            a["segments"] = args.segments
            a["target"] = ">= 0.9"
            a["met"] = a["ratio"] >= 0.9
            results["throughput"] = a
        if not args.skip_memory:
            print(f"(b) peak memory, segments {mem_segments} (same {args.records} records in total):", flush=True)
            b = {}
            for n in mem_segments:
                b[str(n)] = memory(dirs[n], args) | {"segments": n, "records_per_stream": args.records // (2 * n)}
                print(f"  {n} segments: peak RSS {b[str(n)]['peak_rss_mb']} MB", flush=True)
            ref, big = b[str(mem_segments[0])], b[str(mem_segments[-1])]
            b["ratio"] = round(big["peak_rss_mb"] / ref["peak_rss_mb"], 3)
            ref_growth = ref["pipeline_growth_mb"]
            b["growth_ratio"] = round(big["pipeline_growth_mb"] / ref_growth, 3) if ref_growth > 0 else None
            b["target"] = "<= 1.2"
            b["met"] = b["ratio"] <= 1.2
            results["memory"] = b
    finally:
        if not args.keep_data:
            shutil.rmtree(root, ignore_errors=True)

    results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pipeline.json").write_text(json.dumps(results, indent=1))
    print()
    for k, v in results.items():
        if not isinstance(v, dict):
            print(f"{k:>28}: {v}")
    if "throughput" in results:
        a = results["throughput"]
        print(f"\n(a) {a['segments']} segments ({a['streams']} streams, {a['shards']} shards), images/s, median of {a['repeats']}:")
        print(f"{'periodic':>28}: {a['periodic_img_s']}")
        print(f"{'plain interleaved reader':>28}: {a['plain_img_s']}")
        print(f"{'ratio (target >= 0.9)':>28}: {a['ratio']} (median of per-repeat ratios {a['ratio_runs']}; "
              f"ratio of medians {a['ratio_of_medians']})  {'MET' if a['met'] else 'MISSED'}")
        print(f"{'CPU ms/img periodic, plain':>28}: {a['periodic_cpu_ms_per_img']}, {a['plain_cpu_ms_per_img']} "
              f"(plain/periodic {a['cpu_efficiency_ratio']})")
    if "memory" in results:
        b = results["memory"]
        print(f"\n(b) peak RSS of a fresh process iterating the periodic pipeline:")
        print(f"{'segments':>10} {'streams':>8} {'per stream':>10} {'batches':>8} {'peak RSS MB':>12} {'growth MB':>10}")
        for n in mem_segments:
            r = b[str(n)]
            print(f"{n:>10} {r['streams']:>8} {r['records_per_stream']:>10} {r['batches']:>8} {r['peak_rss_mb']:>12} "
                  f"{r['pipeline_growth_mb']:>10}")
        print(f"{'ratio (target <= 1.2)':>28}: {b['ratio']}  (growth ratio {b['growth_ratio']})  "
              f"{'MET' if b['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
