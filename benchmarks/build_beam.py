#!/usr/bin/env python
"""TFRecord build rate on Apache Beam (``build-tfrecords --runner beam``: the embedded FnApiRunner with
multi-processing) against the local process pool, for 1 and all workers, on the real mammograms; records
"not available" when ``mammodg.records.beam`` or apache-beam does not import.

    python benchmarks/build_beam.py [--copies 3] [--out benchmarks/results/build_beam.json]

Rates are the builder's processing phase (``dataset.json`` ``timing``), so Beam's start-up counts against it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/build_beam.json")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from record_size import real_manifest

    from mammodg.config import BuildConfig
    from mammodg.records.writer import build

    res = {"copies": args.copies, "cpu_count": os.cpu_count()}
    try:
        from mammodg.records.beam import beam_runner
    except ImportError as e:
        res["skipped"] = f"not available: {e}"
    tmp = Path(tempfile.mkdtemp(prefix="mammodg-bench-beam-"))
    try:
        manifest = real_manifest(tmp, args.copies)
        for workers in ([] if "skipped" in res else sorted({1, os.cpu_count() or 1})):
            for name, extra in (("local", {}), ("beam", {"run_tasks": beam_runner([])})):
                cfg = BuildConfig(pseudonym_salt="benchmark-salt-16ch", workers=workers)
                index = build(manifest, tmp / f"{name}{workers}", cfg, progress=False, **extra)
                res[f"{name}_{workers}w_img_s"] = index["timing"]["processed"] / index["timing"]["process_s"]
                res["images"] = index["timing"]["processed"]
                print(f"{name}, {workers} worker(s): {res[f'{name}_{workers}w_img_s']:.3f} img/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
